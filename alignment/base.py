"""The interface every alignment method implements, and what a training step hands to it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.heads import HeadSpec


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


class AlignmentMethod:
    """One alignment method: the heads it adds to the model, what it needs from the batch, its loss term.

    The training loop calls `setup` once (frozen encoders move to the device there), `head_specs` when the
    model is built, and `loss` every step; the term is logged as `log_name` and enters the total loss with
    weight `weight(epoch)`. Nothing in the loop names a method.
    """

    name: str = ""
    log_name: str = ""
    needs: frozenset[str] = frozenset()  # of "posterior_mean", "images", "teacher"

    def head_specs(self, hidden_size: int, patch_size: int, channels: int, depth: int) -> list[HeadSpec]:
        raise NotImplementedError

    def setup(self, device: torch.device, model: torch.nn.Module, image_size: int | None = None,
              autocast_dtype: torch.dtype | None = None) -> None:
        """Load what the method needs beyond the model (external encoders); training only. `model` is the
        student (unwrapped), `image_size` the side of the dataset's images, `autocast_dtype` the training's."""

    def weight(self, epoch: int) -> float:
        raise NotImplementedError

    def loss(self, step: StepInputs) -> torch.Tensor:
        """The unweighted term, a scalar."""
        raise NotImplementedError

    def head_output(self, step: StepInputs, key: str):
        """The output of this method's head `key`; a clear error when the model was built without it."""
        if key not in step.heads:
            raise RuntimeError(f"{self.name} is on but the model has no {key!r} head (no {self.name} head was built)")
        return step.heads[key]

    def describe(self) -> str:
        """One line for the log: the settings that define the method here."""
        return self.name

    def external_parameters(self) -> int:
        """Parameters outside the trained model that each step runs forward (encoder or teacher part)."""
        return 0
