"""Hostile files and ordinary mistakes (issue 27): crafted pickles, paths that leave their folder, files of the wrong
kind. Each test builds the real bad file and checks that nothing ran, nothing outside was read, and one line names
the file."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import error_lines, make_image_folder, make_tiny_vae, write_latent_dataset, write_repa_layout

import generate
import train
from models.encoders import EncoderError, load_dinov2, parse_enc_type
from preprocessing import encode

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "SiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--vae-repa-depth", "1",
        "--mixed-precision", "no", "--num-workers", "0", "--sample-every", "0", "--logging-steps", "1",
        "--batch-size", "4", "--learning-rate", "1e-3", "--ema-decay", "0.9"]

# Every file this process opens (Python's "open" audit event: open(), np.load, np.memmap, hashing), while a test
# records them: the proof that a file outside the folder was not read.
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@pytest.fixture
def opened():
    global _OPENED
    _OPENED = []
    yield _OPENED
    _OPENED = None


class RunsCode:
    """Pickled, it names `exec` with code that creates `marker`: loading it unrestricted would run that code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def crafted_pickle(path: Path, marker: Path, **tensors: torch.Tensor) -> Path:
    torch.save({**tensors, "pos_embed": RunsCode(marker)}, path)
    return path


def assert_live(path: Path, marker: Path) -> None:
    """The control: the crafted file does run its code when loaded unrestricted (so the refusal is what saved us)."""
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()


def one_error(stderr: str, *fragments: str) -> str:
    lines = error_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def latent_dataset(root: Path, n: int = 8, images: bool = False) -> Path:
    rng = np.random.default_rng(0)
    size = 32 if images else 8
    mean = rng.standard_normal((n, 4, size, size)).astype(np.float32)
    pixels = rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8) if images else None
    return write_latent_dataset(root, mean, np.full_like(mean, 0.1), rng.integers(0, 3, n), num_classes=3,
                                images=pixels)


def train_cli(tmp_path: Path, data: Path, *extra: str) -> int:
    try:
        return train.main(["--data-dir", str(data), "--output-dir", str(tmp_path / "runs"), *TINY, *extra])
    finally:  # train.py's log file handler, in this process that goes on to other tests
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            handler.close()
            root.removeHandler(handler)


# ----------------------------------------------------------------------------------------------
# 1. --enc-weights: read here without running code, then handed to timm as tensors


