"""Tests for preprocessing/encode.py: ADM crop, VAE shards vs a direct encode, resume, refusals."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import CLASSES, CORRUPT, IMAGES, load_shards, make_image_folder, make_tiny_vae
from PIL import Image

from dataset import LatentDataset
from preprocessing import encode, images, shards

REPO = Path(__file__).resolve().parents[1]
RES = 32
# ImageFolder order: classes sorted, then the sorted walk inside each class; the truncated file is skipped.
EXPECTED = ["n01/a.JPEG", "n01/b.png", "n01/sub/c.png", "n02/d.jpg", "n02/e.png", "n10/f.bmp", "n10/g.jpg"]
EXPECTED_LABELS = [0, 0, 0, 1, 1, 2, 2]


def adm_crop(img: Image.Image, size: int) -> np.ndarray:
    """ADM's center crop, written from its description: halve with BOX while the short side is at least
    2*size, BICUBIC-resize so the short side is size (Python round), then cut the central size x size."""
    while min(img.width, img.height) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), Image.BOX)
    ratio = size / min(img.width, img.height)
    img = img.resize((round(img.width * ratio), round(img.height * ratio)), Image.BICUBIC)
    a = np.array(img)
    y0, x0 = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[y0 : y0 + size, x0 : x0 + size]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    src = make_image_folder(root / "src")
    vae_dir = make_tiny_vae(root / "vae")

    def argv(dest, *extra, vae=vae_dir, source=src):
        return ["--source", str(source), "--dest", str(dest), "--vae", str(vae), "--resolution", str(RES),
                "--shard-size", "3", "--batch-size", "2", "--num-workers", "0", "--dtype", "fp32", "--flip",
                "--save-images", *extra]

    ref = root / "ref"
    assert encode.main(argv(ref)) == 0
    return {"root": root, "src": src, "vae": vae_dir, "argv": argv, "ref": ref}


def test_center_crop_matches_adm_formula():
    rng = np.random.default_rng(0)
    for w, h in [(64, 64), (65, 129), (300, 200), (1000, 700), (37, 50), (17, 300), (256, 511)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for size in (8, 32, 64):
            got = images.center_crop_arr(img, size)
            assert got.shape == (size, size, 3) and got.dtype == np.uint8
            np.testing.assert_array_equal(got, adm_crop(img, size))
    square = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # already the target size: unchanged
    np.testing.assert_array_equal(images.center_crop_arr(Image.fromarray(square), 32), square)


def test_load_image_converts_every_mode_to_rgb(setup):
    for rel, mode, _ in IMAGES:
        with Image.open(setup["src"] / rel) as img:
            assert img.mode == mode
            expected = adm_crop(img.convert("RGB"), RES)
        np.testing.assert_array_equal(images.load_image(setup["src"] / rel, RES), expected)


def test_file_list_matches_torchvision_imagefolder(setup):
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(setup["src"]))
    paths, labels, classes = images.list_images(setup["src"])
    assert classes == folder.classes == CLASSES
    assert [(os.path.join(setup["src"], p), y) for p, y in zip(paths, labels)] == folder.samples


def test_shards_equal_direct_vae_encoding(setup):
    from diffusers.models import AutoencoderKL

    ref = setup["ref"]
    manifest = json.loads((ref / "manifest.json").read_text())
    crops = np.stack([adm_crop(Image.open(setup["src"] / p).convert("RGB"), RES) for p in EXPECTED])
    vae = AutoencoderKL.from_pretrained(setup["vae"]).eval()
    with torch.no_grad():
        post = vae.encode(torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist
        flipped = np.ascontiguousarray(crops[:, :, ::-1])
        post_flip = vae.encode(torch.from_numpy(flipped).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist

    np.testing.assert_array_equal(load_shards(ref, "images"), crops)
    np.testing.assert_allclose(load_shards(ref, "mean"), post.mean.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(load_shards(ref, "std"), post.std.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(load_shards(ref, "flip-mean"), post_flip.mean.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(load_shards(ref, "flip-std"), post_flip.std.numpy(), atol=1e-5, rtol=1e-5)
    assert np.load(ref / "labels.npy").tolist() == EXPECTED_LABELS
    assert np.load(ref / "labels.npy").dtype == np.int64

    assert manifest["complete"] and manifest["num_images"] == len(EXPECTED)
    assert [s["path"] for s in manifest["skipped"]] == [CORRUPT]
    assert manifest["class_names"] == CLASSES and manifest["num_classes"] == 3
    assert manifest["latent_shape"] == [4, RES // 2, RES // 2]
    assert (manifest["scale"], manifest["shift"], manifest["vae"]) == (0.18215, 0.0, str(setup["vae"]))
    for shard in manifest["shards"]:
        for kind, name in shard["files"].items():
            assert hashlib.sha256((ref / name).read_bytes()).hexdigest() == shard["sha256"][kind]
    assert sum(s["count"] for s in manifest["shards"]) == 7 and len(manifest["shards"]) == 3  # 8 files / 3

    ds = LatentDataset(ref, use_flip=False)
    for i in range(len(ds)):
        item = ds[i]
        np.testing.assert_allclose(item["target"].numpy(), 0.18215 * post.mean[i].numpy(), atol=1e-5)
        assert item["y"].item() == EXPECTED_LABELS[i]


def test_bf16_compute_and_fp16_storage(setup, tmp_path):
    dest = tmp_path / "bf16"
    argv = [a for a in setup["argv"](dest) if a not in ("--dtype", "fp32")] + ["--precision", "bf16"]
    assert encode.main(argv) == 0
    mean, ref = load_shards(dest, "mean"), load_shards(setup["ref"], "mean")
    assert mean.dtype == np.float16
    assert np.abs(mean.astype(np.float32) - ref).max() < 0.05 * np.abs(ref).max()


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the encoder catches a BaseException, so no cleanup code runs."""


