"""Samplers: Euler / Heun probability-flow ODE and REPA's Euler-Maruyama SDE, with a guidance interval.

Integration runs in float64 from t = 1 (noise) to t = 0 (data). Calls follow REPA's `euler_sampler` /
`euler_maruyama_sampler` (model, latents, y, num_steps, heun, cfg_scale, guidance_low, guidance_high,
path_type); the model is called as `model(x, t, y=y)[0]` in the dtype of `latents`. Classifier-free
guidance doubles the batch only for grid times t with guidance_low <= t <= guidance_high; `cfg_channels` N guides
only channels 0..N-1, the others take the conditional output (LightningDiT's forward_with_cfg, N = 3).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from loss import interpolant


def null_class_of(model: Callable) -> int:
    """The null (unconditional) class of a model, unwrapping DDP (`.module`) and compile (`._orig_mod`)."""
    while not hasattr(model, "num_classes") and (hasattr(model, "module") or hasattr(model, "_orig_mod")):
        model = getattr(model, "module", None) or model._orig_mod
    if not hasattr(model, "num_classes"):
        raise ValueError("cannot find the model's null class: pass null_class= explicitly")
    return int(model.num_classes)


def randn(
    shape: tuple[int, ...],
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Standard normal noise; with a list of generators, row b comes from generators[b] (drawn where that
    generator lives, e.g. the CPU, so sample b's noise does not depend on its batch or device)."""
    if not isinstance(generator, (list, tuple)):
        return torch.randn(shape, dtype=dtype, device=device, generator=generator)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    noise = torch.stack([torch.randn(shape[1:], dtype=dtype, device=g.device, generator=g) for g in generator])
    if torch.device(device).type == "cuda" and noise.device.type == "cpu":
        noise = noise.pin_memory()
    return noise.to(device, non_blocking=True)


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path_type: str) -> torch.Tensor:
    """Score grad log p_t(x) of x_t = alpha x0 + sigma eps, from the velocity v = alpha' x0 + sigma' eps."""
    t = t.view(-1, *([1] * (x.ndim - 1)))
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path_type)
    # Eliminate x0 from (x, v): eps = (alpha v - alpha' x) / (alpha sigma' - alpha' sigma); score = -eps / sigma.
    return -(alpha * v - d_alpha * x) / ((alpha * d_sigma - d_alpha * sigma) * sigma)


class _GuidedVelocity:
    """Velocity (or any drift built from it) with classifier-free guidance inside a time interval."""

    def __init__(self, model, y, cfg_scale, guidance_low, guidance_high, dtype, null_class, cfg_channels=None):
        self.model, self.y, self.cfg_scale, self.dtype = model, y, cfg_scale, dtype
        self.low, self.high, self.channels = guidance_low, guidance_high, cfg_channels
        if cfg_scale > 1.0:
            self.y_null = torch.full_like(y, null_class_of(model) if null_class is None else null_class)

    def guided(self, t: float) -> bool:
        return self.cfg_scale > 1.0 and self.low <= t <= self.high

    def __call__(
        self, x: torch.Tensor, t: float, drift: Callable | None = None, guide_at: float | None = None
    ) -> torch.Tensor:
        """Model velocity at (x, t), turned into `drift(v, x, t_vec)` if given, then guided in float64.
        Guidance is on when the time `guide_at` (default t) lies in the guidance interval."""
        guided = self.guided(t if guide_at is None else guide_at)
        x_in = torch.cat([x, x]) if guided else x
        y_in = torch.cat([self.y, self.y_null]) if guided else self.y
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.float64, device=x.device)
        # t stays at least float32: a bf16 time grid would merge neighbouring steps.
        t_dtype = self.dtype if self.dtype in (torch.float32, torch.float64) else torch.float32
        out = self.model(x_in.to(self.dtype), t_in.to(t_dtype), y=y_in)[0].to(torch.float64)
        if drift is not None:
            out = drift(out, x_in, t_in)
        if guided:
            cond, uncond = out.chunk(2)
            if self.channels is None:
                out = uncond + self.cfg_scale * (cond - uncond)
            else:
                n = self.channels
                guided = uncond[:, :n] + self.cfg_scale * (cond[:, :n] - uncond[:, :n])
                out = torch.cat([guided, cond[:, n:]], dim=1)
        return out


