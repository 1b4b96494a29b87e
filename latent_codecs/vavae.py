"""VA-VAE f16d32 (LightningDiT's tokenizer) as a diffusers AutoencoderKL: config, LDM <-> diffusers keys, loading.

VA-VAE is the LDM AutoencoderKL (`ldm.modules.diffusionmodules.model`: ch 128, ch_mult (1, 1, 2, 2, 4), 2 res blocks,
attention at resolution 16, z_channels 32, double_z), 256 px -> 32 x 16 x 16. Its attention at 16 px sits inside the
last encoder level (after each res block) and the first decoder level, besides the mid block. diffusers' AutoencoderKL
expresses that with `AttnDownEncoderBlock2D` / `AttnUpDecoderBlock2D` in those levels (one head as wide as the
channels, softmax scale C^-1/2, the LDM AttnBlock), so the model is diffusers' own and only the keys are converted.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from hub_files import download_advice

# The LDM ddconfig of vavae-imagenet256-f16d32-dinov2 (LightningDiT's tokenizer/configs/vavae_f16d32.yaml).
VAVAE_F16D32 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=32,
                    resolution=256)
VAVAE_FILE = "vavae-imagenet256-f16d32-dinov2.pt"
VAVAE_REPO = "hustvl/vavae-imagenet256-f16d32-dinov2"
VAVAE_SOURCE = f"the Hugging Face repository {VAVAE_REPO} (linked from hustvl/LightningDiT)"
AUTOENCODER_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET_INV = {v: k for k, v in _RESNET.items()}
_ATTN_INV = {v: k for k, v in _ATTN.items()}


def ldm_autoencoder_config(ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                           z_channels: int, resolution: int = 256, in_channels: int = 3, out_ch: int = 3,
                           norm_num_groups: int = 32) -> dict:
    """The diffusers AutoencoderKL config of an LDM autoencoder ddconfig (double_z, embed_dim = z_channels).

    Level i works at resolution / 2^i; it holds attention blocks when that resolution is in `attn_resolutions`.
    diffusers lists the decoder's levels from the lowest resolution up, LDM indexes them from the highest.
    """
    sizes = [resolution // 2**i for i in range(len(ch_mult))]
    return dict(
        in_channels=in_channels, out_channels=out_ch,
        down_block_types=tuple("AttnDownEncoderBlock2D" if r in attn_resolutions else "DownEncoderBlock2D"
                               for r in sizes),
        up_block_types=tuple("AttnUpDecoderBlock2D" if r in attn_resolutions else "UpDecoderBlock2D"
                             for r in reversed(sizes)),
        block_out_channels=tuple(ch * m for m in ch_mult), layers_per_block=num_res_blocks,
        latent_channels=z_channels, norm_num_groups=norm_num_groups, sample_size=resolution, act_fn="silu",
        scaling_factor=1.0,  # VA-VAE latents are normalised channel-wise (latent_codecs.stats), not by one scale
    )


def build_vavae(config: Mapping = VAVAE_F16D32, **overrides):
    """A diffusers AutoencoderKL with VA-VAE's architecture (random weights); `overrides` change the ddconfig."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**ldm_autoencoder_config(**{**config, **overrides}))


def _levels(keys, pattern: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _attn_weight(value: torch.Tensor, to_conv: bool) -> torch.Tensor:
    """LDM's attention projections are 1x1 convolutions, diffusers' are Linear layers: the same matrix (norms and
    biases, 1-D, pass unchanged)."""
    if to_conv:
        return value[:, :, None, None] if value.ndim == 2 else value
    return value[:, :, 0, 0] if value.ndim == 4 else value


def ldm_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an LDM AutoencoderKL state dict (encoder./decoder./quant_conv./post_quant_conv. keys) to diffusers'."""
    levels = _levels(state, r"decoder\.up\.(\d+)\.")
    out = {}
    for key, value in state.items():
        new = key
        if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(\w+)", key):
            new = f"{m[1]}.conv_norm_out.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(\w+)", key):
            new = f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_RESNET[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(\w+)", key):
            new = f"{m[1]}.mid_block.attentions.0.{_ATTN[m[2]]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)", key):
            new = f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_RESNET[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"encoder\.down\.(\d+)\.attn\.(\d+)\.(\w+)\.(\w+)", key):
            new = f"encoder.down_blocks.{m[1]}.attentions.{m[2]}.{_ATTN[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(\w+)", key):
            new = f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)", key):
            new = f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{_RESNET[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"decoder\.up\.(\d+)\.attn\.(\d+)\.(\w+)\.(\w+)", key):
            new = f"decoder.up_blocks.{levels - 1 - int(m[1])}.attentions.{m[2]}.{_ATTN[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(\w+)", key):
            new = f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
        elif not re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.\w+|(post_)?quant_conv\.\w+", key):
            raise KeyError(f"not an LDM autoencoder key: {key!r}")
        out[new] = _attn_weight(value, to_conv=False) if ".attentions." in new else value
    return out


