"""The reader of our layout: manifest.json and the .npy shards written by preprocessing/encode.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from integrity import inside
from latent_data.format import FORMAT, MANIFEST, shard_kinds
from latent_data.reader import DatasetError, LatentReader, load_npy


def read_manifest(path: Path) -> dict:
    """manifest.json, checked: our format, complete, every key a reader needs, a valid shape and normalisation."""
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
    return m


def _inside(root: Path, name: object, what: str, manifest: Path) -> Path:
    """root / name, refused (DatasetError naming the entry) when the manifest's entry leads out of the folder."""
    path = inside(root, name)
    if path is None:
        raise DatasetError(f"{manifest}: its {what} {name!r} is not a file name inside {root} (an absolute path, "
                           "'..' or a link leading out of the folder); a manifest names only files in its own "
                           "folder, so nothing was read")
    return path


class ShardsReader(LatentReader):
    """Our shards: per shard, `count` rows of mean and std (and flip-mean, flip-std; images with --save-images)."""

    def __init__(self, root: Path, in_memory: bool, use_flip: bool, with_images: bool):
        path = root / MANIFEST
        m = read_manifest(path)
        if with_images and not m.get("images"):
            raise DatasetError(f"{path}: the dataset holds no images, which REPA's encoder needs. Preprocess "
                               "with --save-images (into a new --dest; 196 KB per 256 px image)")
        # a stored sample (--posterior sample): "mean" holds it, its std is 0
        kinds = shard_kinds(bool(m.get("flip")) and use_flip, with_images, m.get("posterior", "moments") != "sample")
        try:
            counts = [int(shard["count"]) for shard in m["shards"]]
            self._shard_files = [{kind: _inside(root, shard["files"][kind], f"shard {k}'s {kind!r} file", path)
                                  for kind in kinds} for k, shard in enumerate(m["shards"])]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, DatasetError):
                raise
            raise DatasetError(f"{path}: every entry of 'shards' needs a count and the files {kinds} ({e!r})") from e
        if sum(counts) != m["num_images"]:
            raise DatasetError(f"{path}: the shards hold {sum(counts)} images in all but num_images is "
                               f"{m['num_images']}")
        self.root, self.manifest, self.in_memory = root, m, in_memory
        self.flip = "flip-mean" in kinds
        self._offsets = np.cumsum([0] + counts)
        self._data: list[dict[str, np.ndarray]] | None = None
        self.labels_source = _inside(root, m.get("labels", "labels.npy"), "labels file", path)
        self.labels = load_npy(self.labels_source, (m["num_images"],), None, mmap=False)

    def open(self) -> None:
        """Memory maps (or RAM copies) of every shard; the images always stay memory-mapped."""
        shape, dtype = tuple(self.manifest["latent_shape"]), self.manifest["dtype"]
        data = []
        for files, count in zip(self._shard_files, np.diff(self._offsets)):
            arrays = {kind: load_npy(path, (count, *shape), dtype, mmap=True) for kind, path in files.items()
                      if kind != "images"}
            if self.in_memory:  # the images (~50x the latents' size) stay memory-mapped
                arrays = {k: np.array(a) for k, a in arrays.items()}
            if "images" in files:
                arrays["images"] = load_npy(files["images"], None, "uint8", mmap=True)
                if arrays["images"].shape[0] != count or arrays["images"].ndim != 4 or arrays["images"].shape[3] != 3:
                    raise DatasetError(f"{files['images']}: expected ({count}, R, R, 3) uint8 images, got "
                                       f"{arrays['images'].shape}")
            data.append(arrays)
        self._data = data

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if not self.in_memory:
            state["_data"] = None  # memory maps are reopened in the process that receives the dataset
        return state

    def _row(self, i: int) -> tuple[int, int]:
        """(shard, row in it) of image i, opening the shards first if this process has not yet."""
        if self._data is None:
            self.open()
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return k, i - int(self._offsets[k])

    def moments(self, i: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        k, j = self._row(i)
        shard, prefix = self._data[k], "flip-" if flip else ""
        mean = shard[prefix + "mean"][j].astype(np.float32)
        std = shard.get(prefix + "std")
        return mean, (np.zeros_like(mean) if std is None else std[j].astype(np.float32))

    def image(self, i: int, flip: bool) -> np.ndarray:
        k, j = self._row(i)
        image = self._data[k]["images"][j]
        return np.array(image[:, ::-1] if flip else image)  # a writable copy out of the memory map

    def stored_arrays(self, i: int) -> tuple[str, dict[str, np.ndarray]]:
        k, j = self._row(i)
        arrays = {str(self._shard_files[k][kind]): self._data[k][kind][j] for kind in self._data[k] if kind != "images"}
        return f"row {j} of shard {k}", arrays

    def checksummed_files(self) -> list[tuple[Path, str]] | None:
        """None when the manifest was written without checksums."""
        files = []
        for entry, shard in zip(self.manifest["shards"], self._shard_files):
            recorded = entry.get("sha256") or {}
            for kind, path in shard.items():
                if kind not in recorded:
                    return None
                files.append((path, recorded[kind]))
        if self.manifest.get("labels_sha256"):
            files.append((self.labels_source, self.manifest["labels_sha256"]))
        return files
