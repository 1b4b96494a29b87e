"""The reader of REPA's layout: vae-sd/ (dataset.json + */img-mean-std-*.npy), with PNG images in images/ beside it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from latent_data.format import REPA_DEFAULTS
from latent_data.reader import DatasetError, LatentReader, load_npy

# REPA's layout records no checksums, and our preprocessing does not write it.
REPAIR = ("REPA's layout records no checksums: restore the file from your copy of the dataset, or encode the images "
          "again (REPA's preprocessing, or python -m preprocessing.encode into a new folder, whose shards are "
          "checksummed)")


def list_repa_images(folder: Path, count: int) -> list[Path]:
    """REPA's images/ folder: PNGs (any PIL format) in sorted order, one per latent file."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: missing; REPA's encoder needs the images (REPA's preprocessing writes "
                           "them beside vae-sd/)")
    exts = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
    files = sorted((p for p in folder.rglob("*") if p.suffix.lower() in exts), key=lambda p: p.as_posix())
    if len(files) != count:
        raise DatasetError(f"{folder}: holds {len(files)} images but vae-sd/ holds {count} latents")
    return files


class RepaReader(LatentReader):
    """REPA's latents: one (2C, H, W) file of mean and std per image (no flips, no checksums), labelled by
    dataset.json; read from disk per item, or all into RAM with in_memory. Its manifest is made up from the
    files and REPA_DEFAULTS."""

    def __init__(self, root: Path, vae_dir: Path, in_memory: bool, with_images: bool):
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
        first = load_npy(vae_dir / files[0], None, None, mmap=True, repair=REPAIR)
        shape = first.shape[1:] if first.ndim == 4 and first.shape[0] == 1 else first.shape
        if len(shape) != 3 or shape[0] % 2:
            raise DatasetError(f"{vae_dir / files[0]}: expected a (2C, H, W) array (mean and std), got {first.shape}")
        self.root, self.in_memory, self.flip = root, in_memory, False
        self._files = [vae_dir / f for f in files]
        self._images = list_repa_images(vae_dir.parent / "images", len(files)) if with_images else None
        self._data: np.ndarray | None = None
        self.labels_source = meta_path
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

    def open(self) -> None:
        """RAM copies of every file with in_memory; nothing to open otherwise (one file per image)."""
        if self.in_memory:
            self._data = np.stack([self._read(i) for i in range(len(self._files))])

    def _read(self, i: int) -> np.ndarray:
        path = self._files[i]
        arr = load_npy(path, None, None, mmap=False, repair=REPAIR)
        c, h, w = self.manifest["latent_shape"]
        if arr.shape not in ((2 * c, h, w), (1, 2 * c, h, w)):
            raise DatasetError(f"{path}: expected an array of shape {(2 * c, h, w)}, got {arr.shape}")
        return arr.reshape(2 * c, h, w)

    def moments(self, i: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        arr = self._data[i] if self.in_memory else self._read(i)
        c = self.manifest["latent_shape"][0]
        return arr[:c].astype(np.float32), arr[c:].astype(np.float32)

    def image(self, i: int, flip: bool) -> np.ndarray:
        from PIL import Image

        with Image.open(self._images[i]) as im:
            return np.array(im.convert("RGB"))

    def stored_arrays(self, i: int) -> tuple[str, dict[str, np.ndarray]]:
        return str(self._files[i]), {"mean-std": self._read(i)}
