"""Latent dataset (our shards, or REPA's vae-sd folder) and a resumable, deterministic distributed sampler."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from latent_data.format import MANIFEST
from latent_data.reader import DatasetError, LatentReader  # DatasetError: callers import it from here
from latent_data.repa import RepaReader
from latent_data.shards import ShardsReader


class LatentDataset(Dataset):
    """Pre-extracted VAE posteriors, one training example per image.

    With z = mean + std * eps (eps ~ N(0, I), a fresh posterior sample) an item is
        x      = (z + shift) * scale       the diffusion model's input
        target = (mean + shift) * scale    the posterior mean: the VAE-REPA alignment target with
                                           --vae-repa-target mean (the default target is x itself)
    with the same flip choice for both (probability 0.5 when flipped latents exist and use_flip is set).
    eps and the flip are a pure function of (seed, epoch, index): independent of the DataLoader workers and
    of the process. The epoch lives in shared memory, so set_epoch also reaches persistent workers.

    `path` is a folder written by preprocessing/encode.py (manifest.json), or REPA's layout: the folder that
    holds vae-sd/, or vae-sd/ itself (dataset.json + */img-mean-std-*.npy). Each layout has its reader in
    latent_data/ (ShardsReader, RepaReader).

    With `with_images`, an item also holds `images`: the uint8 (R, R, 3) center crop the latent came from (flipped
    with it), for REPA's encoder. Our shards store them with `--save-images` (memory-mapped, never decoded);
    REPA's layout keeps PNGs in images/ beside vae-sd/, matched by sorted file order as REPA's loader does.
    """

    def __init__(self, path: str | Path, in_memory: bool = False, use_flip: bool = True, seed: int = 0,
                 with_images: bool = False):
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.root = Path(path)
        self.in_memory, self.use_flip, self.seed, self.with_images = in_memory, use_flip, seed, with_images
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._reader = self._open_reader()
        self._reader.open()
        self.manifest, self.labels = self._reader.manifest, self._reader.labels
        if not np.issubdtype(self.labels.dtype, np.integer):
            raise DatasetError(f"{self._reader.labels_source}: labels must be integers, got {self.labels.dtype}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise DatasetError(
                f"{self._reader.labels_source}: labels span [{self.labels.min()}, {self.labels.max()}] but "
                f"num_classes is {self.num_classes}"
            )
        self._scale, self._shift = (np.asarray(v, dtype=np.float32).reshape(-1, 1, 1)
                                    for v in (self.manifest["scale"], self.manifest["shift"]))

    def _open_reader(self) -> LatentReader:
        """The reader of the layout found at self.root."""
        if (self.root / MANIFEST).is_file():
            return ShardsReader(self.root, self.in_memory, self.use_flip, self.with_images)
        for vae_dir in (self.root / "vae-sd", self.root):
            if (vae_dir / "dataset.json").is_file():
                return RepaReader(self.root, vae_dir, self.in_memory, self.with_images)
        if self.root.is_file():  # e.g. the manifest itself
            raise DatasetError(f"{self.root} is a file; expected the dataset's folder (the one holding {MANIFEST})")
        inside = sorted({str(p.parent) for pattern in (f"*/{MANIFEST}", "*/dataset.json") for p in self.root.glob(
            pattern)} | {str(p.parent.parent) for p in self.root.glob("*/vae-sd/dataset.json")})[:3]
        hint = f"; a dataset is one level down, in {', '.join(inside)}: name that folder" if inside else ""
        if not hint and self.root.is_dir() and _holds_class_folders_of_images(self.root):
            hint = ("; it holds images in class folders: encode them first (python -m preprocessing.encode "
                    f"--source {self.root} --dest DEST), then pass DEST")
        raise DatasetError(f"{self.root}: no {MANIFEST} (a folder written by preprocessing/encode.py) and no "
                           f"vae-sd/dataset.json or dataset.json (REPA's layout){hint}")

    # -- verification --------------------------------------------------------------------------------------

    def checksummed_files(self) -> list[tuple[Path, str]] | None:
        """[(file, sha256 the manifest records)] for every file this dataset reads, or None when there are no
        checksums to check against (REPA's layout; a manifest written without them)."""
        return self._reader.checksummed_files()

    def repair_command(self) -> str:
        """The preprocessing command that checks every shard and rewrites the damaged ones (from the manifest)."""
        return self._reader.repair_command()

    def nonfinite_report(self, index: int) -> str:
        """Where image `index` comes from, and which of its stored arrays hold NaN or infinity."""
        where, arrays = self._reader.stored_arrays(index)
        bad = [f"{name} ({int((~np.isfinite(a)).sum())} values)" for name, a in arrays.items()
               if not np.isfinite(a).all()]
        return f"image {index} ({where}): non-finite in " + (", ".join(bad) if bad else "none of its stored arrays")

    # -- properties ----------------------------------------------------------------------------------------

    @property
    def vae(self) -> str:
        return self.manifest["vae"]

    @property
    def scale(self) -> float | list[float]:
        """x = (z + shift) * scale: a number (SD-VAE's 0.18215), or one per channel (channel-wise normalisation:
        scale = multiplier / std, shift = -mean)."""
        return self.manifest["scale"]

    @property
    def shift(self) -> float | list[float]:
        return self.manifest["shift"]

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["latent_shape"])

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the posterior noise and flips of this epoch (call before iterating the DataLoader)."""
        self._epoch.fill_(int(epoch))

    # -- items ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int | None:
        """Side of the stored images (None without with_images)."""
        if not self.with_images:
            return None
        return int(self._reader.image(0, False).shape[0]) if len(self) else None

    def __getitem__(self, index: int) -> dict:
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        rng = np.random.default_rng([self.seed, int(self._epoch), i])
        flip = rng.random() < 0.5 and self._reader.flip  # always drawn, so eps does not depend on use_flip
        mean, std = self._reader.moments(i, flip)
        eps = rng.standard_normal(mean.shape, dtype=np.float32)
        x = (mean + std * eps + self._shift) * self._scale
        target = (mean + self._shift) * self._scale
        item = {
            "x": torch.from_numpy(x),
            "target": torch.from_numpy(target),
            "y": torch.tensor(int(self.labels[i]), dtype=torch.int64),
            "index": i,
        }
        if self.with_images:
            item["images"] = torch.from_numpy(self._reader.image(i, flip))
        return item


class ResumableDistributedSampler(Sampler[int]):
    """Deterministic shuffled split of range(num_samples) over ranks, which can start mid-epoch.

    Epoch e's global order is a permutation drawn from (seed, e), cut to a multiple of num_replicas
    (drop_last) or padded with its own first indices; rank r takes positions r, r + W, r + 2W, ...
    set_start(k) skips the first k indices of this rank's order for the current epoch; set_epoch to a
    different epoch resets it to 0.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.per_rank = num_samples // num_replicas if drop_last else math.ceil(num_samples / num_replicas)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def set_start(self, start: int) -> None:
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start {start} is not in [0, {self.per_rank}]")
        self.start = start

    def rank_order(self) -> np.ndarray:
        """This rank's full order for the current epoch (before set_start)."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        order = np.resize(order, self.per_rank * self.num_replicas)  # truncates, or repeats from the start
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_order()[self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


def _holds_class_folders_of_images(root: Path) -> bool:
    """Whether the first few entries of `root` are folders holding image files (an ImageNet-style folder given as
    --data-dir): a bounded look (a few dozen entries), for a folder of a million images; False where it cannot look."""
    from preprocessing.images import IMG_EXTENSIONS  # here: reading a dataset does not load the encoder's image side

    try:
        with os.scandir(root) as entries:
            folders = [e.path for e in itertools.islice(entries, 20) if e.is_dir()][:3]
        for folder in folders:
            with os.scandir(folder) as entries:
                if any(Path(e.name).suffix.lower() in IMG_EXTENSIONS for e in itertools.islice(entries, 20)):
                    return True
    except OSError:
        return False
    return False