def test_killed_run_resumes_byte_identical(setup, tmp_path, monkeypatch):
    dest = tmp_path / "killed"
    real_save, saved = shards.save_npy, []

    def save_then_die(path, arr):
        if len(saved) == 5 + 2:  # shard 0 has 5 arrays; die while writing shard 1's third one
            path.with_name(path.name + ".tmp").write_bytes(b"\x93NUMPY partial")
            raise Killed
        saved.append(path.name)
        return real_save(path, arr)

    monkeypatch.setattr(shards, "save_npy", save_then_die)
    with pytest.raises(Killed):
        encode.main(setup["argv"](dest))
    monkeypatch.undo()
    assert (dest / "shard-00000.json").exists() and not (dest / "shard-00001.json").exists()
    assert (dest / "std-00001.npy").exists() and (dest / "flip-mean-00001.npy.tmp").exists()
    assert json.loads((dest / "manifest.json").read_text())["complete"] is False
    assert encode.main(setup["argv"](dest)) == 0
    assert snapshot(dest) == snapshot(setup["ref"])


def test_two_ranks_write_the_same_dataset(setup, tmp_path, monkeypatch):
    """Two ranks as two threads joined by a real barrier (shard k is written by rank k % 2)."""
    dest = tmp_path / "ranks"
    args = encode.build_parser().parse_args(setup["argv"](dest))
    barrier = threading.Barrier(2, timeout=60)
    errors = []
    lock, load_vae = threading.Lock(), encode.load_vae

    def load_vae_one_at_a_time(*a):  # from_pretrained patches torch globally while it loads
        with lock:
            return load_vae(*a)

    monkeypatch.setattr(encode, "load_vae", load_vae_one_at_a_time)

    def rank(r):
        try:
            encode.encode_dataset(args, rank=r, world_size=2, barrier=barrier.wait)
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert snapshot(dest) == snapshot(setup["ref"])


