"""Image tokenizers (VAEs) and latent normalisation; named `latent_codecs`, not `tokenizers`, so that it never shadows
the Hugging Face `tokenizers` library that `transformers` imports (the repository root is first on sys.path)."""

from latent_codecs.stats import (
    LatentStats,
    denormalize,
    normalize,
    read_latent_stats,
    save_latent_stats,
    stats_beside,
)
from latent_codecs.vavae import (
    VAVAE_F16D32,
    diffusers_to_ldm,
    ldm_autoencoder_config,
    ldm_to_diffusers,
    load_vavae,
    vavae_state_dict,
)

__all__ = ["LatentStats", "VAVAE_F16D32", "denormalize", "diffusers_to_ldm", "ldm_autoencoder_config",
           "ldm_to_diffusers", "load_vavae", "normalize", "read_latent_stats", "save_latent_stats", "stats_beside",
           "vavae_state_dict"]
