"""The interface every alignment method implements, and what a training step hands to it."""

from __future__ import annotations

import torch

from loss import StepInputs  # noqa: F401  (what a step hands to a method: loss.training_loss builds it)
from models.heads import HeadSpec


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

    def compile_blocks(self, teacher: torch.nn.Module, **kwargs) -> int:
        """torch.compile in place (`Module.compile`: state-dict keys unchanged) each block this method runs beyond the
        student (SRA's EMA teacher blocks, REPA's encoder blocks), the unit the student's blocks are compiled in;
        after `setup`. `teacher` is the EMA model; `kwargs` go to torch.compile. Returns the number compiled."""
        return 0

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