def test_rerun_verifies_checksums_and_repairs(setup, tmp_path, capsys):
    dest = tmp_path / "rerun"
    shutil.copytree(setup["ref"], dest)
    assert encode.main(setup["argv"](dest)) == 0
    assert "nothing to encode" in capsys.readouterr().out
    data = bytearray((dest / "std-00001.npy").read_bytes())
    data[-1] ^= 0xFF
    (dest / "std-00001.npy").write_bytes(bytes(data))
    assert encode.main(setup["argv"](dest)) == 0
    assert "shard 1 does not match" in capsys.readouterr().err
    assert snapshot(dest) == snapshot(setup["ref"])


def refuse(argv, capsys) -> str:
    assert encode.main(argv) == 2
    return capsys.readouterr().err


def test_refuses_empty_source(setup, tmp_path, capsys):
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    err = refuse(setup["argv"](tmp_path / "out", source=tmp_path / "empty"), capsys)
    assert "--source" in err and "no images found" in err
    assert not (tmp_path / "out").exists()


def test_refuses_other_vae_or_resolution_and_leaves_files(setup, tmp_path, capsys):
    dest = tmp_path / "dest"
    shutil.copytree(setup["ref"], dest)
    before = snapshot(dest)
    other_vae = make_tiny_vae(tmp_path / "other_vae", seed=1)
    err = refuse(setup["argv"](dest, vae=other_vae), capsys)
    assert "--vae" in err and str(other_vae) in err and "--overwrite" in err
    err = refuse(setup["argv"](dest, "--resolution", "16"), capsys)  # the later flag wins in argparse
    assert "--resolution" in err and "32" in err and "16" in err
    err = refuse(setup["argv"](dest, "--shift", "0.5"), capsys)
    assert "--shift" in err
    err = refuse(setup["argv"](dest, "--posterior", "sample"), capsys)  # moments there (no key: an older dataset)
    assert "--posterior" in err and "'sample'" in err
    assert snapshot(dest) == before


def test_refuses_vae_whose_channel_count_changed(setup, tmp_path, capsys):
    vae_dir = tmp_path / "vae"
    shutil.copytree(setup["vae"], vae_dir)
    dest = tmp_path / "dest"
    assert encode.main(setup["argv"](dest, vae=vae_dir)) == 0
    before = snapshot(dest)
    shutil.rmtree(vae_dir)
    make_tiny_vae(vae_dir, latent_channels=8)  # same path, other VAE
    err = refuse(setup["argv"](dest, vae=vae_dir), capsys)
    assert "8 channels" in err and "manifest.json" in err and "[4, 16, 16]" in err
    assert snapshot(dest) == before


def test_refuses_unknown_files_and_overwrite_replaces(setup, tmp_path, capsys):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mean-00000.npy").write_bytes(b"someone else's")
    (dest / "notes.txt").write_text("keep me")
    err = refuse(setup["argv"](dest), capsys)
    assert "mean-00000.npy" in err and "no manifest.json" in err
    assert (dest / "mean-00000.npy").read_bytes() == b"someone else's"
    assert encode.main(setup["argv"](dest, "--overwrite", "--resolution", "16")) == 0
    assert np.load(dest / "images-00000.npy").shape == (3, 16, 16, 3)
    assert json.loads((dest / "manifest.json").read_text())["resolution"] == 16
    assert (dest / "notes.txt").read_text() == "keep me"


def test_vae_load_failure_says_what_to_download(setup, tmp_path, capsys, monkeypatch):
    from diffusers.models import AutoencoderKL

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", offline)
    err = refuse(setup["argv"](tmp_path / "out", vae="stabilityai/sd-vae-ft-ema"), capsys)
    assert "download stabilityai/sd-vae-ft-ema --local-dir" in err and "--vae pretrained/sd-vae-ft-ema" in err
    assert "couldn't connect" in err
    err = refuse(setup["argv"](tmp_path / "out", vae=tmp_path / "nowhere"), capsys)
    assert "no such directory" in err


