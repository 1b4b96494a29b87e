"""generate.py: per-sample determinism (batch size, process count, resume), the ADM .npz, checkpoints, bad input."""

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import make_tiny_vae
from helpers_generate import TINY_ARGS, make_checkpoint, make_repa_checkpoint, random_state
from PIL import Image

import generate
import samplers
from latent_codecs.autoencoder import load_vae
from sampling.batch import sample_batch
from sampling.checkpoint import load_model
from sampling.folder import weights_digest
from sampling.images import to_uint8
from sampling.seeds import NOISE_STREAM, sample_generator, sample_labels

ROOT = Path(__file__).resolve().parents[1]
N = 8
SETTINGS = ["--num-fid-samples", str(N), "--num-steps", "4", "--cfg-scale", "1.5", "--guidance-high", "0.7",
            "--label-sampling", "random"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    vae = make_tiny_vae(root / "vae")
    run = root / "runs" / "exp"
    make_checkpoint(run / "checkpoints" / "0000001.pt", vae, seed=10, step=1)
    make_checkpoint(run / "checkpoints" / "0000002.pt", vae, seed=0, step=2)
    return {"root": root, "vae": vae, "run": run, "ckpt": run / "checkpoints" / "0000002.pt"}


def sample(ckpt, sample_dir, *extra):
    """Run generate.main in this process, on the CPU; (exit status, sample folder or None, npz path or None)."""
    rc = generate.main(["--ckpt", str(ckpt), "--sample-dir", str(sample_dir), "--device", "cpu", *extra])
    folders = [p for p in Path(sample_dir).glob("*") if p.is_dir()] if Path(sample_dir).is_dir() else []
    npzs = list(Path(sample_dir).glob("*.npz")) if Path(sample_dir).is_dir() else []
    assert len(folders) <= 1 and len(npzs) <= 1
    return rc, (folders[0] if folders else None), (npzs[0] if npzs else None)


def arr_0(npz):
    return np.load(npz)["arr_0"]


def tree_digest(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """8 samples, batches of 3, from the run directory (its highest step)."""
    out = tmp_path_factory.mktemp("reference")
    rc, folder, npz = sample(assets["run"], out, *SETTINGS, "--per-proc-batch-size", "3")
    assert rc == 0
    return {"dir": out, "folder": folder, "npz": npz, "images": arr_0(npz)}


def test_layout_and_npz_reads_as_adm_evaluator_reads_it(reference):
    folder, npz, images = reference["folder"], reference["npz"], reference["images"]
    assert folder.name.startswith("SiT-S-2-exp-0000002-ema-size-16-vae-vae-cfg-1.5-interval-0.0-0.7-seed-0-sde")
    assert npz == folder.parent / f"{folder.name}.npz"
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(N)] + ["config.json"]

    assert images.shape == (N, 16, 16, 3) and images.dtype == np.uint8
    pngs = np.stack([np.asarray(Image.open(folder / f"{i:06d}.png")) for i in range(N)])
    np.testing.assert_array_equal(images, pngs)
    assert images.std() > 10 and len({im.tobytes() for im in images}) == N  # not trivial images

    # ADM's evaluator streams arr_0.npy out of the zip: a version 1.0 / 2.0 header, then C-order bytes.
    with zipfile.ZipFile(npz) as zf, zf.open("arr_0.npy") as f:
        assert zf.namelist() == ["arr_0.npy"]
        assert np.lib.format.read_magic(f) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        assert (shape, fortran, dtype) == ((N, 16, 16, 3), False, np.dtype(np.uint8))
        np.testing.assert_array_equal(np.frombuffer(f.read(), np.uint8).reshape(shape), pngs)
    # and the member is byte for byte what np.savez writes for the same images
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=pngs)
    with zipfile.ZipFile(npz) as ours, zipfile.ZipFile(buffer) as numpy_savez:
        assert ours.read("arr_0.npy") == numpy_savez.read("arr_0.npy")


@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_images_do_not_depend_on_the_batch_size(assets, reference, tmp_path, mode):
    extra = [] if mode == "sde" else ["--mode", "ode", "--heun"]
    results = []
    for batch in (8, 3) if mode == "ode" else (8, 5):
        rc, _, npz = sample(assets["run"], tmp_path / f"b{batch}", *SETTINGS, *extra, "--per-proc-batch-size",
                            str(batch))
        assert rc == 0
        results.append(arr_0(npz))
    np.testing.assert_array_equal(results[0], results[1])
    if mode == "sde":
        np.testing.assert_array_equal(results[0], reference["images"])
    else:
        assert not np.array_equal(results[0], reference["images"])


