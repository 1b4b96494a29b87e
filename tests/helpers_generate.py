"""Tiny SiT checkpoints, in our format and REPA's, for the generate.py tests."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from alignment import model_from_args
from checkpoints import CHECKPOINT_FORMAT, atomic_save

LATENT = [4, 8, 8]  # the tiny VAE upsamples by 2: 16 x 16 images
TINY_ARGS = dict(model="SiT-S/2", depth=2, hidden_size=32, num_heads=4, qk_norm=False, encoder_depth=1,
                 head_layers=2, head_width=16, num_classes=4, latent_shape=LATENT, align=True,
                 data_dir="unused", latent_scale=0.5, latent_shift=0.1, path_type="linear")


def randomize(model: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Every parameter of `model` drawn from N(0, std^2), in place (adaLN-Zero's zero initialisation would make the
    blocks identities and the velocity zero); returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def random_state(args: dict, seed: int, with_heads: bool = True, std: float = 0.1) -> dict:
    """State dict of the SiT `args` describes, every parameter drawn from N(0, std^2): a non-trivial velocity."""
    return randomize(model_from_args(args, with_heads=with_heads), seed, std).state_dict()


def make_checkpoint(path: Path, vae: Path, seed: int = 0, step: int = 2, **overrides) -> Path:
    """A checkpoint in our format, EMA and online weights different."""
    args = {**TINY_ARGS, "vae": str(vae), **overrides}
    atomic_save({"format": CHECKPOINT_FORMAT, "model": random_state(args, seed + 1), "ema": random_state(args, seed),
                 "opt": {}, "step": step, "args": args, "rng": None, "data": None}, path)
    return path


def make_repa_checkpoint(path: Path, state: dict, training: bool = False, **namespace) -> Path:
    """REPA's layouts: {"ema": ...} as released, or a training checkpoint with args as an argparse.Namespace.
    REPA's projector weights (`projectors.*`) are added: sampling must ignore them."""
    state = {**state, "projectors.0.0.weight": torch.randn(8, state["pos_embed"].shape[-1]),
             "projectors.0.0.bias": torch.zeros(8)}
    if training:
        checkpoint = {"model": state, "ema": state, "opt": {}, "args": argparse.Namespace(**namespace), "steps": 7}
    else:
        checkpoint = {"ema": state}
    torch.save(checkpoint, path)
    return path