def diffusers_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `ldm_to_diffusers`: diffusers AutoencoderKL keys back to LDM's (attention as 1x1 convs)."""
    levels = _levels(state, r"decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, value in state.items():
        new = key
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(\w+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_RESNET_INV[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(\w+)", key):
            new = f"{m[1]}.mid.attn_1.{_ATTN_INV[m[2]]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_RESNET_INV[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.attentions\.(\d+)\.(\w+(?:\.0)?)\.(\w+)", key):
            new = f"encoder.down.{m[1]}.attn.{m[2]}.{_ATTN_INV[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_RESNET_INV[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.attentions\.(\d+)\.(\w+(?:\.0)?)\.(\w+)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.attn.{m[2]}.{_ATTN_INV[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif not re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.\w+|(post_)?quant_conv\.\w+", key):
            raise KeyError(f"not a diffusers AutoencoderKL key: {key!r}")
        out[new] = _attn_weight(value, to_conv=True) if ".attn" in new else value
    return out


def infer_ldm_config(state: Mapping[str, torch.Tensor], resolution: int = 256) -> dict:
    """The LDM ddconfig (ch, ch_mult, num_res_blocks, attn_resolutions, z_channels) that LDM-named autoencoder
    weights were made for, read off their keys and shapes: VA-VAE f16d32 gives VAVAE_F16D32, and any other LDM
    AutoencoderKL (e.g. a small one in a test) loads as well. `resolution` only names the attention levels."""
    try:
        ch = state["encoder.conv_in.weight"].shape[0]
        levels = _levels(state, r"encoder\.down\.(\d+)\.")
        blocks = _levels(state, r"encoder\.down\.0\.block\.(\d+)\.")
        ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels))
        z_channels = state["post_quant_conv.weight"].shape[0]
    except KeyError as e:
        raise KeyError(f"not LDM autoencoder weights: {e} is missing") from e
    attn = tuple(resolution // 2**i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state)
    return dict(ch=ch, ch_mult=ch_mult, num_res_blocks=blocks, attn_resolutions=attn, z_channels=z_channels,
                resolution=resolution)


def vavae_state_dict(checkpoint: Mapping) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The autoencoder's weights from a VA-VAE checkpoint, and the keys left out.

    The released file is a training checkpoint: the weights may sit under `state_dict`, beside the training loss's
    LPIPS and discriminator (`loss.`), the DINOv2 it aligned to (`foundation_model.`) and its projection
    (`linear_proj.`); only `encoder.`, `decoder.`, `quant_conv.` and `post_quant_conv.` are kept.
    """
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a state dict (or a checkpoint holding one under 'state_dict'), got {type(state)}")
    kept, dropped = {}, []
    for key, value in state.items():
        clean = key.removeprefix("module.")
        if clean.startswith(AUTOENCODER_PREFIXES) and isinstance(value, torch.Tensor):
            kept[clean] = value
        else:
            dropped.append(key)
    return kept, dropped


def load_vavae(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               trusted: bool = False, config: Mapping | None = None):
    """Load VA-VAE weights (LDM names, e.g. vavae-imagenet256-f16d32-dinov2.pt) into a frozen diffusers AutoencoderKL.

    The architecture is `config` (an LDM ddconfig such as VAVAE_F16D32), or, by default, read off the weights
    (`infer_ldm_config`), so that any LDM-format AutoencoderKL file loads.

    The file is read with `torch.load(weights_only=True)`; a file that holds other Python objects (a full training
    checkpoint) is refused unless `trusted=True`, which unpickles it: only for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"VA-VAE weights not found at {path}: {VAVAE_FILE} is in {VAVAE_SOURCE}, beside latents_stats.pt "
            "(LightningDiT's latent mean and std). " + download_advice(
                VAVAE_REPO, "--vae", (VAVAE_FILE, "latents_stats.pt"), VAVAE_FILE))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trusted, mmap=True)
    except pickle.UnpicklingError as err:
        raise RuntimeError(
            f"{path} holds Python objects besides tensors, which weights_only loading refuses. If you trust the "
            "file, load it with trusted=True (it is then unpickled, which can run code).") from err
    state, _ = vavae_state_dict(checkpoint)
    if not state:
        raise KeyError(f"{path} holds no autoencoder weights (no keys under {', '.join(AUTOENCODER_PREFIXES)})")
    vae = build_vavae(config if config is not None else infer_ldm_config(state))
    missing, unexpected = vae.load_state_dict(ldm_to_diffusers(state), strict=False)
    if missing or unexpected:
        raise KeyError(f"{path} does not match VA-VAE's architecture: missing {missing[:6]}, "
                       f"unexpected {unexpected[:6]}")
    vae = vae.to(device)
    if dtype is not None:
        vae = vae.to(dtype)
    return vae.eval().requires_grad_(False)