@pytest.fixture(scope="module")
def vit_s_state() -> dict:
    """Random weights of timm's DINOv2 ViT-S/14 at its released 518 px (37 x 37 position grid)."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0)
    return {k: v.contiguous() for k, v in vit.state_dict().items()}


def test_enc_weights_pickle_that_runs_code_is_refused_by_train(tmp_path, vit_s_state, capsys):
    marker = tmp_path / "marker"
    weights = crafted_pickle(tmp_path / "dinov2.pt", marker, **{k: v for k, v in vit_s_state.items()
                                                                if k != "pos_embed"})
    data = latent_dataset(tmp_path / "data", n=4, images=True)
    code = train_cli(tmp_path, data, "--exp-name", "r", "--max-train-steps", "1", "--align", "repa",
                     "--enc-type", "dinov2-vit-s", "--encoder-depth", "1", "--enc-weights", str(weights))
    assert code == 2 and not marker.exists()
    one_error(capsys.readouterr().err, f"--enc-weights {weights} holds builtins.exec", "was not opened")
    assert not (tmp_path / "runs" / "r").exists()  # a refused run leaves no directory
    assert_live(weights, marker)


def test_enc_weights_plain_torch_file_loads_as_the_safetensors_file_does(tmp_path, vit_s_state):
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    torch.save(vit_s_state, tmp_path / "dinov2.pt")
    save_file(vit_s_state, str(tmp_path / "model.safetensors"))
    # DINOv2's own layout (dinov2_vits14_pretrain.pth) carries its masked-modelling token, which timm drops
    torch.save({**vit_s_state, "mask_token": torch.zeros(1, 384)}, tmp_path / "dinov2_vits14_pretrain.pth")
    spec = parse_enc_type("dinov2-vit-s")[0]
    for name in ("dinov2.pt", "model.safetensors", "dinov2_vits14_pretrain.pth"):
        state = load_dinov2(spec, 256, weights=str(tmp_path / name)).vit.state_dict()
        # the released 37 x 37 grid resampled to REPA's 16 x 16, the rest unchanged
        assert torch.equal(state["pos_embed"], resample_abs_pos_embed(vit_s_state["pos_embed"], [16, 16]))
        assert all(torch.equal(state[k], v) for k, v in vit_s_state.items() if k != "pos_embed")
    torch.save({"blocks": [1, 2]}, tmp_path / "list.pt")
    with pytest.raises(EncoderError, match=r"--enc-weights \S*list.pt: holds a dict that is not a dict of tensors"):
        load_dinov2(spec, 256, weights=str(tmp_path / "list.pt"))


# ----------------------------------------------------------------------------------------------
# 13. REPA on images smaller than DINOv2's input


def test_repa_on_small_images_says_so_instead_of_blaming_the_download(monkeypatch):
    import timm

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("timm was asked for a model"))
    spec = parse_enc_type("dinov2-vit-b")[0]
    with pytest.raises(EncoderError) as e:
        load_dinov2(spec, 32)
    assert "32 x 32 pixels, smaller than the 256 x 256" in str(e.value) and "Download" not in str(e.value)
    with pytest.raises(EncoderError, match="384 x 384 pixels; REPA's encoders take 256 \\* k"):
        load_dinov2(spec, 384, source="hub")


# ----------------------------------------------------------------------------------------------
# 11. Statistics files that are not plain tensors


def test_statistics_pickle_is_refused_by_preprocessing_and_generate(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "marker"
    stats = crafted_pickle(tmp_path / "latents_stats.pt", marker, mean=torch.zeros(1, 4, 1, 1))
    src = make_image_folder(tmp_path / "src")
    vae = make_tiny_vae(tmp_path / "vae")
    dest = tmp_path / "dest"
    code = encode.main(["--source", str(src), "--dest", str(dest), "--vae", str(vae), "--resolution", "16",
                        "--num-workers", "0", "--latent-norm", "channelwise", "--latent-stats", str(stats)])
    assert code == 2 and not marker.exists() and not dest.exists()
    one_error(capsys.readouterr().err, str(stats), "holds builtins.exec", "expected a latent statistics file")

    from models import build_model, registry

    monkeypatch.setitem(registry.FAMILIES["LightningDiT"][0], "B", (1, 32, 2, 1))  # a test-sized "B"
    net = build_model("LightningDiT-B/1", input_size=8, in_channels=4, num_classes=3)
    torch.save({"ema": net.state_dict()}, tmp_path / "lightningdit.pt")
    code = generate.main(["--ckpt", str(tmp_path / "lightningdit.pt"), "--model", "LightningDiT-B/1",
                          "--num-classes", "3", "--device", "cpu", "--vae", str(vae), "--latent-stats", str(stats),
                          "--num-fid-samples", "2", "--sample-dir", str(tmp_path / "samples")])
    assert code == 2 and not marker.exists()
    one_error(capsys.readouterr().err, str(stats), "holds builtins.exec", "expected a latent statistics file")
    assert_live(stats, marker)


def test_plain_loader_refuses_old_format_pickles_and_empty_files_in_one_line(tmp_path):
    from checkpoints import load_plain_file

    marker = tmp_path / "marker"
    old = tmp_path / "old.pt"
    torch.save({"mean": RunsCode(marker)}, old, _use_new_zipfile_serialization=False)  # torch's pre-1.6 format
    (tmp_path / "empty.pt").write_bytes(b"")
    # torch names the global "exec" in the old format ("builtins.exec" in the zip format)
    for path, reason in ((old, "holds exec: reading it would run code"), (tmp_path / "empty.pt", "is an empty file")):
        with pytest.raises(ValueError) as e:
            load_plain_file(path, "statistics")
        assert str(e.value).startswith(f"{path} {reason}") and "\n" not in str(e.value)
        assert str(e.value).endswith("expected statistics") and not marker.exists()
    assert_live(old, marker)


# ----------------------------------------------------------------------------------------------
# 2. Paths that leave their folder


def outside_copy(data: Path, name: str, where: Path) -> Path:
    """A valid file outside the dataset: what a manifest pointing out of its folder would train on."""
    where.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / name, where)
    return where


@pytest.mark.parametrize("entry", ["../victim.npy", "absolute", "link", "labels"])
def test_manifest_entries_leaving_the_data_dir_are_refused_unread(tmp_path, entry, opened, capsys):
    data = latent_dataset(tmp_path / "data")
    victim = outside_copy(data, "labels.npy" if entry == "labels" else "mean-00000.npy", tmp_path / "victim.npy")
    manifest = json.loads((data / "manifest.json").read_text())
    name = {"absolute": str(victim), "link": "link.npy"}.get(entry, "../victim.npy")
    if entry == "link":
        (data / "link.npy").symlink_to(victim)
    if entry == "labels":
        manifest["labels"] = name
    else:
        manifest["shards"][0]["files"]["mean"] = name
    (data / "manifest.json").write_text(json.dumps(manifest))
    opened.clear()  # what the set-up above read
    code = train_cli(tmp_path, data, "--exp-name", "p", "--max-train-steps", "1")
    assert code == 2
    what = "labels file" if entry == "labels" else "shard 0's 'mean' file"
    one_error(capsys.readouterr().err, f"its {what} {name!r} is not a file name inside", "nothing was read")
    assert not any(Path(p).resolve() == victim.resolve() for p in opened), opened
    assert not (tmp_path / "runs" / "p").exists()


def test_the_fast_check_of_many_paths_refuses_what_the_single_check_refuses(tmp_path):
    from integrity import inside, leaving

    folder = tmp_path / "src"
    (folder / "a" / "b").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"x")
    (folder / "a" / "link.png").symlink_to(tmp_path / "secret.png")
    (folder / "out").symlink_to(tmp_path)  # a directory link leading out
    (folder / "a" / "ok.png").symlink_to(folder / "a" / "b")  # a link that stays inside
    names = ["a/b/x.png", "x.png", "a/../a/b/x.png", "a/ok.png", ".", "a/..",  # inside
             "../x.png", "/etc/passwd", "//etc/passwd", "a/../../x.png", "a/link.png", "out/secret.png", "..", "",
             "a/b/../../../x.png", 3]
    expected_refused = names[6:]
    assert [n for n in names if inside(folder, n) is None] == expected_refused
    assert leaving(folder, names) == expected_refused


def test_labels_entries_outside_the_source_are_refused_unread(tmp_path, opened, capsys):
    src = make_image_folder(tmp_path / "src")
    outside = tmp_path / "elsewhere" / "x.png"
    outside.parent.mkdir()
    shutil.copy(src / "n01/b.png", outside)
    labels = tmp_path / "labels.txt"
    labels.write_text("n01/a.JPEG 0\n../elsewhere/x.png 1\n")
    dest = tmp_path / "dest"
    opened.clear()  # what the set-up above read
    code = encode.main(["--source", str(src), "--dest", str(dest), "--vae", str(tmp_path / "no-vae"), "--labels",
                        str(labels), "--resolution", "16", "--num-workers", "0"])
    assert code == 2 and not dest.exists()
    one_error(capsys.readouterr().err, f"--labels {labels}: its entry '../elsewhere/x.png' is not a path inside "
                                       f"--source {src}")
    assert not any(Path(p).resolve() == outside.resolve() for p in opened)


def test_shard_sidecar_naming_a_file_outside_dest_is_refused_unread(tmp_path, opened, capsys):
    src = make_image_folder(tmp_path / "src")
    vae = make_tiny_vae(tmp_path / "vae")
    dest = tmp_path / "dest"
    argv = ["--source", str(src), "--dest", str(dest), "--vae", str(vae), "--resolution", "16", "--num-workers",
            "0", "--shard-size", "4", "--batch-size", "2"]
    assert encode.main(argv) == 0
    capsys.readouterr()
    victim = outside_copy(dest, "mean-00000.npy", tmp_path / "victim.npy")
    side = dest / "shard-00000.json"
    info = json.loads(side.read_text())
    info["files"]["mean"] = "../victim.npy"  # with the victim's true checksum: only the name gives it away
    side.write_text(json.dumps(info))
    manifest = (dest / "manifest.json").read_bytes()
    opened.clear()

    assert encode.main(argv) == 2
    one_error(capsys.readouterr().err, f"{side}: its 'mean' file '../victim.npy' is not a file name inside --dest")
    assert not any(Path(p).resolve() == victim.resolve() for p in opened)
    assert (dest / "manifest.json").read_bytes() == manifest


# ----------------------------------------------------------------------------------------------
# 12. A malformed args.json, a shard that is a zip archive, a damaged file of REPA's layout mid-training


@pytest.mark.parametrize("text", ['[1, 2]', '{"history": 5}', '{"seed": 0'])
def test_malformed_args_json_on_resume_is_one_line_and_changes_nothing(tmp_path, text, capsys):
    data = latent_dataset(tmp_path / "data")
    assert train_cli(tmp_path, data, "--exp-name", "a", "--max-train-steps", "1") == 0
    run = tmp_path / "runs" / "a"
    (run / "args.json").write_text(text)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    capsys.readouterr()
    assert train_cli(tmp_path, data, "--exp-name", "a", "--max-train-steps", "2", "--resume", "latest") == 2
    one_error(capsys.readouterr().err, f"{run / 'args.json'}: expected the run's settings as a JSON object",
              "move it away")
    assert (run / "args.json").read_text() == text
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before


def test_a_shard_that_is_a_zip_archive_is_named(tmp_path, capsys):
    data = latent_dataset(tmp_path / "data")
    torch.save(torch.from_numpy(np.load(data / "std-00001.npy")), data / "std-00001.npy")  # torch.save: a zip
    assert train_cli(tmp_path, data, "--exp-name", "z", "--max-train-steps", "1") == 2
    one_error(capsys.readouterr().err, f"{data / 'std-00001.npy'}: is a zip archive", "not the single .npy array")
    assert not (tmp_path / "runs" / "z").exists()


def test_damaged_repa_layout_file_mid_training_is_one_line_with_repa_advice(tmp_path, capsys):
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((8, 4, 8, 8)).astype(np.float32)
    root = write_repa_layout(tmp_path / "repa", mean, np.full_like(mean, 0.1), rng.integers(0, 3, 8))
    damaged = root / "vae-sd/00000/img-mean-std-00000006.npy"  # not the first file, which is read at start
    damaged.write_bytes(damaged.read_bytes()[:100])
    # a loader worker reads it: its error comes back to the main process as the worker's whole traceback
    code = train_cli(tmp_path, root, "--exp-name", "d", "--max-train-steps", "4", "--num-workers", "1")
    assert code == 2
    line = one_error(capsys.readouterr().err, f"{damaged}: cannot be read as .npy", "REPA's layout records no "
                     "checksums")
    assert "preprocessing command again" not in line
