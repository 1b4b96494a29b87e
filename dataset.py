"""Latent dataset (our shards, or REPA's vae-sd folder) and a resumable, deterministic distributed sampler."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

FORMAT = "vae-repa-latents"
# REPA's encoder defaults to sd-vae-ft-mse; ft-EMA and ft-MSE share the original kl-f8 encoder (only the
# decoder was fine-tuned), so the stored latents are those of sd-vae-ft-ema as well.
REPA_DEFAULTS = {"vae": "stabilityai/sd-vae-ft-ema", "scale": 0.18215, "shift": 0.0}


class DatasetError(ValueError):
    """A latent dataset on disk that is missing, damaged, or disagrees with its manifest."""


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
    holds vae-sd/, or vae-sd/ itself (dataset.json + */img-mean-std-*.npy).

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
        self._data = None
        if (self.root / "manifest.json").is_file():
            self._open_manifest()
        elif (self.root / "vae-sd" / "dataset.json").is_file():
            self._open_repa(self.root / "vae-sd")
        elif (self.root / "dataset.json").is_file():
            self._open_repa(self.root)
        else:
            raise DatasetError(
                f"{self.root}: no manifest.json (a folder written by preprocessing/encode.py) and no "
                "vae-sd/dataset.json or dataset.json (REPA's layout)"
            )
        self._data = self._open_data()
        if not np.issubdtype(self.labels.dtype, np.integer):
            raise DatasetError(f"{self._labels_source}: labels must be integers, got {self.labels.dtype}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise DatasetError(
                f"{self._labels_source}: labels span [{self.labels.min()}, {self.labels.max()}] but num_classes "
                f"is {self.num_classes}"
            )

    # -- opening -------------------------------------------------------------------------------------------

    def _open_manifest(self) -> None:
        path = self.root / "manifest.json"
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path}: cannot be read as JSON ({e})") from e
        if m.get("format") != FORMAT:
            raise DatasetError(f"{path}: format is {m.get('format')!r}, expected {FORMAT!r}")
        if not m.get("complete"):
            raise DatasetError(
                f"{path}: the preprocessing has not finished (complete is false). Run the same "
                "preprocessing/encode.py command again: it resumes where it stopped."
            )
        for key in ("scale", "shift", "dtype", "latent_shape", "num_images", "num_classes", "shards"):
            if key not in m:
                raise DatasetError(f"{path}: {key!r} is missing")
        if len(m["latent_shape"]) != 3:
            raise DatasetError(f"{path}: latent_shape must be [C, H, W], got {m['latent_shape']}")
        for key in ("scale", "shift"):  # a number, or one per channel (channel-wise normalisation)
            value = m[key]
            values = value if isinstance(value, list) else [value]
            ok = len(values) in (1, m["latent_shape"][0]) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
            if not ok or key == "scale" and 0 in values:
                raise DatasetError(f"{path}: {key} must be a finite{' non-zero' if key == 'scale' else ''} number "
                                   f"or a list of one per channel ({m['latent_shape'][0]}), got {value!r}")
        kinds = ["mean", "std"] + (["flip-mean", "flip-std"] if m.get("flip") and self.use_flip else [])
        if self.with_images:
            if not m.get("images"):
                raise DatasetError(f"{path}: the dataset holds no images, which REPA's encoder needs. Preprocess "
                                   "with --save-images (into a new --dest; 196 KB per 256 px image)")
            kinds.append("images")
        try:
            counts = [int(shard["count"]) for shard in m["shards"]]
            self._shard_files = [{kind: self.root / shard["files"][kind] for kind in kinds} for shard in m["shards"]]
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{path}: every entry of 'shards' needs a count and the files {kinds} ({e!r})") from e
        if sum(counts) != m["num_images"]:
            raise DatasetError(f"{path}: the shards hold {sum(counts)} images in all but num_images is "
                               f"{m['num_images']}")
        self.manifest = m
        self._set_normalisation()
        self._repa_files = None
        self._flip = "flip-mean" in kinds
        self._offsets = np.cumsum([0] + counts)
        self._labels_source = self.root / m.get("labels", "labels.npy")
        self.labels = self._load(self._labels_source, (m["num_images"],), None, mmap=False)

    def _open_repa(self, vae_dir: Path) -> None:
        meta_path = vae_dir / "dataset.json"
        try:
            entries = json.loads(meta_path.read_text())["labels"]
            table = {str(rel).replace("\\", "/"): label for rel, label in entries}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{meta_path}: expected {{\"labels\": [[relative_path, label], ...]}} ({e})") from e
        # REPA's loader sorts every .npy path under vae-sd/ and looks its label up in dataset.json.
        files = sorted(p.relative_to(vae_dir).as_posix() for p in vae_dir.rglob("*.npy"))
        if not files:
            raise DatasetError(f"{vae_dir}: no .npy files (expected */img-mean-std-*.npy)")
        missing = [f for f in files if f not in table]
        if missing:
            raise DatasetError(f"{meta_path}: no label for {vae_dir / missing[0]} ({len(missing)} files without one)")
        if len(table) != len(files):
            raise DatasetError(f"{meta_path}: lists {len(table)} files but {vae_dir} holds {len(files)} .npy files")
        first = self._load(vae_dir / files[0], None, None, mmap=True)
        shape = first.shape[1:] if first.ndim == 4 and first.shape[0] == 1 else first.shape
        if len(shape) != 3 or shape[0] % 2:
            raise DatasetError(f"{vae_dir / files[0]}: expected a (2C, H, W) array (mean and std), got {first.shape}")
        self._repa_files = [vae_dir / f for f in files]
        self._repa_images = self._list_repa_images(vae_dir.parent / "images", len(files)) if self.with_images else None
        self._flip = False
        self._labels_source = meta_path
        try:
            self.labels = np.array([table[f] for f in files])
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{meta_path}: labels must be integers ({e})") from e
        channels, height, width = shape[0] // 2, shape[1], shape[2]
        self.manifest = {
            "format": "repa",
            **REPA_DEFAULTS,
            "dtype": str(first.dtype),
            "latent_shape": [channels, height, width],
            "num_images": len(files),
            "num_classes": int(self.labels.max()) + 1 if np.issubdtype(self.labels.dtype, np.integer) else 0,
            "resolution": 8 * height,
            "flip": False,
            "source": str(vae_dir),
        }
        self._set_normalisation()

    @staticmethod
    def _list_repa_images(folder: Path, count: int) -> list[Path]:
        """REPA's images/ folder: PNGs (any PIL format) in sorted order, one per latent file."""
        if not folder.is_dir():
            raise DatasetError(f"{folder}: missing; REPA's encoder needs the images (REPA's preprocessing writes "
                               "them beside vae-sd/)")
        exts = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
        files = sorted((p for p in folder.rglob("*") if p.suffix.lower() in exts), key=lambda p: p.as_posix())
        if len(files) != count:
            raise DatasetError(f"{folder}: holds {len(files)} images but vae-sd/ holds {count} latents")
        return files

    def _load(self, path: Path, shape: tuple | None, dtype: str | None, mmap: bool) -> np.ndarray:
        """np.load with the failure modes of a damaged dataset turned into DatasetError."""
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None)
        except FileNotFoundError as e:
            raise DatasetError(f"{path}: missing") from e
        except (OSError, ValueError, EOFError) as e:
            raise DatasetError(
                f"{path}: cannot be read as .npy ({e}): the file is truncated or damaged. Running the same "
                "preprocessing command again checks every shard against its checksum and rewrites damaged ones."
            ) from e
        if (shape is not None and arr.shape != tuple(shape)) or (dtype is not None and arr.dtype != dtype):
            raise DatasetError(f"{path}: holds a {arr.dtype} array of shape {arr.shape}, but the manifest says "
                               f"{dtype or arr.dtype} {tuple(shape) if shape is not None else arr.shape}")
        return arr

    def _open_data(self) -> list | np.ndarray | None:
        """Memory maps (or RAM copies) of every shard; for REPA's layout, RAM only (one file per image)."""
        if self._repa_files is not None:
            if not self.in_memory:
                return None
            return np.stack([self._read_repa(i) for i in range(len(self._repa_files))])
        shape, dtype = tuple(self.latent_shape), self.manifest["dtype"]
        data = []
        for files, count in zip(self._shard_files, np.diff(self._offsets)):
            arrays = {kind: self._load(path, (count, *shape), dtype, mmap=True) for kind, path in files.items()
                      if kind != "images"}
            if self.in_memory:  # the images (~50x the latents' size) stay memory-mapped
                arrays = {k: np.array(a) for k, a in arrays.items()}
            if "images" in files:
                arrays["images"] = self._load(files["images"], None, "uint8", mmap=True)
                if arrays["images"].shape[0] != count or arrays["images"].ndim != 4 or arrays["images"].shape[3] != 3:
                    raise DatasetError(f"{files['images']}: expected ({count}, R, R, 3) uint8 images, got "
                                       f"{arrays['images'].shape}")
            data.append(arrays)
        return data

    def _read_repa(self, i: int) -> np.ndarray:
        path = self._repa_files[i]
        arr = self._load(path, None, None, mmap=False)
        c, h, w = self.latent_shape
        if arr.shape not in ((2 * c, h, w), (1, 2 * c, h, w)):
            raise DatasetError(f"{path}: expected an array of shape {(2 * c, h, w)}, got {arr.shape}")
        return arr.reshape(2 * c, h, w)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if not self.in_memory:
            state["_data"] = None  # memory maps are reopened in the process that receives the dataset
        return state

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

    def _set_normalisation(self) -> None:
        self._scale, self._shift = (np.asarray(v, dtype=np.float32).reshape(-1, 1, 1)
                                    for v in (self.manifest["scale"], self.manifest["shift"]))

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

    def _image(self, i: int, flip: bool) -> np.ndarray:
        """The uint8 (R, R, 3) center crop of image i, mirrored when its flipped latent is used."""
        if self._repa_files is not None:
            from PIL import Image

            with Image.open(self._repa_images[i]) as im:
                return np.array(im.convert("RGB"))
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        image = self._data[k]["images"][i - int(self._offsets[k])]
        return np.array(image[:, ::-1] if flip else image)  # a writable copy out of the memory map

    @property
    def image_size(self) -> int | None:
        """Side of the stored images (None without with_images)."""
        if not self.with_images:
            return None
        return int(self._image(0, False).shape[0]) if len(self) else None

    def _moments(self, i: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and std of image i (float32, C x H x W)."""
        if self._repa_files is not None:
            arr = self._data[i] if self.in_memory else self._read_repa(i)
            c = self.latent_shape[0]
            return arr[:c].astype(np.float32), arr[c:].astype(np.float32)
        if self._data is None:
            self._data = self._open_data()
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        shard, j = self._data[k], i - int(self._offsets[k])
        prefix = "flip-" if flip else ""
        return shard[prefix + "mean"][j].astype(np.float32), shard[prefix + "std"][j].astype(np.float32)

    def __getitem__(self, index: int) -> dict:
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        rng = np.random.default_rng([self.seed, int(self._epoch), i])
        flip = rng.random() < 0.5 and self._flip  # always drawn, so eps does not depend on use_flip
        mean, std = self._moments(i, flip)
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
            item["images"] = torch.from_numpy(self._image(i, flip))
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
