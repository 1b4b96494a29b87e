"""The on-disk names shared by the writer (preprocessing/) and the readers: our format's id and version, and the
settings REPA's latents were made with (its layout records none)."""

FORMAT = "vae-repa-latents"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# REPA's encoder defaults to sd-vae-ft-mse; ft-EMA and ft-MSE share the original kl-f8 encoder (only the
# decoder was fine-tuned), so the stored latents are those of sd-vae-ft-ema as well. x = 0.18215 * z.
REPA_DEFAULTS = {"vae": "stabilityai/sd-vae-ft-ema", "scale": 0.18215, "shift": 0.0}


def shard_kinds(flip: bool, images: bool, std: bool = True) -> list[str]:
    """The arrays of a shard, in the writer's order: mean and std (without std when the dataset stores one posterior
    sample, --posterior sample: "mean" holds it), their flipped twins, the images."""
    moments = ["mean"] + (["std"] if std else [])
    return moments + [f"flip-{kind}" for kind in moments if flip] + (["images"] if images else [])
