"""torch-fidelity's TF-compatible InceptionV3, returning the three feature sets ADM's evaluator reads."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import numpy as np
import torch
from torch import nn
from torch.hub import load_state_dict_from_url
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from tqdm.auto import tqdm

from evaluations import INCEPTION_WEIGHTS_ENV
from evaluations.data import EvaluationError, ImageSource
from evaluations.metrics import strict_fp32

WEIGHTS_ENV = INCEPTION_WEIGHTS_ENV  # defined without torch, for the command lines
WEIGHTS_URL = URL_INCEPTION_V3
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
SPATIAL_CHANNELS = 7
POOL_DIM, SPATIAL_DIM, LOGITS_DIM = 2048, 17 * 17 * SPATIAL_CHANNELS, 1008


def cached_weights_path() -> Path:
    """Where torch-fidelity's download lands (torch.hub's checkpoint cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def weights_help() -> str:
    return (
        f"Get {WEIGHTS_FILE} from {WEIGHTS_URL} (torch-fidelity's port of TF's inception-2015-12-05 graph, "
        f"the network of ADM's evaluator) and pass it with --inception-weights PATH or the {WEIGHTS_ENV} "
        f"environment variable, or put it at {cached_weights_path()}."
    )


def resolve_weights(path: str | os.PathLike | None = None) -> str | None:
    """A local weights file (argument, then $VAE_REPA_INCEPTION_WEIGHTS, then torch.hub's cache), or None."""
    if path is None:
        path = os.environ.get(WEIGHTS_ENV) or None
    if path is not None:
        if not Path(path).is_file():
            raise EvaluationError(f"Inception weights not found: {path}. {weights_help()}")
        return str(path)
    cached = cached_weights_path()
    return str(cached) if cached.is_file() else None


def read_weights(path: str | None) -> dict:
    """The Inception state dict from `path` (None: torch.hub's download), read with weights_only=True.

    torch-fidelity itself reads a weights file with weights_only=False, which would run code a crafted file names.
    """
    try:
        if path is None:
            return load_state_dict_from_url(WEIGHTS_URL, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        where = path or f"the download of {WEIGHTS_URL}"
        if "Weights only load failed" not in str(exc):
            raise EvaluationError(f"could not read Inception weights {where} ({exc})") from exc
        try:
            found = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) if path else ""
        except Exception:  # noqa: BLE001 - an old-format file: nothing more to name
            found = ""
        raise EvaluationError(
            f"Inception weights {where} hold {found or 'objects that are not tensors'}: reading them would run code "
            f"from the file, so it was not opened (the real file is a plain state dict). {weights_help()}"
        ) from None
    except Exception as exc:
        if path is None:
            raise EvaluationError(f"could not download the Inception weights ({exc}). {weights_help()}") from exc
        raise EvaluationError(f"could not load Inception weights from {path}: {exc}") from exc


def _extractor_without_weights(name: str, features: list[str]) -> FeatureExtractorInceptionV3:
    """torch-fidelity's network with its weights left unloaded (they are read by `read_weights`)."""
    with (
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"),
        mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={}),
    ):
        return FeatureExtractorInceptionV3(name, features)


class Features(NamedTuple):
    """Per-image features, float32: pool_3 (N, 2048), mixed_6/conv[..., :7] (N, 2023), logits (N, 1008)."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray


class InceptionFeatures(nn.Module):
    """uint8 (N, 3, H, W) images -> ADM's pool_3 (FID, precision/recall), spatial (sFID) and logit features.

    torch-fidelity's extractor does what the TF graph does after ADM's input: a TF1-style bilinear resize to
    299x299 (align_corners=False) of the float image, then (x - 128) / 128. `logits_unbiased` is pool_3 times
    the softmax weights without the bias, as ADM computes them from `softmax/logits/MatMul`'s weights.
    """

    def __init__(self, weights: str | os.PathLike | None = None):
        super().__init__()
        path = resolve_weights(weights)
        self.net = _extractor_without_weights("inception-v3-compat", ["2048", "logits_unbiased"])
        state = read_weights(path)
        try:
            self.net.load_state_dict(state)
        except (RuntimeError, KeyError) as exc:
            raise EvaluationError(f"Inception weights {path or WEIGHTS_URL} do not fit the network: {exc}") from exc
        self.weights = path or WEIGHTS_URL
        # ADM reads "mixed_6/conv:0" of the 2015 TF graph. That scope holds the ops Conv2D, conv2d_params
        # and batchnorm (torch-fidelity's converter maps mixed_6/conv/{conv2d_params,batchnorm} onto
        # Mixed_6d.branch1x1.{conv,bn}); the op named "mixed_6/conv" itself is the ReLU closing the scope,
        # whose output mixed_6/join concatenates. So the feature is post-activation: the output of
        # BasicConv2d (conv -> BN -> ReLU), which a forward hook on the module receives.
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)
        self._spatial: torch.Tensor | None = None

    def _keep_spatial(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # ADM flattens the NHWC tensor spatial[..., :7]: index (h * 17 + w) * 7 + c.
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._spatial = None
        pool, logits = self.net(images)
        spatial, self._spatial = self._spatial, None
        return pool, spatial, logits


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def extract_features(
    model: InceptionFeatures,
    images: ImageSource,
    *,
    batch_size: int = 250,
    device: str | torch.device | None = None,
    desc: str | None = None,
    progress: bool = True,
    on_batch: Callable[[int, np.ndarray], None] | None = None,
) -> Features:
    """Run `model` over all images in order; `on_batch(first_index, batch)` sees each uint8 NHWC batch."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    n = len(images)
    feats = Features(
        np.empty((n, POOL_DIM), np.float32),
        np.empty((n, SPATIAL_DIM), np.float32),
        np.empty((n, LOGITS_DIM), np.float32),
    )
    start = 0
    with strict_fp32(), tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        for batch in images.batches(batch_size):
            stop = start + len(batch)
            if stop > n:
                raise EvaluationError(f"{images.name}: more images than announced ({n})")
            if on_batch is not None:
                on_batch(start, batch)
            x = torch.from_numpy(batch).to(device, non_blocking=True).permute(0, 3, 1, 2)
            for out, value in zip(feats, model(x)):
                out[start:stop] = value.cpu().numpy()
            start = stop
            bar.update(len(batch))
    if start != n:
        raise EvaluationError(f"{images.name}: read {start} images, expected {n}")
    return feats


def write_random_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Save random weights in the layout of the real file, for tests and timing (their metrics mean nothing).

    Convolutions are He-initialised so that activations stay of order one through the network.
    """
    net = _extractor_without_weights("random-inception", ["2048"])
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in net.state_dict().items():
        if name.endswith("conv.weight"):
            value = torch.randn(value.shape, generator=gen) * (2.0 / value[0].numel()) ** 0.5
        elif name.endswith("bn.bias"):
            value = torch.rand(value.shape, generator=gen) * 0.2
        elif name == "fc.weight":
            value = torch.randn(value.shape, generator=gen) * 0.1
        elif name == "fc.bias":
            value = torch.randn(value.shape, generator=gen) * 10  # large, so that a biased logit would show
        state[name] = value
    torch.save(state, path)
    return Path(path)
