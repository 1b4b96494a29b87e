"""Frozen external encoders for REPA: DINOv2 (with or without registers) through timm, fed as REPA feeds it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from hub_files import download_advice, hub_or_cache

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# REPA's --enc-type size letter -> (timm architecture without registers, embedding width)
DINOV2_SIZES = {"s": ("vit_small_patch14_dinov2", 384), "b": ("vit_base_patch14_dinov2", 768),
                "l": ("vit_large_patch14_dinov2", 1024), "g": ("vit_giant_patch14_dinov2", 1536)}


class EncoderError(ValueError):
    """An --enc-type that is not supported, or weights that cannot be found or loaded."""


@dataclass(frozen=True)
class EncoderSpec:
    """One entry of REPA's `--enc-type`, e.g. 'dinov2-vit-b' or 'dinov2reg-vit-l' (with 4 registers)."""

    name: str
    size: str
    registers: bool

    @property
    def timm_name(self) -> str:
        arch = DINOV2_SIZES[self.size][0]
        return arch.replace("_dinov2", "_reg4_dinov2") if self.registers else arch

    @property
    def hub_name(self) -> str:
        return f"dinov2_vit{self.size}14{'_reg' if self.registers else ''}"

    @property
    def embed_dim(self) -> int:
        return DINOV2_SIZES[self.size][1]


def parse_enc_type(enc_type: str) -> list[EncoderSpec]:
    """REPA's comma-separated `--enc-type` ('<type>-<architecture>-<size>') -> specs; DINOv2 only."""
    specs = []
    for name in enc_type.split(","):
        parts = name.strip().split("-")
        known = len(parts) == 3 and parts[0] in ("dinov2", "dinov2reg") and parts[1] == "vit"
        if not known or parts[2] not in DINOV2_SIZES:
            raise EncoderError(f"--enc-type {name!r}: supported are dinov2-vit-{{s,b,l,g}} and "
                               "dinov2reg-vit-{s,b,l,g} (REPA's MoCo v3, CLIP, MAE, I-JEPA and DINOv1 are not "
                               "built in)")
        specs.append(EncoderSpec(name.strip(), parts[2], parts[0] == "dinov2reg"))
    return specs


class FrozenEncoder(nn.Module):
    """uint8 images (N, H, W, 3) -> patch tokens (N, T, D), as REPA's training loop computes them: pixels / 255,
    ImageNet normalisation, bicubic resize to 224 * (H // 256), then the final-norm patch tokens (class and
    register tokens dropped). Eval mode, no gradients."""

    def __init__(self, vit: nn.Module, image_size: int):
        super().__init__()
        if image_size < 256 or image_size % 256:
            raise EncoderError(f"REPA's encoders take 256 * k pixel images, got {image_size}")
        self.vit = vit.eval().requires_grad_(False)
        self.input_size = 224 * (image_size // 256)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def num_tokens(self) -> int:
        return (self.input_size // 14) ** 2

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)  # always eval

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        x = (x - self.mean) / self.std
        x = F.interpolate(x, self.input_size, mode="bicubic")
        out = self.vit.forward_features(x)
        if isinstance(out, dict):  # torch.hub's DINOv2
            return out["x_norm_patchtokens"]
        return out[:, self.vit.num_prefix_tokens:]


def _check_image_size(spec: EncoderSpec, image_size: int) -> None:
    """REPA resizes 256 * k pixel images to 224 * k for DINOv2; anything smaller has no grid to resize to."""
    if image_size < 256:
        raise EncoderError(f"--enc-type {spec.name}: the dataset's images are {image_size} x {image_size} pixels, "
                           "smaller than the 256 x 256 that REPA's encoders take (resized to DINOv2's 224 x 224 "
                           "input); preprocess the images at --resolution 256 (or 512) with --save-images")
    if image_size % 256:
        raise EncoderError(f"--enc-type {spec.name}: the dataset's images are {image_size} x {image_size} pixels; "
                           "REPA's encoders take 256 * k pixel images (resized to 224 * k for DINOv2's patch 14)")


def read_encoder_weights(path: Path, vit: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a DINOv2 weights file for `vit`, read without running code from it (safetensors, or a
    plain torch file of tensors): timm's layout or DINOv2's own (dinov2_vit*14_pretrain.pth), converted and its
    position embedding resampled to `vit`'s grid by timm's filter for ViT checkpoints."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    from checkpoints import load_plain_file

    expected = "DINOv2 weights (timm's model.safetensors, or a file of tensors only)"
    try:
        state = load_plain_file(path, expected)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in
                                                  state.get("model", state.get("state_dict", state)).values()):
            raise ValueError(f"{path}: holds a {type(state).__name__} that is not a dict of tensors; expected "
                             f"{expected}")
        return checkpoint_filter_fn(state, vit)
    except ValueError as e:
        raise EncoderError(f"--enc-weights {e}") from e
    except Exception as e:  # noqa: BLE001 - a key layout timm's filter does not know: one line naming the file
        raise EncoderError(f"--enc-weights {path}: not {expected} ({type(e).__name__}: {str(e)[:200]})") from e


def load_dinov2(spec: EncoderSpec, image_size: int, weights: str | None = None, source: str = "timm") -> FrozenEncoder:
    """DINOv2 with its position embedding resampled to the 16 x 16 (k = 1) grid, as REPA does.

    source 'timm' (default): timm's architecture and its safetensors weights, from `weights` (a local file, read
    here without running code from it; timm is given the tensors) or the Hugging Face hub cache/download. source
    'hub': torch.hub's facebookresearch/dinov2, REPA's own path, which runs that repository's code; its position
    embedding is resampled with timm's function, as REPA does.
    """
    import timm

    _check_image_size(spec, image_size)
    grid = (224 * (image_size // 256)) // 14
    if source == "hub":
        from timm.layers import resample_abs_pos_embed

        try:
            vit = torch.hub.load("facebookresearch/dinov2", spec.hub_name)
        except Exception as e:  # noqa: BLE001 - any failure to fetch or build is reported as one line
            raise EncoderError(f"torch.hub could not load facebookresearch/dinov2 {spec.hub_name} ({e})") from e
        vit.pos_embed.data = resample_abs_pos_embed(vit.pos_embed.data, [grid, grid])
        vit.head = nn.Identity()
        return FrozenEncoder(vit, image_size)
    if source != "timm":
        raise EncoderError(f"--enc-source must be timm or hub, got {source!r}")
    kwargs = {"img_size": grid * 14, "num_classes": 0}
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise EncoderError(f"--enc-weights {weights}: no such file")
        vit = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        state = read_encoder_weights(path, vit)
        try:
            vit.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise EncoderError(f"--enc-weights {path}: not the weights of {spec.timm_name} (--enc-type {spec.name}): "
                               f"{' '.join(str(e).split())[:300]}") from e
        return FrozenEncoder(vit, image_size)
    repo = f"timm/{spec.timm_name}.lvd142m"
    with hub_or_cache() as note:
        try:
            vit = timm.create_model(f"{spec.timm_name}.lvd142m", pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - offline, missing or damaged weights all end here
            raise EncoderError(
                f"cannot load the DINOv2 weights for --enc-type {spec.name} ({type(e).__name__}: {str(e)[:200]}). "
                f"{note}{download_advice(repo, '--enc-weights', ('model.safetensors',), 'model.safetensors')}"
            ) from e
    return FrozenEncoder(vit, image_size)
