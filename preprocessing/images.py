"""The source images: the file list and labels of a folder (or a labels file), ADM's center crop, and the Dataset that
decodes them for the encoder's DataLoader."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from cli import UsageError
from integrity import leaving

# torchvision's ImageFolder extensions, so that the file list and the labels are the ones ImageFolder gives.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop (guided-diffusion `center_crop_arr`): BOX halving, BICUBIC resize, center crop."""
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    # Python's round() (half to even), as ADM uses it.
    pil_image = pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def load_image(path: str | os.PathLike, resolution: int) -> np.ndarray:
    """Read any PIL-readable image, convert it to RGB and center-crop it: (resolution, resolution, 3) uint8."""
    with Image.open(path) as img:
        img.load()
        return center_crop_arr(img.convert("RGB"), resolution)


class ImageFiles(Dataset):
    """Center-cropped source images; an unreadable file gives its error message instead of pixels."""

    def __init__(self, root: Path, paths: list[str], resolution: int):
        self.root, self.paths, self.resolution = root, paths, resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return i, load_image(self.root / self.paths[i], self.resolution), None
        except Exception as e:  # any decoder failure: the file is skipped and listed in the manifest
            return i, None, f"{type(e).__name__}: {e}"


def read_labels_file(path: Path) -> dict[str, int]:
    """`{"labels": [[relpath, label], ...]}` (EDM/REPA dataset.json) or text lines `relpath label`."""
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"--labels {path}: cannot be read ({e})") from e
    try:
        if path.suffix.lower() == ".json":
            entries = json.loads(text)["labels"]
        else:
            entries = []
            for line in text.splitlines():
                if line.strip():
                    match = re.fullmatch(r"\s*(.+?)\s*[,\s]\s*(-?\d+)\s*", line)
                    if match is None:
                        raise ValueError(f"cannot parse line {line!r}")
                    entries.append(match.groups())
        table = {str(p).replace("\\", "/"): int(label) for p, label in entries}
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"--labels {path}: expected a JSON file {{\"labels\": [[relative_path, label], ...]}} "
            f"or a text file with one 'relative_path label' per line ({e})"
        ) from e
    if any(label < 0 for label in table.values()):
        raise UsageError(f"--labels {path}: labels must be non-negative integers")
    return table


def list_images(source: Path, labels_file: Path | None = None) -> tuple[list[str], list[int], list[str] | None]:
    """Sorted relative image paths, their labels, and class names (ImageFolder order; None with --labels)."""
    if labels_file is not None:
        table = read_labels_file(labels_file)
        paths = sorted(table)
        outside = leaving(source, paths)
        if outside:
            raise UsageError(f"--labels {labels_file}: its entry {outside[0]!r} is not a path inside --source {source} "
                             f"(an absolute path, '..' or a link leading out of it; {len(outside)} such entries); "
                             "entries are image paths relative to --source, so nothing was encoded")
        return paths, [table[p] for p in paths], None
    classes = sorted(entry.name for entry in os.scandir(source) if entry.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        for root, _, files in sorted(os.walk(source / name, followlinks=True)):
            for fname in sorted(files):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    paths.append(os.path.relpath(os.path.join(root, fname), source).replace(os.sep, "/"))
                    labels.append(label)
    return paths, labels, classes
