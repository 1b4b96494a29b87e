"""One sampling batch: samples `indices` drawn as generate.py draws them (labels and noise from (seed, i)), integrated
by the chosen sampler, decoded and rounded to 8-bit pixels. generate.py and training's evaluation both call it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import numpy as np
import torch

import samplers
from latent_codecs.autoencoder import decode_latents
from sampling.images import to_uint8
from sampling.seeds import NOISE_STREAM, sample_generator, sample_labels


@dataclass(frozen=True)
class SamplingSettings:
    """What decides a batch's images besides the model (generate.py's flags of the same names)."""

    mode: str = "sde"  # sde: REPA's Euler-Maruyama sampler; ode: Euler (or Heun) probability-flow ODE
    num_steps: int = 250
    heun: bool = False
    time_shift: float = 1.0
    cfg_scale: float = 1.0
    cfg_channels: str | int = "all"  # "all", or N: guide latent channels 0..N-1 only (LightningDiT: 3)
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    global_seed: int = 0
    label_sampling: str = "random"
    pixel_rounding: str = "repa"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SamplingSettings:
        """The settings of generate.py's parsed command line."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def sampler_channels(cfg_channels: str | int) -> int | None:
    """The samplers' `cfg_channels` of a --cfg-channels value: None for all channels."""
    return None if cfg_channels == "all" else int(cfg_channels)


@torch.inference_mode()
def sample_batch(model: torch.nn.Module, vae: torch.nn.Module, indices: list[int], settings: SamplingSettings,
                 info: dict, device: torch.device, precision: str) -> np.ndarray:
    """uint8 images (B, H, W, 3) of samples `indices`; `settings` may also be generate.py's parsed command line."""
    latent_shape = info["arch"]["latent_shape"]
    generators = [sample_generator(settings.global_seed, i, NOISE_STREAM) for i in indices]
    z = samplers.randn((len(indices), *latent_shape), generators, device, dtype=torch.float32)
    y = sample_labels(indices, model.num_classes, settings.label_sampling, settings.global_seed).to(device)
    kwargs = dict(model=model, latents=z, y=y, num_steps=settings.num_steps, heun=settings.heun,
                  cfg_scale=settings.cfg_scale, guidance_low=settings.guidance_low,
                  guidance_high=settings.guidance_high, path_type=info["path_type"],
                  cfg_channels=sampler_channels(getattr(settings, "cfg_channels", "all")))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16")):
        if settings.mode == "ode":
            x = samplers.euler_sampler(**kwargs, time_shift=settings.time_shift)
        else:
            # the SDE noise of sample i continues its own generator, after its initial noise
            x = samplers.euler_maruyama_sampler(**kwargs, generator=generators)
    images = decode_latents(vae, x, info["latent_scale"], info["latent_shift"])
    return to_uint8(images, settings.pixel_rounding).cpu().numpy()