def test_labels_file_for_a_flat_folder(setup, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, (rel, _, _) in enumerate(IMAGES[:4]):
        shutil.copy(setup["src"] / rel, flat / f"img{i}{Path(rel).suffix}")
    (flat / "labels.txt").write_text("img2.JPEG 4\nimg0.jpg 1\nimg1.bmp 0\nimg3.png 4\n")
    dest = tmp_path / "dest"
    assert encode.main(setup["argv"](dest, "--labels", str(flat / "labels.txt"), source=flat)) == 0
    manifest = json.loads((dest / "manifest.json").read_text())
    assert np.load(dest / "labels.npy").tolist() == [1, 0, 4, 4]  # sorted by path: img0, img1, img2, img3
    assert manifest["num_classes"] == 5 and manifest["num_images"] == 4


def test_help_works_as_a_script_and_documents_every_flag():
    proc = subprocess.run([sys.executable, "preprocessing/encode.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--vae" in proc.stdout and "--shard-size" in proc.stdout
    for action in encode.build_parser()._actions:
        assert action.help, action.option_strings


def test_posterior_sample_stores_one_fp32_sample_per_image_and_flip_as_lightningdit_does(setup, tmp_path):
    """--posterior sample: one z = mean + std eps per image and one per flipped image (LightningDiT's
    extract_features.py stores posterior.sample() of both), fp32 by default, no std files; eps of image i comes from
    (--posterior-seed, i), and training reads the same z every epoch."""
    dest = tmp_path / "sample"
    argv = [a for a in setup["argv"](dest) if a not in ("--dtype", "fp32")] + ["--posterior", "sample"]
    assert encode.main(argv) == 0
    manifest = json.loads((dest / "manifest.json").read_text())
    assert (manifest["posterior"], manifest["posterior_seed"], manifest["dtype"]) == ("sample", 0, "float32")
    assert all(set(s["files"]) == {"mean", "flip-mean", "images"} for s in manifest["shards"])
    listed = images.list_images(setup["src"], None)[0]
    shape = tuple(manifest["latent_shape"])
    for kind, flipped in (("mean", 0), ("flip-mean", 1)):
        eps = np.stack([np.random.default_rng([0, listed.index(p), flipped]).standard_normal(shape, dtype=np.float32)
                        for p in EXPECTED])
        ref_mean, ref_std = load_shards(setup["ref"], kind), load_shards(setup["ref"], kind.replace("mean", "std"))
        stored = load_shards(dest, kind)
        assert stored.dtype == np.float32
        np.testing.assert_allclose(stored, ref_mean + ref_std * eps, rtol=1e-6, atol=1e-6)
    from latent_data.shards import ShardsReader

    repair = ShardsReader(dest, in_memory=False, use_flip=True, with_images=False).repair_command()
    assert "--dtype fp32 --flip --save-images --posterior sample --posterior-seed 0" in repair
    ds = LatentDataset(dest, use_flip=False)
    first = [ds[i]["x"] for i in range(len(ds))]
    ds.set_epoch(1)
    for i, x in enumerate(first):
        assert torch.equal(ds[i]["x"], x) and torch.equal(x, ds[i]["target"])
        np.testing.assert_array_equal(x.numpy(), 0.18215 * load_shards(dest, "mean")[i])


def test_posterior_storage_figures_against_closed_forms():
    """scripts/measure_posterior_storage.py's figures on moments whose answers are known: means on fp16's grid
    (no rounding), a std of 0.5 everywhere and means of variance 1 per channel, so the noise makes 0.25 / 1.25 of
    the variance; a std that fp16 cannot hold (1/3) has a relative rounding below 2^-11."""
    from helpers_scripts import load_script

    measure = load_script("measure_posterior_storage").measure
    mean = np.tile(np.array([-1.0, 1.0], dtype=np.float32), 8 * 2 * 4 * 2).reshape(8, 2, 4, 4)  # variance 1 per channel
    figures = measure(mean, np.full_like(mean, 0.5), seed=0)
    assert figures["fp16_mean_max_abs_error"] == 0 and figures["fp16_std_max_abs_error"] == 0
    assert figures["noise_share_of_variance_median"] == pytest.approx(0.25 / 1.25, rel=1e-12)
    figures = measure(mean, np.full_like(mean, 1 / 3), seed=0)
    assert 0 < figures["fp16_std_relative_rms_error"] < 2**-11
