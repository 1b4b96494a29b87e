"""Opening checkpoints from others: crafted files are refused by every entry point, --trust-checkpoint opts in,
REPA's and our older checkpoints load through the allowlist, and .safetensors / REPA-layout exports sample the same
images as the checkpoint they came from."""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import make_tiny_vae
from helpers_generate import TINY_ARGS, make_checkpoint, make_repa_checkpoint, random_state
from helpers_scripts import load_script
from test_train import TINY, make_dataset
from test_train import run as train_run

import checkpoints
import generate
import train
from evaluations import evaluator
from evaluations.inception import write_random_weights

ROOT = Path(__file__).resolve().parents[1]
export = load_script("export")

SYSTEM = f"{os.system.__module__}.system"  # how the pickle names os.system: posix.system on Linux


class RunsCode:
    """Unpickling this object runs a shell command that creates `marker`: what a crafted checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    vae = make_tiny_vae(root / "vae")
    return {"root": root, "vae": vae, "ckpt": make_checkpoint(root / "0000002.pt", vae, seed=0)}


def crafted(path: Path, base: dict, marker: Path, key: str = "note") -> Path:
    """`base` with one entry replaced by an object whose unpickling creates `marker`."""
    torch.save({**base, key: RunsCode(marker)}, path)
    return path


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_the_crafted_files_do_run_code_when_opened_unrestricted(tmp_path):
    # Without this, "creates nothing" below would prove nothing.
    path = crafted(tmp_path / "c.pt", {}, tmp_path / "torch_marker")
    torch.load(path, weights_only=False)
    assert (tmp_path / "torch_marker").exists()
    np.savez(tmp_path / "c.npz", arr_0=np.array([RunsCode(tmp_path / "numpy_marker")], dtype=object))
    with np.load(tmp_path / "c.npz", allow_pickle=True) as f:
        f["arr_0"]
    assert (tmp_path / "numpy_marker").exists()


def test_generate_refuses_a_crafted_checkpoint_and_the_flag_opts_in(assets, tmp_path, capsys):
    base = torch.load(assets["ckpt"], weights_only=True)
    marker = tmp_path / "pwned"
    # The issue's file: `args` is an object whose unpickling runs a shell command. Run as the user would.
    issue_file = crafted(tmp_path / "crafted.pt", base, marker, key="args")
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--ckpt", str(issue_file), "--sample-dir",
                           str(tmp_path / "out"), "--num-fid-samples", "4", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and SYSTEM in line and "--trust-checkpoint" in line and str(issue_file) in line
    assert not marker.exists() and not (tmp_path / "out").exists()

    # A working checkpoint carrying the same payload: refused without the flag, opened (code run) with it.
    file = crafted(tmp_path / "with_payload.pt", base, marker)
    quick = ["--ckpt", str(file), "--num-fid-samples", "2", "--num-steps", "2", "--device", "cpu"]
    assert generate.main([*quick, "--sample-dir", str(tmp_path / "refused")]) == 2
    assert SYSTEM in capsys.readouterr().err and not marker.exists() and not (tmp_path / "refused").exists()
    assert generate.main([*quick, "--sample-dir", str(tmp_path / "trusted"), "--trust-checkpoint"]) == 0
    assert marker.exists() and len(list((tmp_path / "trusted").glob("*.npz"))) == 1


def test_train_resume_refuses_a_crafted_checkpoint_and_the_flag_opts_in(tmp_path):
    data = make_dataset(tmp_path / "data")
    train_run(tmp_path, data, "--exp-name", "a", "--max-train-steps", "1")
    base = torch.load(tmp_path / "runs/a/checkpoints/0000001.pt", weights_only=True)  # ours: no allowlist needed
    marker = tmp_path / "pwned"
    file = crafted(tmp_path / "crafted.pt", base, marker)

    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--output-dir", str(tmp_path / "runs"), *TINY,
                           "--data-dir", str(data), "--exp-name", "b", "--max-train-steps", "2", "--resume",
                           str(file)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and SYSTEM in line and "--trust-checkpoint" in line
    assert not marker.exists() and not (tmp_path / "runs/b").exists()  # nothing written

    train_run(tmp_path, data, "--exp-name", "b", "--max-train-steps", "2", "--resume", str(file),
              "--trust-checkpoint")
    assert marker.exists() and (tmp_path / "runs/b/checkpoints/0000002.pt").is_file()

    # An export holds EMA weights only: not something to resume from.
    out = tmp_path / "a.safetensors"
    assert export.main(["--ckpt", str(tmp_path / "runs/a"), "--out", str(out)]) == 0
    with pytest.raises(train.UsageError, match="not a train.py checkpoint"):
        train_run(tmp_path, data, "--exp-name", "c", "--max-train-steps", "2", "--resume", str(out))
    assert not (tmp_path / "runs/c").exists()


def test_export_refuses_a_crafted_checkpoint_and_the_flag_opts_in(assets, tmp_path, capsys):
    marker = tmp_path / "pwned"
    file = crafted(tmp_path / "crafted.pt", torch.load(assets["ckpt"], weights_only=True), marker)
    out = tmp_path / "shared.safetensors"
    assert export.main(["--ckpt", str(file), "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert SYSTEM in line and "--trust-checkpoint" in line
    assert not marker.exists() and not out.exists()
    assert export.main(["--ckpt", str(file), "--out", str(out), "--trust-checkpoint"]) == 0
    assert marker.exists() and out.is_file()


def test_evaluator_refuses_crafted_weights_and_object_arrays(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=images)
    weights = write_random_weights(tmp_path / "random.pth")
    marker = tmp_path / "pwned"
    bad_weights = crafted(tmp_path / "bad.pth", torch.load(weights, weights_only=True), marker)
    np.savez(tmp_path / "bad_images.npz", arr_0=np.array([RunsCode(marker)], dtype=object))
    np.savez(tmp_path / "bad_ref.npz", arr_0=images, mu=np.array([RunsCode(marker)], dtype=object),
             sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    common = ["--device", "cpu", "--quiet", "--out", str(tmp_path / "m.json")]

    assert evaluator.main([str(good), str(good), "--inception-weights", str(bad_weights), *common]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert SYSTEM in line and str(bad_weights) in line
    assert evaluator.main([str(good), str(tmp_path / "bad_images.npz"), "--inception-weights", str(weights),
                           *common]) == 2
    assert "dtype object" in one_error_line(capsys.readouterr().err)
    assert evaluator.main([str(tmp_path / "bad_ref.npz"), str(good), "--inception-weights", str(weights),
                           *common]) == 2
    assert "bad_ref.npz" in one_error_line(capsys.readouterr().err)
    assert not marker.exists() and not (tmp_path / "m.json").exists()


def test_repa_checkpoint_with_a_namespace_loads_through_the_allowlist(tmp_path):
    state = random_state(TINY_ARGS, 0, with_heads=False)
    path = make_repa_checkpoint(tmp_path / "0000007.pt", state, training=True, model="SiT-S/2", resolution=64)
    with pytest.raises(pickle.UnpicklingError):  # torch's own weights-only load: the allowlist is what opens it
        torch.load(path, weights_only=True)
    ckpt = checkpoints.load_checkpoint(path)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].resolution == 64 and ckpt["steps"] == 7
    assert all(torch.equal(ckpt["ema"][k], v) for k, v in state.items())


def test_old_numpy_rng_states_load_under_either_numpy_module_name(tmp_path):
    # numpy 2 pickles its array rebuilder as numpy._core.multiarray._reconstruct, numpy 1 as numpy.core.multiarray.
    np.random.seed(3)
    state = np.random.get_state()
    buffer = io.BytesIO()
    torch.save({"rng": [{"numpy": state}]}, buffer, _use_new_zipfile_serialization=False)  # plain pickle stream
    data = buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data
    (tmp_path / "numpy1.pt").write_bytes(data)
    loaded = checkpoints.load_checkpoint(tmp_path / "numpy1.pt")["rng"][0]["numpy"]
    assert loaded[0] == "MT19937" and loaded[2:] == state[2:]
    np.testing.assert_array_equal(loaded[1], state[1])


def test_the_allowlist_is_only_what_it_names(tmp_path):
    # A harmless class, but not on the list: refused all the same, and named.
    torch.save({"args": {"out": Path("/tmp")}}, tmp_path / "path.pt")
    with pytest.raises(checkpoints.UntrustedCheckpointError, match="pathlib") as e:
        checkpoints.load_checkpoint(tmp_path / "path.pt")
    assert "--trust-checkpoint" in str(e.value) and "\n" not in str(e.value)
    assert checkpoints.load_checkpoint(tmp_path / "path.pt", trust=True)["args"]["out"] == Path("/tmp")


def test_rng_states_round_trip_as_tensors_and_plain_values():
    import random

    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    np.random.standard_normal()  # numpy keeps a cached Gaussian: it must survive too
    state = checkpoints.rng_state(torch.device("cpu"))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # no allowlist
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    checkpoints.set_rng_state(state, torch.device("cpu"))
    got = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def sample_images(ckpt: Path, sample_dir: Path, *extra: str) -> np.ndarray:
    quick = ["--num-fid-samples", "3", "--num-steps", "3", "--cfg-scale", "1.5", "--device", "cpu"]
    assert generate.main(["--ckpt", str(ckpt), "--sample-dir", str(sample_dir), *quick, *extra]) == 0
    (npz,) = sample_dir.glob("*.npz")
    return np.load(npz)["arr_0"]


def test_safetensors_export_samples_the_images_of_its_checkpoint(assets, tmp_path, capsys):
    out = tmp_path / "shared.safetensors"
    assert export.main(["--ckpt", str(assets["ckpt"]), "--out", str(out)]) == 0
    from safetensors import safe_open

    source = torch.load(assets["ckpt"], weights_only=True)
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["args"]) == json.loads(json.dumps(source["args"]))
        assert set(f.keys()) == set(source["ema"])
    expected = sample_images(assets["ckpt"], tmp_path / "from_ckpt")
    assert expected.std() > 1
    np.testing.assert_array_equal(sample_images(out, tmp_path / "from_safetensors"), expected)

    capsys.readouterr()
    assert generate.main(["--ckpt", str(out), "--sample-dir", str(tmp_path / "x"), "--no-ema"]) == 2
    assert "no online weights" in capsys.readouterr().err
    assert export.main(["--ckpt", str(assets["ckpt"]), "--out", str(out)]) == 2  # never overwritten silently
    assert "exists" in capsys.readouterr().err


def test_repa_export_is_repa_s_layout_and_samples_the_same_images(assets, tmp_path, capsys):
    # REPA's layout names registry models: a full SiT-S/2 (small weights) on 4x8x8 SD-VAE-style latents.
    args = {**TINY_ARGS, "depth": None, "hidden_size": None, "num_heads": None, "latent_scale": 0.18215,
            "latent_shift": 0.0, "vae": str(assets["vae"])}
    state = random_state(args, seed=3, std=0.02)
    ckpt = tmp_path / "0000005.pt"
    torch.save({"format": "vae-repa/1", "model": state, "ema": state, "opt": {"state": {}, "param_groups": []},
                "step": 5, "args": args, "rng": None, "data": None}, ckpt)
    assert export.main(["--ckpt", str(ckpt), "--format", "repa"]) == 0
    # a VAE-REPA run has no REPA projectors, which REPA's model always has: no optimizer state REPA could resume
    assert "no optimizer state in it" in capsys.readouterr().out
    out = tmp_path / "0000005-repa.pt"
    repa = torch.load(out, weights_only=True)  # plain torch, no allowlist: REPA's own torch.load opens it
    assert set(repa) == {"model", "ema", "args", "steps"} and repa["steps"] == 5
    assert any(k.startswith("vae_projector.") for k in state)
    assert set(repa["ema"]) == {k for k in state if not k.startswith("vae_projector.")}
    assert repa["args"]["resolution"] == 64
    expected = sample_images(ckpt, tmp_path / "ours")
    assert expected.std() > 1
    np.testing.assert_array_equal(sample_images(out, tmp_path / "repa", "--vae", str(assets["vae"])), expected)

    capsys.readouterr()  # a tiny model with overridden depth has no name in REPA's registry
    assert export.main(["--ckpt", str(assets["ckpt"]), "--format", "repa", "--out", str(tmp_path / "t.pt")]) == 2
    assert "registry" in capsys.readouterr().err and not (tmp_path / "t.pt").exists()


def test_a_vae_folder_with_crafted_pickled_weights_runs_nothing(assets, tmp_path):
    from diffusers.models import AutoencoderKL

    from cli import UsageError
    from latent_codecs.autoencoder import load_vae

    folder = tmp_path / "vae"
    AutoencoderKL.from_pretrained(assets["vae"]).save_pretrained(folder, safe_serialization=False)
    (bin_file,) = folder.glob("*.bin")  # diffusers reads pickled weights when a folder has no .safetensors
    marker = tmp_path / "pwned"
    crafted(bin_file, torch.load(bin_file, weights_only=True), marker)
    with pytest.raises(UsageError, match="cannot load an AutoencoderKL"):
        load_vae(str(folder))
    assert not marker.exists()


def test_every_export_flag_is_documented_and_help_needs_no_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/export.py"), "--help"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--ckpt", "--format", "--out", "--overwrite", "--trust-checkpoint"):
        assert f"  {flag}" in proc.stdout, flag
    assert "RUNS CODE FROM THE FILE" in " ".join(proc.stdout.split())