def cast_matmul_weights(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Store the weights and biases of every Linear and Conv layer in `dtype`, in place; returns the model.

    Under `torch.autocast` to the same dtype this changes no output bit: autocast rounds those tensors to `dtype`
    before every matmul and convolution, and this does it once instead of at every call (the casts cost ~13 % of an
    SiT-XL/2 forward on an H100). Norms, embedding tables and buffers keep their dtype, so the ops autocast runs in
    float32 still get float32 parameters. Outside autocast the model would compute in `dtype`: use it only there.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
            module.to(dtype)
    return model


def matmul_weights_copy(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A deep copy of `model` whose Linear and Conv weights and biases are `dtype` (as cast_matmul_weights leaves
    them), made without a full-precision copy of them first: training's evaluation copies the EMA this way."""
    memo = {}
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
            for p in module.parameters(recurse=False):
                memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def sampling_model(model: torch.nn.Module, precision: str, compile: bool = False) -> Callable:
    """The model as the samplers should call it for `precision` ("fp32", or "bf16..." for bf16 autocast): with bf16,
    its matmul weights are stored in bf16 in place (`cast_matmul_weights`: the same outputs under autocast, less
    work); with `compile`, each block compiled in place as training compiles it (`compile_blocks`), with static
    shapes (a graph per batch size: the guided batch and the unguided one; generate.py fills a last partial batch up
    to the full size)."""
    model.eval()
    if precision.startswith("bf16"):
        cast_matmul_weights(model, torch.bfloat16)
    if compile:
        model.compile_blocks(dynamic=False)
    return model


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift of a time grid: t' = shift t / (1 + (shift - 1) t), which keeps 0 and 1 and, for shift > 1,
    spends more steps near the noise (t = 1). LightningDiT's `timestep_shift` a (its time s = 1 - t runs towards
    the data) is shift = 1 / a here: its 0.3 is 1 / 0.3 (3.3333333333333335 as a float, not 3.33)."""
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def euler_sampler(
    model: Callable,
    latents: torch.Tensor,
    y: torch.Tensor,
    num_steps: int = 20,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    null_class: int | None = None,
    time_shift: float = 1.0,
    cfg_channels: int | None = None,
) -> torch.Tensor:
    """Probability-flow ODE dx/dt = v(x, t) from t = 1 to 0 on a uniform grid (shifted by `shift_times` when
    `time_shift` != 1); Heun adds a corrector (skipped on the last step, which lands on t = 0). `path_type` is
    unused: the ODE is the same. `cfg_channels`: guide channels 0..N-1 only (None: all)."""
    velocity = _GuidedVelocity(model, y, cfg_scale, guidance_low, guidance_high, latents.dtype, null_class,
                               cfg_channels)
    t_steps = shift_times(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64), time_shift).tolist()
    x = latents.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        d_cur = velocity(x, t_cur)
        x_next = x + (t_next - t_cur) * d_cur
        if heun and i < num_steps - 1:
            # Heun's corrector keeps the guidance decision of t_cur, as REPA does.
            x_next = x + (t_next - t_cur) * 0.5 * (d_cur + velocity(x_next, t_next, guide_at=t_cur))
        x = x_next
    return x


@torch.no_grad()
def euler_maruyama_sampler(
    model: Callable,
    latents: torch.Tensor,
    y: torch.Tensor,
    num_steps: int = 20,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    null_class: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    cfg_channels: int | None = None,
) -> torch.Tensor:
    """Reverse SDE dx = [v - w/2 * score] dt + sqrt(w) dW with w(t) = 2t (REPA's sampler).

    Time grid: `num_steps` points from 1 to 0.04, then 0; the last step (0.04 -> 0) is deterministic
    (mean only). `heun` is accepted for signature compatibility and unused. Noise comes from
    `generator` when given: one generator on the latents' device, or one per sample (see `randn`).
    `cfg_channels`: guide channels 0..N-1 of the drift only (None: all).
    """
    del heun
    velocity = _GuidedVelocity(model, y, cfg_scale, guidance_low, guidance_high, latents.dtype, null_class,
                               cfg_channels)
    t_steps = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]
    x = latents.to(torch.float64)

    def drift(v: torch.Tensor, x_in: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        w = (2 * t_in).view(-1, *([1] * (x_in.ndim - 1)))
        return v - 0.5 * w * score_from_velocity(v, x_in, t_in, path_type)

    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        dt = t_next - t_cur
        x_mean = x + velocity(x, t_cur, drift) * dt
        if i == len(t_steps) - 2:
            return x_mean
        noise = randn(x.shape, generator, x.device)
        x = x_mean + (2 * t_cur) ** 0.5 * abs(dt) ** 0.5 * noise
    return x
