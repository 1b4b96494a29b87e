"""The on-disk names shared by the writer (preprocessing/) and the readers: our format's id and version, and the
settings REPA's latents were made with (its layout records none)."""

FORMAT = "vae-repa-latents"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# REPA's encoder defaults to sd-vae-ft-mse; ft-EMA and ft-MSE share the original kl-f8 encoder (only the
# decoder was fine-tuned), so the stored latents are those of sd-vae-ft-ema as well. x = 0.18215 * z.
REPA_DEFAULTS = {"vae": "stabilityai/sd-vae-ft-ema", "scale": 0.18215, "shift": 0.0}
