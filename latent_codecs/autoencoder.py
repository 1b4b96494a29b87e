"""The one tokenizer loader (a diffusers AutoencoderKL from the hub or a folder, or an LDM-format file such as VA-VAE's)
and the decoding of diffusion-space latents back to images."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from cli import UsageError
from hub_files import download_advice, hub_or_cache


def load_vae(name: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """diffusers AutoencoderKL from a hub id ('owner/name'; 'ema' / 'mse': REPA's short names) or a local folder
    (save_pretrained format), or from an LDM-format weights file such as VA-VAE's vavae-imagenet256-f16d32-dinov2.pt
    (latent_codecs.load_vavae); in eval mode, on the CPU, in `dtype` (default: float32). Moving it is the caller's."""
    from diffusers.models import AutoencoderKL  # slow import: keep `--help` fast

    if name in ("ema", "mse") and not Path(name).exists():
        name = f"stabilityai/sd-vae-ft-{name}"
    where = "from --vae, the checkpoint or the dataset manifest"
    local = Path(name).expanduser()
    if local.is_file():
        from latent_codecs.vavae import load_vavae

        try:
            return load_vavae(local, dtype=dtype)
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise UsageError(f"VAE {name} ({where}): {e}") from e
    if not local.is_dir() and (name.startswith(("/", ".", "~")) or name.count("/") != 1):
        raise UsageError(
            f"VAE {name} ({where}): no such folder or file (there is no such directory, and a Hugging Face hub id "
            "is owner/name). Pass a hub id (e.g. stabilityai/sd-vae-ft-ema), a folder written by "
            "AutoencoderKL.save_pretrained() or an LDM-format weights file."
        )
    with contextlib.nullcontext("") if local.is_dir() else hub_or_cache() as note:
        try:
            vae = AutoencoderKL.from_pretrained(str(local) if local.is_dir() else name, torch_dtype=dtype)
        except Exception as e:  # network, missing files, wrong format: all end with the same advice
            advice = "" if local.is_dir() else f" {note}{download_advice(name, '--vae')}"
            raise UsageError(f"VAE {name} ({where}): cannot load an AutoencoderKL ({type(e).__name__}: {e}).{advice}"
                             ) from e
    return vae.eval()


def decode_latents(vae: torch.nn.Module, x: torch.Tensor, scale, shift) -> torch.Tensor:
    """Diffusion-space latents -> images in [-1, 1]: z = x / scale - shift (scale, shift: numbers or per channel)."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    shift = torch.as_tensor(shift, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    return vae.decode(x.float() / scale - shift).sample
