"""Training objective: interpolant paths, time sampling, the velocity loss, the VAE-REPA alignment loss, and the
step inputs (StepInputs) that the alignment methods' terms read.

Time convention: t = 1 is pure noise, t = 0 is data; x_t = alpha_t x + sigma_t eps, target v = d/dt x_t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cli import ALIGN_OBJECTIVES, PATH_TYPES, WEIGHTINGS  # the flags' choices, importable without torch

LOGNORMAL_PARAMS = {"lognormal": (0.0, 1.0), "lognormal-edm": (-1.2, 1.2)}  # (mean, std) of log sigma (WEIGHTINGS)


def interpolant(t: torch.Tensor, path_type: str = "linear") -> tuple[torch.Tensor, ...]:
    """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt) for x_t = alpha_t x + sigma_t eps."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type == "cosine":
        half_pi = math.pi / 2
        return (
            torch.cos(half_pi * t),
            torch.sin(half_pi * t),
            -half_pi * torch.sin(half_pi * t),
            half_pi * torch.cos(half_pi * t),
        )
    raise ValueError(f"unknown path type {path_type!r}; choose one of {PATH_TYPES}")


def sample_time(
    n: int,
    weighting: str = "uniform",
    path_type: str = "linear",
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """n training times in [0, 1]: uniform, logit-normal, or a log-normal noise level sigma mapped onto the path.

    The log-normal choices draw log sigma ~ N(mean, std^2) (LOGNORMAL_PARAMS: REPA's N(0, 1) for "lognormal",
    EDM's N(-1.2, 1.2^2) for "lognormal-edm") and return the t at which sigma_t / alpha_t = sigma.
    "logit-normal" draws t = sigmoid(n), n ~ N(0, 1), whatever the path: LightningDiT's `use_lognorm` (its time runs
    the other way, s = 1 - t, but the law is symmetric about 1/2, so t has the same law).
    """
    if weighting == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if weighting == "logit-normal":
        return torch.sigmoid(torch.randn(n, device=device, generator=generator))
    if weighting in LOGNORMAL_PARAMS:
        p_mean, p_std = LOGNORMAL_PARAMS[weighting]
        sigma = (torch.randn(n, device=device, generator=generator) * p_std + p_mean).exp()
        return sigma / (1 + sigma) if path_type == "linear" else torch.atan(sigma) * (2 / math.pi)
    raise ValueError(f"unknown time weighting {weighting!r}; choose one of {WEIGHTINGS}")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def alignment_loss(
    pred: torch.Tensor, target: torch.Tensor, objective: str = "smooth_l1", beta: float = 0.05
) -> torch.Tensor:
    """Per-sample alignment loss between head output and target tokens, both (N, T, D), in fp32.

    smooth_l1 (elementwise, d = pred - target): 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta
    (PyTorch's definition), averaged over tokens and features. The paper's Eq. (7) prints the same quadratic
    branch but a linear branch divided by beta (|d| / beta - 1/2), which is discontinuous at |d| = beta, and a
    sum over elements; we use the continuous function and the mean (see the README), which keeps lambda = 1 on
    the scale of the velocity loss. cosine: 1 - cos(pred_k, target_k) per token, averaged over tokens.
    """
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        if objective == "smooth_l1":
            elementwise = F.smooth_l1_loss(pred, target, beta=beta, reduction="none")
        elif objective == "l1":
            elementwise = (pred - target).abs()
        elif objective == "l2":
            elementwise = (pred - target) ** 2
        elif objective == "cosine":
            elementwise = 1 - F.cosine_similarity(pred, target, dim=-1)
        else:
            raise ValueError(f"unknown alignment objective {objective!r}; choose one of {ALIGN_OBJECTIVES}")
        return mean_flat(elementwise)


def drop_labels(
    y: torch.Tensor, null_class: int, prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by the null class with probability `prob` (classifier-free guidance training)."""
    if prob <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device, generator=generator) < prob
    return torch.where(drop, torch.full_like(y, null_class), y)


@dataclass
class LossConfig:
    path_type: str = "linear"
    weighting: str = "uniform"
    cfg_prob: float = 0.1
    cos_coeff: float = 0.0  # weight of LightningDiT's velocity cosine term (0: off)

    def __post_init__(self) -> None:
        if self.path_type not in PATH_TYPES:
            raise ValueError(f"path_type must be one of {PATH_TYPES}, got {self.path_type!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not 0 <= self.cfg_prob < 1:
            raise ValueError(f"cfg_prob must be in [0, 1), got {self.cfg_prob}")
        if not (self.cos_coeff >= 0 and math.isfinite(self.cos_coeff)):
            raise ValueError(f"cos_coeff must be a finite number >= 0, got {self.cos_coeff}")

    def terms(self, methods: Sequence = ()) -> list[str]:
        """The keys of training_loss's result, in a fixed order: total, denoise, cos_loss (when on), each method's."""
        return ["total", "denoise"] + (["cos_loss"] if self.cos_coeff > 0 else []) + [m.log_name for m in methods]


@dataclass
class StepInputs:
    """What one training step knows when the alignment terms are computed.

    x: the clean latents (N, C, H, W) in diffusion space; noise and t: the draws that made x_t; y: the labels
    after label dropout (what the model saw); heads: the student's head outputs (`SiT.forward`'s dict).
    The rest is there when some enabled method asked for it (`needs`): `posterior_mean` (same shape as x),
    `images` (uint8, N x H x W x 3, the ADM center crops the latents came from), `teacher` (the EMA model).
    """

    x: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    heads: dict
    path_type: str = "linear"
    epoch: int = 0
    posterior_mean: torch.Tensor | None = None
    images: torch.Tensor | None = None
    teacher: torch.nn.Module | None = None
    extra: dict = field(default_factory=dict)


def training_loss(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: LossConfig,
    null_class: int,
    methods: Sequence = (),
    generator: torch.Generator | None = None,
    **step_inputs,
) -> dict[str, torch.Tensor]:
    """The loss of a batch of clean (scaled) latents x (N, C, H, W) and labels y (N,): the velocity MSE plus each
    alignment method's weighted term (Eq. 8 for VAE-REPA alone).

    `methods` are alignment.AlignmentMethod objects; `step_inputs` go to them (posterior_mean, images, teacher,
    epoch: see alignment.StepInputs). Returns scalars `total` (what to backpropagate), `denoise` (velocity MSE:
    mean over C, H, W, then over the batch), `cos_loss` when `config.cos_coeff` > 0 (LightningDiT's term:
    1 - cos(v_pred, v) over channels at each position, averaged) and one unweighted term per method under its
    `log_name`.
    """
    n = x.shape[0]
    t = sample_time(n, config.weighting, config.path_type, x.device, generator)
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    y = drop_labels(y, null_class, config.cfg_prob, generator)

    alpha, sigma, d_alpha, d_sigma = (a.view(n, 1, 1, 1).to(x.dtype) for a in interpolant(t, config.path_type))
    x_t = alpha * x + sigma * noise
    v_target = d_alpha * x + d_sigma * noise

    v_pred, heads = model(x_t, t, y, return_heads=bool(methods))
    denoise = mean_flat((v_pred.float() - v_target.float()) ** 2).mean()

    out = {"denoise": denoise.detach()}
    total = denoise
    if config.cos_coeff > 0:
        with torch.autocast(device_type=x.device.type, enabled=False):
            cos = mean_flat(1 - F.cosine_similarity(v_pred.float(), v_target.float(), dim=1)).mean()
        total = total + config.cos_coeff * cos
        out["cos_loss"] = cos.detach()
    if methods:
        step = StepInputs(x=x, noise=noise, t=t, y=y, heads=heads, path_type=config.path_type, **step_inputs)
        for method in methods:
            term = method.loss(step)
            total = total + method.weight(step.epoch) * term
            out[method.log_name] = term.detach()
    out["total"] = total
    return out
