"""SRA (Jiang et al., self-representation alignment): a student block's tokens, through a 2-layer head, aligned
with smooth-L1 (the paper) or SRA's token-axis cosine (its code's default) to the EMA model's tokens at a later block
and a lower noise level."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from alignment.base import AlignmentMethod
from alignment.peers import SRA_OBJECTIVES, TEACHER_PRECISIONS
from loss import StepInputs, alignment_loss, interpolant
from models.heads import HeadSpec


class SraHead(nn.Module):
    """SRA's student head: Linear(d, 2d), SiLU, Linear(2d, d), with SRA's parameter names (`linear1`, `linear2`)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, 2 * hidden_size)
        self.act = nn.SiLU()
        self.linear2 = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.act(self.linear1(h)))


def teacher_times(t: torch.Tensor, t_max: float, u: torch.Tensor) -> torch.Tensor:
    """SRA's teacher time: the student's t minus a random fraction u ~ U[0, 1) of t_max, clamped to [0, 1]
    (t = 1 is noise, so the teacher sees a cleaner input)."""
    return (t - t_max * u).clamp(0, 1)


def token_axis_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SRA's `--loss-type cos`, per sample: 1 - the cosine between pred[n, :, d] and target[n, :, d] (the cosine runs
    over dim 1 of the (N, T, D) tokens, the token axis, not over features), averaged over d; in fp32."""
    with torch.autocast(device_type=pred.device.type, enabled=False):
        return (1 - F.cosine_similarity(pred.float(), target.float(), dim=1)).mean(dim=1)


class Sra(AlignmentMethod):
    name = "sra"
    log_name = "sra_loss"
    needs = frozenset({"teacher"})

    def __init__(self, student_depth: int, teacher_depth: int, t_max: float = 0.2, coeff: float = 0.2,
                 decay_after: int = 149, decay_epochs: int = 1000, objective: str = "smooth_l1", beta: float = 0.05,
                 teacher_precision: str = "fp32"):
        if objective not in SRA_OBJECTIVES:
            raise ValueError(f"SRA objective must be one of {SRA_OBJECTIVES}, got {objective!r}")
        if teacher_precision not in TEACHER_PRECISIONS:
            raise ValueError(f"SRA teacher precision must be one of {TEACHER_PRECISIONS}, got {teacher_precision!r}")
        if not 0 <= t_max <= 1:
            raise ValueError(f"SRA t_max must be in [0, 1], got {t_max}")
        self.student_depth, self.teacher_depth, self.t_max = student_depth, teacher_depth, t_max
        self.coeff, self.decay_after, self.decay_epochs = coeff, decay_after, decay_epochs
        self.objective, self.beta, self.teacher_precision = objective, beta, teacher_precision
        self.teacher_params = 0

    def head_specs(self, hidden_size: int, patch_size: int, channels: int, depth: int) -> list[HeadSpec]:
        if not 1 <= self.teacher_depth <= depth:
            raise ValueError(f"SRA teacher block must be in [1, {depth}], got {self.teacher_depth}")
        return [("sra", "ap_head", SraHead(hidden_size), self.student_depth)]

    def setup(self, device: torch.device, model: nn.Module, image_size: int | None = None,
              autocast_dtype: torch.dtype | None = None) -> None:
        """Count the teacher's forward parameters: embeddings and the blocks up to the teacher's block."""
        parts = [model.x_embedder, model.t_embedder, model.y_embedder, *model.blocks[: self.teacher_depth]]
        self.teacher_params = sum(p.numel() for part in parts for p in part.parameters())

    def external_parameters(self) -> int:
        return self.teacher_params

    def compile_blocks(self, teacher: nn.Module, **kwargs) -> int:
        """The EMA's blocks up to the teacher's block; a deep copy of the EMA (the evaluation's) is eager again."""
        blocks = teacher.blocks[: self.teacher_depth]
        for block in blocks:
            block.compile(**kwargs)
        return len(blocks)

    def weight(self, epoch: int) -> float:
        """SRA's schedule for its smooth-L1 loss: `coeff` (SRA: 2 x 0.1) until epoch `decay_after`, then a
        further factor 0.1 every `decay_epochs` epochs (0: constant)."""
        if self.decay_epochs <= 0 or epoch <= self.decay_after:
            return self.coeff
        return self.coeff * 0.1 ** ((epoch - self.decay_after) / self.decay_epochs)

    def loss(self, step: StepInputs) -> torch.Tensor:
        if step.teacher is None:
            raise ValueError("SRA needs the EMA model as its teacher")
        n = step.x.shape[0]
        t_teacher = teacher_times(step.t, self.t_max, torch.rand(step.t.shape, device=step.t.device))
        alpha, sigma, _, _ = (a.view(n, 1, 1, 1).to(step.x.dtype) for a in interpolant(t_teacher, step.path_type))
        x_teacher = alpha * step.x + sigma * step.noise  # the same clean latent, noise and (dropped) label
        fp32 = self.teacher_precision == "fp32"  # as SRA's code: its EMA model is never under autocast
        no_autocast = torch.autocast(device_type=step.x.device.type, enabled=False)
        with torch.no_grad(), no_autocast if fp32 else contextlib.nullcontext():
            if fp32:
                x_teacher, t_teacher = x_teacher.float(), t_teacher.float()
            target = step.teacher.forward_tokens(x_teacher, t_teacher, step.y, self.teacher_depth)
        pred = self.head_output(step, "sra")
        if self.objective == "cos":
            return token_axis_cosine(pred, target).mean()
        return alignment_loss(pred, target, self.objective, self.beta).mean()

    def describe(self) -> str:
        decay = (f", x0.1 per {self.decay_epochs} epochs after epoch {self.decay_after}" if self.decay_epochs > 0
                 else "")
        objective = "cos (SRA's, over the token axis)" if self.objective == "cos" else self.objective
        return (f"SRA: student block {self.student_depth} (2-layer head) -> EMA teacher block {self.teacher_depth} "
                f"(run in {'fp32' if self.teacher_precision == 'fp32' else 'autocast'}), teacher t = t - U * "
                f"{self.t_max}, {objective}, coefficient {self.coeff}{decay}")
