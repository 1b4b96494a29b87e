"""REPA (Yu et al., 2024): an early block's tokens, through a 3-layer MLP per encoder, aligned to a frozen DINOv2's
patch tokens of the same image by negative cosine similarity."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignment.base import AlignmentMethod
from loss import StepInputs
from models.encoders import FrozenEncoder, load_dinov2, parse_enc_type
from models.heads import HeadList, HeadSpec, build_mlp


def repa_projection_loss(preds: list[torch.Tensor], feats: list[torch.Tensor]) -> torch.Tensor:
    """Negative cosine similarity per token, averaged over tokens, samples and encoders (REPA's proj_loss), fp32."""
    with torch.autocast(device_type=preds[0].device.type, enabled=False):
        terms = [-(F.normalize(p.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(-1).mean()
                 for p, z in zip(preds, feats, strict=True)]
        return torch.stack(terms).mean()


class Repa(AlignmentMethod):
    name = "repa"
    log_name = "proj_loss"
    needs = frozenset({"images"})

    def __init__(self, enc_type: str = "dinov2-vit-b", depth: int = 8, coeff: float = 0.5,
                 projector_dim: int = 2048, enc_weights: str | None = None, enc_source: str = "timm"):
        self.specs = parse_enc_type(enc_type)
        self.enc_type, self.depth, self.coeff, self.projector_dim = enc_type, depth, coeff, projector_dim
        self.enc_weights = enc_weights.split(",") if enc_weights else [None] * len(self.specs)
        if len(self.enc_weights) != len(self.specs):
            raise ValueError(f"--enc-weights names {len(self.enc_weights)} files for {len(self.specs)} encoders")
        self.enc_source = enc_source
        self.encoders: list[FrozenEncoder] = []
        self.autocast_dtype: torch.dtype | None = None

    @property
    def z_dims(self) -> list[int]:
        return [spec.embed_dim for spec in self.specs]

    def head_specs(self, hidden_size: int, patch_size: int, channels: int, depth: int) -> list[HeadSpec]:
        heads = HeadList([build_mlp(hidden_size, self.projector_dim, z, num_layers=3) for z in self.z_dims])
        return [("repa", "projectors", heads, self.depth)]

    def setup(self, device: torch.device, model: torch.nn.Module, image_size: int | None = None,
              autocast_dtype: torch.dtype | None = None) -> None:
        """Load the encoders (eval, frozen) for images of `image_size` pixels; check their token count."""
        if image_size is None:
            raise ValueError("REPA needs the image size of the dataset")
        num_tokens = model.x_embedder.num_patches
        self.encoders = [load_dinov2(spec, image_size, weights, self.enc_source).to(device)
                         for spec, weights in zip(self.specs, self.enc_weights)]
        for spec, encoder in zip(self.specs, self.encoders):
            if encoder.num_tokens != num_tokens:
                raise ValueError(f"--enc-type {spec.name} gives {encoder.num_tokens} tokens for {image_size} px "
                                 f"images but the model has {num_tokens}: REPA needs a patch size that makes them "
                                 "equal (patch 2 on SD-VAE latents)")
        self.autocast_dtype = autocast_dtype

    def external_parameters(self) -> int:
        return sum(p.numel() for e in self.encoders for p in e.parameters())

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each encoder's patch tokens of uint8 images (N, H, W, 3), under autocast as REPA computes them."""
        enabled = self.autocast_dtype is not None
        with torch.autocast(images.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled):
            return [encoder(images) for encoder in self.encoders]

    def compile_blocks(self, teacher: torch.nn.Module, **kwargs) -> int:
        """Every transformer block of every encoder (the DINOv2 ViTs' `blocks`)."""
        blocks = [block for encoder in self.encoders for block in encoder.vit.blocks]
        for block in blocks:
            block.compile(**kwargs)
        return len(blocks)

    def weight(self, epoch: int) -> float:
        return self.coeff

    def loss(self, step: StepInputs) -> torch.Tensor:
        if step.images is None:
            raise ValueError("REPA needs the images of the batch (a dataset preprocessed with --save-images)")
        return repa_projection_loss(self.head_output(step, "repa"), self.encode(step.images))

    def describe(self) -> str:
        return (f"REPA: {self.enc_type} ({self.enc_source}), 3-layer projector (width {self.projector_dim}) after "
                f"block {self.depth}, negative cosine, coefficient {self.coeff}")

