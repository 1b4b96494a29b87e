"""Image batches for evaluation: ADM-style .npz files read as a stream, image folders and in-memory arrays."""

from __future__ import annotations

import os
import queue
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cli import UsageError
from integrity import as_list, atomic_write, worker_init

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_NPY_MEMBER = "arr_0.npy"


class EvaluationError(UsageError):
    """A problem with the user's inputs (missing file, malformed array, missing weights): reported, not a bug."""


def _check_image_array_layout(shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    if dtype != np.uint8:
        raise EvaluationError(f"{where}: expected uint8 images, got dtype {dtype}")
    if len(shape) != 4 or shape[-1] != 3:
        raise EvaluationError(f"{where}: expected an array of shape (N, H, W, 3), got {tuple(shape)}")
    if shape[0] == 0:
        raise EvaluationError(f"{where}: the array holds no images")


class ArrayImages:
    """Images already in memory: a (N, H, W, 3) uint8 array."""

    def __init__(self, array: np.ndarray, name: str = "array"):
        _check_image_array_layout(array.shape, array.dtype, name)
        self.array = array
        self.name = name

    def __len__(self) -> int:
        return len(self.array)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape[1:])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.array), batch_size):
            yield np.array(self.array[start : start + batch_size])  # a writable, contiguous copy


def _read_npy_header(f) -> tuple[tuple[int, ...], np.dtype, bool] | None:
    """Shape, dtype and Fortran flag of the .npy stream `f`; None for a format version we do not parse."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        return None
    return tuple(shape), dtype, fortran


def _read_into(f, array: np.ndarray) -> None:
    view = memoryview(array).cast("B")
    done = 0
    while done < len(view):
        count = f.readinto(view[done:])
        if not count:
            raise EvaluationError("the .npz file ended before all images were read (truncated file?)")
        done += count


class NpzImages:
    """`arr_0` of an .npz file, read batch by batch from the zip member (np.load would read it all into RAM).

    Works for stored (np.savez) and deflated (np.savez_compressed) members. A Fortran-ordered array or an
    unusual .npy version falls back to loading the whole array with np.load.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = str(path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                if _NPY_MEMBER not in zf.namelist():
                    raise EvaluationError(f"{path}: no 'arr_0' array in this .npz (keys: {_keys(zf)})")
                with zf.open(_NPY_MEMBER) as f:
                    header = _read_npy_header(f)
        except zipfile.BadZipFile as exc:
            raise EvaluationError(f"{path}: not a valid .npz file ({exc})") from exc
        self._array = None
        if header is not None:
            _check_image_array_layout(header[0], header[1], f"{path}: arr_0")  # before reading any of it
        if header is None or header[2]:
            try:  # allow_pickle=False: an object array would be unpickled, running code the file names
                self._array = np.load(self.path, allow_pickle=False)["arr_0"]
            except ValueError as exc:
                raise EvaluationError(f"{path}: arr_0 cannot be read ({exc})") from exc
            header = (self._array.shape, self._array.dtype, False)
        self.shape, self.dtype, _ = header
        _check_image_array_layout(self.shape, self.dtype, f"{path}: arr_0")

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.shape[1:])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if self._array is not None:
            return ArrayImages(self._array, self.name).batches(batch_size)
        return _prefetch(lambda: self._stream(batch_size))

    def _stream(self, batch_size: int) -> Iterator[np.ndarray]:
        with zipfile.ZipFile(self.path) as zf, zf.open(_NPY_MEMBER) as f:
            _read_npy_header(f)
            for start in range(0, len(self), batch_size):
                batch = np.empty((min(batch_size, len(self) - start), *self.shape[1:]), np.uint8)
                _read_into(f, batch)
                yield batch


def _keys(zf: zipfile.ZipFile) -> list[str]:
    return [name.removesuffix(".npy") for name in zf.namelist()]


_END = object()


def _prefetch(make_batches: Callable[[], Iterator[np.ndarray]], depth: int = 4) -> Iterator[np.ndarray]:
    """Run a batch generator in a background thread (zip reads and inflation release the GIL)."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def work() -> None:
        gen = make_batches()
        try:
            for batch in gen:
                if stop.is_set():
                    return
                q.put(batch)
            q.put(_END)
        except Exception as exc:  # handed to the consumer, which re-raises it
            q.put(exc)
        finally:
            gen.close()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Path, np.ndarray | str]:
        """(file, RGB array), or (file, why it cannot be read): the error is raised in the main process, in one
        line, instead of a worker's traceback."""
        path = self.files[index]
        try:
            with Image.open(path) as image:
                return path, np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as e:
            return path, f"{type(e).__name__}: {e}"


