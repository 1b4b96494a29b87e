"""What every on-disk layout's reader gives LatentDataset, the error they raise, and their checked np.load."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np


class DatasetError(ValueError):
    """A latent dataset on disk that is missing, damaged, or disagrees with its manifest."""


REPAIR = ("Running the same preprocessing command again checks every shard against its checksum and rewrites damaged "
          "ones.")


def load_npy(path: Path, shape: tuple | None, dtype: str | None, mmap: bool, repair: str = REPAIR) -> np.ndarray:
    """np.load with the failure modes of a damaged dataset turned into DatasetError; `repair`: what to do about a
    damaged file (for our layout, the preprocessing command again)."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None)
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: missing") from e
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"{path}: cannot be read as .npy ({e}): the file is truncated or damaged. {repair}") from e
    if not isinstance(arr, np.ndarray):  # np.load opens any zip archive as an .npz (torch.save writes zips too)
        arr.close()
        raise DatasetError(f"{path}: is a zip archive (an .npz, or a torch.save file), not the single .npy array "
                           f"expected there. {repair}")
    if (shape is not None and arr.shape != tuple(shape)) or (dtype is not None and arr.dtype != dtype):
        raise DatasetError(f"{path}: holds a {arr.dtype} array of shape {arr.shape}, but the manifest says "
                           f"{dtype or arr.dtype} {tuple(shape) if shape is not None else arr.shape}")
    return arr


class LatentReader:
    """One on-disk layout, opened and checked: its manifest (our manifest.json, or one made up for a layout that
    records none), labels, and item i's posterior moments and image.

    A subclass sets root, manifest, labels, labels_source (the file the labels come from, for error messages) and
    flip (whether flipped moments exist and are used), and implements the methods that raise NotImplementedError.
    """

    root: Path
    manifest: dict
    labels: np.ndarray
    labels_source: Path
    flip: bool

    def open(self) -> None:
        """Open the stored arrays (memory maps, or RAM copies with in_memory); done again after unpickling."""
        raise NotImplementedError

    def moments(self, i: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and std of image i (float32, C x H x W), of its flipped copy with `flip`."""
        raise NotImplementedError

    def image(self, i: int, flip: bool) -> np.ndarray:
        """The uint8 (R, R, 3) center crop of image i, mirrored when its flipped latent is used."""
        raise NotImplementedError

    def stored_arrays(self, i: int) -> tuple[str, dict[str, np.ndarray]]:
        """Where image i is stored, and its stored arrays by name (for the report of non-finite values)."""
        raise NotImplementedError

    def checksummed_files(self) -> list[tuple[Path, str]] | None:
        """[(file, sha256 the manifest records)] for every file read, or None without checksums to check against."""
        return None

    def repair_command(self) -> str:
        """The preprocessing command that checks every shard and rewrites the damaged ones (from the manifest)."""
        m = self.manifest
        parts = ["python", "-m", "preprocessing.encode", "--source", str(m.get("source", "<images>")), "--dest",
                 str(self.root)]
        for key, flag in (("vae", "--vae"), ("resolution", "--resolution"), ("precision", "--precision"),
                          ("shard_size", "--shard-size"), ("scale", "--scale"), ("shift", "--shift"),
                          ("num_classes", "--num-classes")):
            if m.get(key) is not None:
                parts += [flag, str(m[key])]
        dtypes = {"float16": "fp16", "float32": "fp32"}
        if m.get("dtype") in dtypes:
            parts += ["--dtype", dtypes[m["dtype"]]]
        parts += [flag for key, flag in (("flip", "--flip"), ("images", "--save-images")) if m.get(key)]
        if m.get("posterior") == "sample":
            parts += ["--posterior", "sample", "--posterior-seed", str(m.get("posterior_seed", 0))]
        # quoted: the manifest may come from someone else, and the user pastes this into a shell
        return "`" + shlex.join(parts) + "` (add --labels FILE if the dataset was made with one)"
