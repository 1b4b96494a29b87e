"""Backbones with alignment heads: SiT and LightningDiT, built by their registry names (models/registry.py).

Importing the package (and models.registry) does not import torch, so that the command lines can list the models
before parsing; the backbones' modules are imported on first use."""

import importlib

from models.registry import MODEL_NAMES, model_config, model_family, model_size

# name -> module that defines it, imported when the name is first used
_LAZY = {"LightningDiT": "models.lightningdit", "build_lightningdit": "models.lightningdit", "SiT": "models.sit",
         "patchify": "models.sit", "unpatchify": "models.sit"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")


def build_model(name: str, qk_norm: bool | None = None, vae_head_layers: int | None = None, **kwargs):
    """Build any registry model (`SiT-XL/2`, `LightningDiT-XL/1`); keyword arguments (not None) override the size's
    defaults. `qk_norm` is each family's qk-norm switch; `vae_head_layers` is SiT's built-in VAE-REPA head (0: none,
    the alignment methods attach theirs through `heads=`), which LightningDiT does not have."""
    if model_family(name) == "LightningDiT":
        from models.lightningdit import build_lightningdit

        if vae_head_layers:
            raise ValueError(f"{name}: alignment heads attach through heads=, not vae_head_layers")
        return build_lightningdit(name, use_qknorm=qk_norm, **kwargs)
    from models.sit import build_model as build_sit

    return build_sit(name, qk_norm=qk_norm, vae_head_layers=vae_head_layers, **kwargs)


__all__ = ["MODEL_NAMES", "LightningDiT", "SiT", "build_model", "model_config", "model_family", "model_size",
           "patchify", "unpatchify"]