def _stack_same_size(items: list[tuple[Path, np.ndarray | str]], shape: tuple[int, ...], first: Path) -> np.ndarray:
    for path, image in items:
        if isinstance(image, str):
            raise EvaluationError(f"{path}: cannot be read as an image ({image})")
        if image.shape != shape:
            raise EvaluationError(f"{path} is {image.shape[1]}x{image.shape[0]} pixels but {first.name} is "
                                  f"{shape[1]}x{shape[0]}: all images of a folder must have the same size")
    return np.stack([image for _, image in items])


class FolderImages:
    """Image files of one folder (not recursive), in file-name order, decoded by DataLoader workers."""

    def __init__(self, path: str | os.PathLike, num_workers: int = 8):
        self.path = Path(path)
        self.name = str(path)
        self.num_workers = num_workers
        self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise EvaluationError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._first_shape()

    def _first_shape(self) -> tuple[int, int, int]:
        path, image = _ImageFiles(self.files[:1])[0]
        if isinstance(image, str):
            raise EvaluationError(f"{path}: cannot be read as an image ({image})")
        return image.shape

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        shape = self._first_shape()
        loader = torch.utils.data.DataLoader(
            _ImageFiles(self.files),
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=as_list,
            worker_init_fn=worker_init() if self.num_workers > 0 else None,
        )
        for items in loader:
            yield _stack_same_size(items, shape, self.files[0])


ImageSource = ArrayImages | NpzImages | FolderImages


def open_images(source: str | os.PathLike | np.ndarray, num_workers: int = 8, what: str = "images") -> ImageSource:
    """Open a (N, H, W, 3) uint8 array, an .npz file holding one as `arr_0`, or a folder of image files."""
    if isinstance(source, np.ndarray):
        return ArrayImages(source, what)
    path = Path(source)
    if not path.exists():
        raise EvaluationError(f"{what} not found: {path}")
    if path.is_dir():
        return FolderImages(path, num_workers)
    if path.suffix.lower() != ".npz":
        raise EvaluationError(f"{what}: expected an .npz file or a folder of images, got {path}")
    return NpzImages(path)


def npz_keys(path: str | os.PathLike) -> list[str]:
    """Names of the arrays stored in an .npz file, without reading them."""
    try:
        with zipfile.ZipFile(path) as zf:
            return _keys(zf)
    except zipfile.BadZipFile as exc:
        raise EvaluationError(f"{path}: not a valid .npz file ({exc})") from exc


class NpzImageWriter:
    """Write an .npz in ADM's reference format, streaming `arr_0` so that the images never sit in RAM.

    Call `write` with consecutive image batches (exactly `num_images` in total), then `close` with the
    remaining arrays (mu, sigma, ...). The file appears under its final name only once complete.
    """

    def __init__(self, path: str | os.PathLike, num_images: int, image_shape: tuple[int, int, int]):
        self.path = Path(path)
        self.expected = num_images
        self.written = 0
        self._file = atomic_write(self.path)  # the one atomic writer: temporary name, fsync, rename on close
        self.zip = zipfile.ZipFile(self._file.__enter__(), "w", allowZip64=True)
        self.member = self.zip.open(_NPY_MEMBER, "w", force_zip64=True)
        header = {"descr": "|u1", "fortran_order": False, "shape": (num_images, *image_shape)}
        np.lib.format.write_array_header_1_0(self.member, header)

    def write(self, images: np.ndarray) -> None:
        self.written += len(images)
        if self.written > self.expected:
            raise ValueError(f"more images than announced ({self.expected})")
        self.member.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())

    def close(self, **arrays: np.ndarray) -> None:
        self.member.close()
        if self.written != self.expected:
            raise ValueError(f"wrote {self.written} images, announced {self.expected}")
        for name, array in arrays.items():
            with self.zip.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
        self.zip.close()
        self._file.__exit__(None, None, None)

    def abort(self) -> None:
        self.member.close()
        self.zip.close()
        error = RuntimeError("the .npz write was abandoned")
        self._file.__exit__(type(error), error, None)  # removes the temporary file
