"""VAE-REPA (the paper's Eq. 7-8): an early block's tokens, through an MLP head, pulled toward the clean VAE
latent patch of the same token with smooth-L1."""

from __future__ import annotations

import torch

from alignment.base import AlignmentMethod
from cli import VAE_REPA_TARGETS as TARGETS
from loss import ALIGN_OBJECTIVES, StepInputs, alignment_loss
from models.heads import HeadSpec, build_mlp
from models.sit import patchify


class VaeRepa(AlignmentMethod):
    name = "vae-repa"
    log_name = "vae_repa_loss"

    def __init__(self, depth: int, coeff: float = 1.0, objective: str = "smooth_l1", beta: float = 0.05,
                 t_range: tuple[float, float] = (0.0, 1.0), target: str = "latent", head_layers: int = 5,
                 head_width: int | None = None):
        if objective not in ALIGN_OBJECTIVES:
            raise ValueError(f"VAE-REPA objective must be one of {ALIGN_OBJECTIVES}, got {objective!r}")
        if target not in TARGETS:
            raise ValueError(f"VAE-REPA target must be one of {TARGETS}, got {target!r}")
        low, high = t_range
        if not 0 <= low <= high <= 1:
            raise ValueError(f"VAE-REPA time range must satisfy 0 <= low <= high <= 1, got [{low}, {high}]")
        if head_layers < 1:
            raise ValueError(f"VAE-REPA head needs at least one layer, got {head_layers}")
        self.depth, self.coeff, self.objective, self.beta = depth, coeff, objective, beta
        self.t_range, self.target, self.head_layers, self.head_width = (low, high), target, head_layers, head_width
        self.needs = frozenset({"posterior_mean"}) if target == "mean" else frozenset()

    def head_specs(self, hidden_size: int, patch_size: int, channels: int, depth: int) -> list[HeadSpec]:
        head = build_mlp(hidden_size, self.head_width or 2 * hidden_size, patch_size**2 * channels, self.head_layers)
        return [("vae", "vae_projector", head, self.depth)]

    def weight(self, epoch: int) -> float:
        return self.coeff

    def loss(self, step: StepInputs) -> torch.Tensor:
        pred = self.head_output(step, "vae")
        clean = step.posterior_mean if self.target == "mean" else step.x
        if clean is None:
            raise ValueError("the VAE-REPA target 'mean' needs the posterior mean of each latent")
        patch = int(round((pred.shape[-1] / clean.shape[1]) ** 0.5))
        per_sample = alignment_loss(pred, patchify(clean, patch), self.objective, self.beta)
        if self.t_range != (0.0, 1.0):  # samples outside the range add zero; the others keep weight lambda
            low, high = self.t_range
            per_sample = per_sample * ((step.t >= low) & (step.t <= high))
        return per_sample.mean()

    def describe(self) -> str:
        return (f"VAE-REPA: {self.head_layers}-layer head after block {self.depth}, {self.objective}"
                f"{f' (beta {self.beta})' if self.objective == 'smooth_l1' else ''}, target {self.target}, "
                f"t in [{self.t_range[0]}, {self.t_range[1]}], lambda {self.coeff}")