# Runs generate.py's main recording, per rank, the PNGs it reads back for the .npz.
READS_WORKER = """
import os, sys
import generate
from sampling import folder

out, real, reads = sys.argv[1], folder.read_png, []
folder.read_png = lambda path: reads.append(path.name) or real(path)
code = generate.main(sys.argv[2:])
with open(os.path.join(out, f"reads{os.environ['RANK']}.txt"), "w") as f:
    f.write("\\n".join(reads))
sys.exit(code)
"""


def test_two_processes_give_the_same_images_and_each_reads_its_share_into_the_same_npz(assets, reference, tmp_path):
    """Two processes sample the same images; each reads its half of the PNGs back, and rank 0 joins the halves into
    the .npz that the single-process path (write_npz) writes from the same folder, byte for byte. A bad PNG in one
    rank's half stops both ranks together."""
    from sampling.folder import write_npz

    # CPU behaviour: the workers see no GPU (--device cpu as well), whatever this machine has.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    (tmp_path / "worker.py").write_text(READS_WORKER)
    samples = tmp_path / "samples"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), str(tmp_path), "--ckpt", str(assets["run"]), "--sample-dir", str(samples),
           *SETTINGS, "--per-proc-batch-size", "2", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    npz, folder = samples / reference["npz"].name, samples / reference["folder"].name
    assert (folder / "000007.png").is_file()
    np.testing.assert_array_equal(arr_0(npz), reference["images"])
    # the shape from sample 0 on both, then 0-3 on rank 0 and 4-7 on rank 1 (rank 0 reads sample 0 once more to join)
    half = [[f"{i:06d}.png" for i in range(r * N // 2, (r + 1) * N // 2)] for r in (0, 1)]
    # (sorted: a pool of threads reads them)
    assert sorted((tmp_path / "reads0.txt").read_text().split()) == sorted(["000000.png", *half[0], "000000.png"])
    assert sorted((tmp_path / "reads1.txt").read_text().split()) == sorted(["000000.png", *half[1]])
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(N)] + ["config.json"]
    write_npz(folder, N, tmp_path / "one-process.npz", show_progress=False)  # today's path, the same PNGs
    assert npz.read_bytes() == (tmp_path / "one-process.npz").read_bytes()

    # a PNG of another size in rank 1's half: both ranks stop, rank 0 naming rank 1's file; no share is left behind
    npz.unlink()
    Image.new("RGB", (8, 8)).save(folder / "000005.png")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    line = f"{folder / '000005.png'} has shape (8, 8, 3), sample 0 has (16, 16, 3)"
    assert f"[rank 1] generate.py: error: {line}" in proc.stderr, proc.stderr[-3000:]
    assert f"[rank 0] generate.py: error: rank 1 failed: {line}" in proc.stderr, proc.stderr[-3000:]
    assert "Connection closed" not in proc.stderr and "Timed out" not in proc.stderr, proc.stderr[-3000:]
    assert not npz.exists() and sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(N)] + [
        "config.json"]


def test_killed_run_resumes_to_the_same_npz(assets, reference, tmp_path, capsys):
    folder = tmp_path / reference["folder"].name
    shutil.copytree(reference["folder"], folder)  # a run killed after some PNGs, before the npz
    for i in (1, 4, 7):
        (folder / f"{i:06d}.png").unlink()
    (folder / ".000004.png.3fa4b2c1.tmp").write_bytes(b"half a png")  # the atomic writer's temporary name
    (folder / ".mine.tmp").write_bytes(b"a file of the user's")  # not ours: left alone
    (folder / ".notes.txt.3fa4b2c1.tmp").write_bytes(b"a temporary of another name: not ours either")
    (folder / "npz-part-00001-of-00002.npy").write_bytes(b"a share of the .npz a kill left unmerged")
    (folder / ".npz-part-00000-of-00002.npy.3fa4b2c1.tmp").write_bytes(b"half a share")
    kept = {i: (folder / f"{i:06d}.png").stat().st_mtime_ns for i in (0, 2, 3, 5, 6)}
    capsys.readouterr()

    rc, _, npz = sample(assets["run"], tmp_path, *SETTINGS, "--per-proc-batch-size", "2")
    assert rc == 0
    assert "Sampling 3 of 8 images (5 already there)" in capsys.readouterr().out
    assert npz.name == reference["npz"].name
    with zipfile.ZipFile(npz) as a, zipfile.ZipFile(reference["npz"]) as b:
        assert a.read("arr_0.npy") == b.read("arr_0.npy")
    assert {i: (folder / f"{i:06d}.png").stat().st_mtime_ns for i in kept} == kept  # not sampled again
    assert sorted(p.name for p in folder.glob(".*.tmp")) == [".mine.tmp", ".notes.txt.3fa4b2c1.tmp"]
    assert not list(folder.glob("*npz-part-*"))

    before = npz.stat().st_mtime_ns  # a finished run: nothing to do
    rc, _, _ = sample(assets["run"], tmp_path, *SETTINGS)
    assert rc == 0 and "Sampling 0 of 8 images" in capsys.readouterr().out
    assert npz.stat().st_mtime_ns == before


def test_more_samples_later_extend_the_first_ones(assets, reference, tmp_path):
    settings = list(SETTINGS)
    settings[settings.index("--num-fid-samples") + 1] = "5"
    rc, _, npz = sample(assets["run"], tmp_path, *settings)
    assert rc == 0 and arr_0(npz).shape[0] == 5
    rc, _, npz = sample(assets["run"], tmp_path, *SETTINGS)
    assert rc == 0
    np.testing.assert_array_equal(arr_0(npz), reference["images"])


def test_another_configuration_in_the_same_folder_is_an_error(assets, reference, tmp_path, capsys):
    # A retrained run with the same name and step: same folder name, different weights.
    other = make_checkpoint(tmp_path / "other" / "exp" / "checkpoints" / "0000002.pt", assets["vae"], seed=3)
    samples = tmp_path / "samples"
    shutil.copytree(reference["dir"], samples)
    before = tree_digest(samples)
    rc, _, _ = sample(other, samples, *SETTINGS)
    err = capsys.readouterr().err
    assert rc == 2 and "another configuration" in err and "model_sha256" in err
    assert tree_digest(samples) == before

    # PNGs without a config.json (unknown origin) are not mixed with new ones
    (samples / reference["folder"].name / "config.json").unlink()
    (samples / reference["npz"].name).unlink()
    before = tree_digest(samples)
    rc, _, _ = sample(assets["run"], samples, *SETTINGS)
    assert rc == 2 and "holds PNGs but no config.json" in capsys.readouterr().err
    assert tree_digest(samples) == before

    # an npz whose folder (and config) is gone is not overwritten either
    shutil.rmtree(samples / reference["folder"].name)
    shutil.copy(reference["npz"], samples)
    before = tree_digest(samples)
    rc, _, _ = sample(assets["run"], samples, *SETTINGS)
    assert rc == 2 and "refusing to overwrite" in capsys.readouterr().err
    assert tree_digest(samples) == before


def test_online_weights_with_no_ema(assets, tmp_path):
    # A checkpoint whose EMA is the online model of the reference checkpoint samples what --no-ema samples.
    ckpt = torch.load(assets["ckpt"], weights_only=True)
    swapped = tmp_path / "swapped.pt"
    torch.save({**ckpt, "ema": ckpt["model"]}, swapped)
    two = [*SETTINGS[2:], "--num-fid-samples", "2"]
    rc, folder, online = sample(assets["ckpt"], tmp_path / "online", *two, "--no-ema")
    assert rc == 0 and "-online-" in folder.name
    rc, _, swapped_ema = sample(swapped, tmp_path / "swapped", *two)
    assert rc == 0
    np.testing.assert_array_equal(arr_0(online), arr_0(swapped_ema))
    rc, _, ema = sample(assets["ckpt"], tmp_path / "ema", *two)
    assert rc == 0 and not np.array_equal(arr_0(ema), arr_0(online))


def test_bf16_autocast_stays_close_to_fp32(assets, tmp_path):
    quick = [*SETTINGS[2:], "--num-fid-samples", "4"]
    rc, _, fp32 = sample(assets["ckpt"], tmp_path / "fp32", *quick, "--precision", "fp32")
    assert rc == 0
    rc, folder, bf16 = sample(assets["ckpt"], tmp_path / "bf16", *quick, "--precision", "bf16")
    assert rc == 0 and folder.name.endswith("-bf16")
    diff = np.abs(arr_0(fp32).astype(int) - arr_0(bf16))
    assert 0 < diff.mean() < 1 and diff.max() <= 8  # bf16 was used, and it changes little


def test_bf16_images_are_those_of_fp32_weights_under_autocast(assets, tmp_path):
    """generate.py stores the matmul weights in bf16 once (samplers.sampling_model); the images must be the bytes
    that fp32 weights under bf16 autocast give (the path before that change), computed here by sample_batch on a
    model that is left in fp32."""
    quick = [*SETTINGS[2:], "--num-fid-samples", "4", "--per-proc-batch-size", "4"]
    rc, folder, npz = sample(assets["ckpt"], tmp_path, *quick, "--precision", "bf16")
    assert rc == 0
    args = generate.parse_args(["--ckpt", str(assets["ckpt"]), *quick, "--device", "cpu"])
    model, info = load_model(args, assets["ckpt"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the folder's identity is the fp32 weights' digest (taken before the cast), so folders begun earlier still match
    config = json.loads((folder / "config.json").read_text())["config"]
    assert config["model_sha256"] == weights_digest(model)
    vae = load_vae(info["vae"])
    old_path = sample_batch(model.eval(), vae, [0, 1, 2, 3], args, info, torch.device("cpu"), "bf16")
    np.testing.assert_array_equal(arr_0(npz), old_path)


def test_compiled_sampling_gives_the_images_of_eager_sampling(assets, reference, tmp_path, capsys):
    """--compile (on CUDA by default) is not part of the folder name: its images must be eager's, up to float
    rounding (compiled kernels may sum in another order): here fp32 on the CPU, a byte apart at most. A last partial
    batch reuses the full batches' graphs."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    rc, folder, npz = sample(assets["run"], tmp_path, *SETTINGS, "--per-proc-batch-size", "3", "--compile")
    assert rc == 0 and "compiled" in capsys.readouterr().out
    # 8 samples in batches of 3: the guided (6) and unguided (3) graphs only; the last batch (2) is filled up to 3
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert folder.name == reference["folder"].name
    diff = np.abs(arr_0(npz).astype(int) - reference["images"])
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_repa_checkpoints_load_with_architecture_flags(assets, tmp_path, capsys):
    # A full-size SiT-S/2 on 8x8 latents: REPA's formats can only name registry models.
    args = {"model": "SiT-S/2", "num_classes": 4, "latent_shape": [4, 8, 8], "vae": str(assets["vae"]),
            "latent_scale": 0.18215, "latent_shift": 0.0, "path_type": "linear"}
    state = random_state(args, seed=7, with_heads=False, std=0.02)
    ours = tmp_path / "ours.pt"
    torch.save({"format": "vae-repa/1", "ema": state, "model": state, "args": args, "step": 1}, ours)
    released = make_repa_checkpoint(tmp_path / "SiT-S-2-64x64.pt", state)
    training = make_repa_checkpoint(tmp_path / "0000007.pt", state, training=True, model="SiT-S/2", resolution=64,
                                    num_classes=4, qk_norm=False, path_type="linear", encoder_depth=2)
    quick = ["--num-fid-samples", "2", "--num-steps", "2", "--vae", str(assets["vae"])]

    rc, _, npz = sample(ours, tmp_path / "ours", *quick)
    assert rc == 0
    expected = arr_0(npz)
    assert expected.std() > 1
    rc, _, npz = sample(released, tmp_path / "released", *quick, "--model", "SiT-S/2", "--resolution", "64",
                        "--num-classes", "4")
    assert rc == 0
    np.testing.assert_array_equal(arr_0(npz), expected)
    rc, _, npz = sample(training, tmp_path / "training", *quick)  # architecture from the checkpoint's args
    assert rc == 0
    np.testing.assert_array_equal(arr_0(npz), expected)

    capsys.readouterr()
    rc, _, _ = sample(released, tmp_path / "wrong", *quick, "--model", "SiT-S/4", "--resolution", "64",
                      "--num-classes", "4")
    err = capsys.readouterr().err
    assert rc == 2 and str(released) in err and "--model" in err and "size mismatch" in err
    assert not (tmp_path / "wrong").exists()


def test_bad_input_fails_clearly_before_writing(assets, tmp_path, capsys):
    def fails(ckpt, *extra, sample_dir=tmp_path / "out"):
        rc, _, _ = sample(ckpt, sample_dir, *SETTINGS, *extra)
        assert rc == 2
        return capsys.readouterr().err

    assert str(tmp_path / "missing.pt") in fails(tmp_path / "missing.pt")
    (tmp_path / "empty_run").mkdir()
    assert "without step checkpoints" in fails(tmp_path / "empty_run")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert "garbage.pt is not a checkpoint: expected torch.save's zip file" in fails(tmp_path / "garbage.pt")
    assert "--model SiT-B/2 contradicts" in fails(assets["ckpt"], "--model", "SiT-B/2")
    assert "--resolution 256 contradicts" in fails(assets["ckpt"], "--resolution", "256")
    ema_only = make_repa_checkpoint(tmp_path / "ema_only.pt", random_state(TINY_ARGS, 0, with_heads=False))
    assert "--no-ema" in fails(ema_only, "--no-ema")
    assert "no such folder" in fails(assets["ckpt"], "--vae", str(tmp_path / "no_vae"))
    assert not (tmp_path / "out").exists()

    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    assert "--sample-dir" in fails(assets["ckpt"], sample_dir=blocker / "samples")
    assert blocker.read_text() == "keep me"

    with pytest.raises(SystemExit) as e:
        generate.main(["--ckpt", str(assets["ckpt"]), "--cfg-scale", "0.5"])
    assert e.value.code == 2 and "--cfg-scale" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # REPA's --legacy: refused, with what to do instead
        generate.main(["--ckpt", str(assets["ckpt"]), "--legacy"])
    assert e.value.code == 2 and "load_legacy_checkpoints" in capsys.readouterr().err


def test_help_documents_every_flag_without_a_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    flags = ["--ckpt", "--no-ema", "--model", "--resolution", "--num-classes", "--qk-norm", "--vae", "--mode",
             "--num-steps", "--heun", "--cfg-scale", "--guidance-low", "--guidance-high", "--path-type",
             "--num-fid-samples", "--label-sampling", "--global-seed", "--per-proc-batch-size", "--sample-dir",
             "--precision", "--device", "--trust-checkpoint", "--pixel-rounding",
             "--encoder-depth", "--projector-embed-dims", "--tf32", "--fused-attn", "--legacy", "--latent-stats",
             "--time-shift", "--compile", "--cfg-channels"]
    for flag in flags:
        assert f"  {flag}" in proc.stdout, flag
    assert "i % num_classes" in proc.stdout.replace("\n", " ")
    actions = [a for a in generate.build_parser()._actions if a.option_strings]
    assert {a.option_strings[0] for a in actions} == {"-h", *flags}
    assert all(a.help and len(a.help) > 10 for a in actions)


def test_labels_are_a_function_of_seed_and_index():
    balanced = sample_labels(list(range(12)), 4, "balanced", 0)
    assert np.bincount(balanced.numpy(), minlength=4).tolist() == [3, 3, 3, 3]
    assert sample_labels([9, 2], 4, "balanced", 5).tolist() == [1, 2]

    many = sample_labels(list(range(4000)), 4, "random", 0)
    assert many.min() >= 0 and many.max() < 4
    assert np.all(np.abs(np.bincount(many.numpy(), minlength=4) - 1000) < 150)  # ~5.5 binomial std
    subset = sample_labels([3999, 17, 5], 4, "random", 0)
    assert subset.tolist() == [many[3999].item(), many[17].item(), many[5].item()]
    other_seed = sample_labels(list(range(4000)), 4, "random", 1)
    assert (other_seed != many).float().mean() > 0.5


@pytest.mark.parametrize("rounding, offset, by_hand", [
    ("repa", 127.5, [0, 0, 0, 63, 127, 165, 254, 254, 255, 255]),  # floor(127.5 x + 127.5), REPA's generate.py
    ("dit", 128.0, [0, 0, 0, 64, 128, 166, 254, 255, 255, 255]),  # floor(127.5 x + 128), DiT's sample_ddp.py
])
def test_pixel_rounding_formulas(rounding, offset, by_hand):
    x = torch.tensor([-1.5, -1.0, -0.999, -0.5, 0.0, 0.3, 0.996, 0.997, 1.0, 2.0])
    images = x.view(1, 1, 1, -1).expand(1, 3, 2, -1).contiguous()
    ours = to_uint8(images, rounding).numpy()
    assert ours.shape == (1, 2, 10, 3)
    assert ours[0, 0, :, 0].tolist() == by_hand
    expected = np.floor(np.clip(x.numpy().astype(np.float64) * 127.5 + offset, 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(ours[0, 0, :, 0], expected)
    nchw = torch.rand(2, 3, 4, 5) * 2 - 1
    by_formula = np.floor(np.clip(nchw.numpy().astype(np.float64) * 127.5 + offset, 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(to_uint8(nchw, rounding).numpy(), by_formula.transpose(0, 2, 3, 1))


def test_repa_rounding_is_repa_s_float32_expression_and_the_default():
    x = torch.linspace(-1.01, 1.01, 100_003).view(1, 1, 1, -1).expand(1, 3, 1, -1)
    repa = torch.clamp(255.0 * ((x + 1) / 2.0), 0, 255).permute(0, 2, 3, 1).to(torch.uint8)  # REPA's expression
    assert torch.equal(to_uint8(x), repa)
    dit = to_uint8(x, "dit").int()
    assert 0.45 < (dit - repa.int()).float().mean() < 0.55  # about half the pixels one level brighter
    assert ((dit - repa.int()) >= 0).all() and ((dit - repa.int()) <= 1).all()
    with pytest.raises(ValueError, match="pixel rounding"):
        to_uint8(x, "round")


def test_sde_noise_of_a_sample_does_not_depend_on_its_batch():
    class Zero:  # zero velocity: from zero latents, the result is a function of the sampler's noise only
        num_classes = 4

        def __call__(self, x, t, y):
            return torch.zeros_like(x), {}

    def run(indices):
        gens = [sample_generator(0, i, NOISE_STREAM) for i in indices]
        z = torch.zeros(len(indices), 2, 3, 3)
        return samplers.euler_maruyama_sampler(Zero(), z, torch.zeros(len(indices), dtype=torch.long),
                                               num_steps=6, generator=gens)

    batch = run([4, 9, 1])
    for row, i in zip(batch, [4, 9, 1]):
        torch.testing.assert_close(row, run([i])[0], rtol=0, atol=0)
    assert batch.std() > 0.1 and not torch.equal(batch[0], batch[1])


def test_dit_rounding_is_recorded_and_brightens_by_at_most_one_level(assets, reference, tmp_path):
    config = json.loads((reference["folder"] / "config.json").read_text())["config"]
    assert config["pixel_rounding"] == "repa" and "-pixels" not in reference["folder"].name
    rc, folder, npz = sample(assets["run"], tmp_path, *SETTINGS, "--pixel-rounding", "dit")
    assert rc == 0 and folder.name == reference["folder"].name + "-dit-pixels"
    assert json.loads((folder / "config.json").read_text())["config"]["pixel_rounding"] == "dit"
    diff = arr_0(npz).astype(int) - reference["images"].astype(int)  # same latents, only the rounding differs
    assert set(np.unique(diff)) <= {0, 1} and 0.3 < (diff == 1).mean() < 0.7


def test_repa_s_projector_flags_are_checked_not_rejected(assets, tmp_path, capsys):
    # REPA's README sampling line passes --encoder-depth=8 --projector-embed-dims=768: they describe the
    # projectors, which sampling never runs. Agreeing flags are silent; disagreeing ones give a note, same images.
    args = {"model": "SiT-S/2", "num_classes": 4, "latent_shape": [4, 8, 8]}
    state = random_state(args, seed=7, with_heads=False, std=0.02)
    hidden = state["pos_embed"].shape[-1]
    for k, (o, i) in {"0": (2048, hidden), "2": (2048, 2048), "4": (768, 2048)}.items():
        state[f"projectors.0.{k}.weight"], state[f"projectors.0.{k}.bias"] = torch.randn(o, i), torch.zeros(o)
    ckpt = tmp_path / "0000007.pt"
    torch.save({"model": state, "ema": state, "opt": {}, "steps": 7,
                "args": argparse.Namespace(model="SiT-S/2", resolution=64, num_classes=4, encoder_depth=8)}, ckpt)
    quick = ["--num-fid-samples", "2", "--num-steps", "2", "--vae", str(assets["vae"])]
    rc, _, npz = sample(ckpt, tmp_path / "a", *quick, "--encoder-depth=8", "--projector-embed-dims=768")
    out = capsys.readouterr().out
    assert rc == 0 and "note:" not in out
    rc, _, other = sample(ckpt, tmp_path / "b", *quick, "--encoder-depth=4", "--projector-embed-dims=768,1024")
    out = capsys.readouterr().out
    assert rc == 0 and "--encoder-depth 4: checkpoint" in out and "after block 8" in out
    assert "--projector-embed-dims 768,1024" in out and "widths 768;" in out
    np.testing.assert_array_equal(arr_0(other), arr_0(npz))


def test_repa_s_fused_attn_and_tf32_flags_say_what_they_do(assets, tmp_path, capsys):
    """REPA's --fused-attn / --no-fused-attn and --tf32 are accepted; on the CPU neither changes the images, and a
    note says so (no silent reinterpretation)."""
    quick = ["--num-fid-samples", "2", "--num-steps", "2"]
    rc, _, plain = sample(assets["ckpt"], tmp_path / "a", *quick)
    capsys.readouterr()
    rc, _, flagged = sample(assets["ckpt"], tmp_path / "b", *quick, "--no-fused-attn", "--tf32")
    out = capsys.readouterr().out
    assert rc == 0 and "--no-fused-attn changes nothing" in out and "--tf32 changes nothing on the CPU" in out
    np.testing.assert_array_equal(arr_0(flagged), arr_0(plain))


@pytest.mark.parametrize("lie", [{"num_classes": 10**9}, {"hidden_size": 10**6}, {"depth": 10**7},
                                 {"latent_shape": [4, 10**5, 10**5]}])
def test_architecture_claims_are_checked_against_the_tensors_before_anything_is_built(assets, tmp_path, capsys, lie):
    """A safetensors export is safe to open, but its metadata chooses what gets built: 10^9 classes would allocate a
    128 GB embedding table. The claims are compared with the file's own tensors first, and refused in one line."""
    from checkpoints import write_safetensors

    args = {**TINY_ARGS, "vae": str(assets["vae"])}
    path = tmp_path / "lying.safetensors"
    write_safetensors(random_state(args, seed=0, with_heads=False), {**args, **lie}, 1, path)
    capsys.readouterr()
    rc, _, _ = sample(path, tmp_path / "s", *SETTINGS)
    assert rc == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"checkpoint {path} does not fit SiT-S/2" in line and "size mismatch with its tensors" in line


def test_guided_channels_are_part_of_the_folder_and_an_old_folder_reads_as_all(assets, reference, tmp_path, capsys):
    """--cfg-channels N samples into its own folder (name and config.json); a folder sampled before the flag existed
    (no cfg_channels in its config.json) holds all-channel samples and resumes under --cfg-channels all."""
    samples = tmp_path / "samples"
    shutil.copytree(reference["dir"], samples)
    config_path = samples / reference["folder"].name / "config.json"
    record = json.loads(config_path.read_text())
    assert record["config"]["cfg_channels"] == "all"
    del record["config"]["cfg_channels"]  # as an older generate.py wrote it
    config_path.write_text(json.dumps(record))
    before = tree_digest(samples)
    rc, _, npz = sample(assets["run"], samples, *SETTINGS, "--cfg-channels", "all")
    assert rc == 0 and "Sampling 0 of 8" in capsys.readouterr().out and tree_digest(samples) == before

    rc, folder, npz = sample(assets["run"], tmp_path / "three", *SETTINGS, "--cfg-channels", "3")
    assert rc == 0 and folder.name == reference["folder"].name.replace("-seed-", "-cfg-channels-3-seed-")
    assert json.loads((folder / "config.json").read_text())["config"]["cfg_channels"] == 3
    assert not np.array_equal(arr_0(npz), reference["images"])  # channel 3 of 4 is no longer guided
    # 4 of 4 channels is all of them: the same folder and images as --cfg-channels all
    rc, folder, npz = sample(assets["run"], tmp_path / "four", *SETTINGS, "--cfg-channels", "4")
    assert rc == 0 and folder.name == reference["folder"].name
    np.testing.assert_array_equal(arr_0(npz), reference["images"])


@pytest.mark.parametrize("value, message", [("5", "--cfg-channels 5: the model has 4 latent channels"),
                                            ("0", "--cfg-channels"), ("three", "--cfg-channels")])
def test_bad_cfg_channels_are_refused_before_anything_is_written(assets, tmp_path, capsys, value, message):
    try:
        rc = generate.main(["--ckpt", str(assets["ckpt"]), "--sample-dir", str(tmp_path / "s"), "--device", "cpu",
                            *SETTINGS, "--cfg-channels", value])
    except SystemExit as e:  # a usage error of the parser
        rc = e.code
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
