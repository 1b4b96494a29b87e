"""The one tokenizer loader (a diffusers AutoencoderKL from the hub or a folder, or an LDM-format file such as VA-VAE's)
and the decoding of diffusion-space latents back to images."""

from __future__ import annotations

from pathlib import Path

import torch

from cli import UsageError


def load_vae(name: str) -> torch.nn.Module:
    """diffusers AutoencoderKL from a hub id or a local folder ('ema' / 'mse': REPA's short names), or from an
    LDM-format weights file such as VA-VAE's vavae-imagenet256-f16d32-dinov2.pt (latent_codecs.load_vavae)."""
    from diffusers.models import AutoencoderKL  # slow import: keep `--help` fast

    if name in ("ema", "mse") and not Path(name).exists():
        name = f"stabilityai/sd-vae-ft-{name}"
    where = "from --vae, the checkpoint or the dataset manifest"
    if Path(name).expanduser().is_file():
        from latent_codecs.vavae import load_vavae

        try:
            return load_vavae(Path(name).expanduser())
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise UsageError(f"VAE {name} ({where}): {e}") from e
    if name.startswith(("/", ".", "~")):
        name = str(Path(name).expanduser())
        if not Path(name).is_dir():
            raise UsageError(f"VAE {name} ({where}): no such folder")
    try:
        return AutoencoderKL.from_pretrained(name).eval()
    except (OSError, ValueError) as e:
        raise UsageError(f"VAE {name} ({where}): cannot load an AutoencoderKL ({e}). Offline, download it once "
                         f"(e.g. `huggingface-cli download {name} --local-dir vae/`) and pass the folder") from e


def decode_latents(vae: torch.nn.Module, x: torch.Tensor, scale, shift) -> torch.Tensor:
    """Diffusion-space latents -> images in [-1, 1]: z = x / scale - shift (scale, shift: numbers or per channel)."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    shift = torch.as_tensor(shift, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    return vae.decode(x.float() / scale - shift).sample
