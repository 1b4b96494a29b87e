"""train.py --report-to: the tracker gets the run's settings with their types, in the project the user names.

wandb is replaced by a fake package (a module and its dist-info, so that accelerate takes it for wandb) that records
what `wandb.init` and `wandb.config.update` received: no account, no network, and wandb need not be installed."""

import importlib
import json
import sys

import pytest
from test_train import make_dataset, run

FAKE_WANDB = '''
calls = []


class _Config(dict):
    def update(self, values, allow_val_change=False):
        calls.append(("config", values))
        super().update(values)


class _Run:
    def log(self, values, step=None, **kwargs):
        calls.append(("log", values))

    def log_artifact(self, *args, **kwargs):
        pass

    def finish(self):
        calls.append(("finish", None))


config = _Config()


def init(**kwargs):
    calls.append(("init", kwargs))
    return _Run()


class Image:
    def __init__(self, *args, **kwargs):
        pass
'''


@pytest.fixture
def fake_wandb(tmp_path, monkeypatch):
    site = tmp_path / "fake_site"
    (site / "wandb").mkdir(parents=True)
    (site / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    (site / "wandb-0.0.0.dist-info").mkdir()
    (site / "wandb-0.0.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: wandb\nVersion: 0.0.0\n")
    monkeypatch.syspath_prepend(str(site))
    for name in [m for m in sys.modules if m == "wandb" or m.startswith("wandb.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    importlib.invalidate_caches()
    fake = importlib.import_module("wandb")
    assert fake.__file__.startswith(str(site))
    return fake


def recorded(fake, kind: str) -> list:
    return [value for k, value in fake.calls if k == kind]


def test_wandb_gets_typed_settings_and_the_named_project(tmp_path, fake_wandb, monkeypatch):
    data = make_dataset(tmp_path / "data")
    run(tmp_path, data, "--exp-name", "w", "--max-train-steps", "1", "--report-to", "wandb",
        "--tracker-project-name", "my-project")
    (init,) = recorded(fake_wandb, "init")
    assert init["project"] == "my-project" and init["name"] == "w"
    assert init["id"] == (tmp_path / "runs/w/wandb_id.txt").read_text().strip()
    (config,) = recorded(fake_wandb, "config")
    # args.json is the run's settings as JSON (written apart from the tracker): the same values, the same types
    saved = {k: v for k, v in json.loads((tmp_path / "runs/w/args.json").read_text()).items() if k != "history"}
    assert config == saved and [type(config[k]) for k in saved] == [type(v) for v in saved.values()]
    assert type(config["learning_rate"]) is float and type(config["batch_size"]) is int
    assert type(config["flip"]) is bool and config["align"] == ["vae-repa"] and config["resume"] is None

    fake_wandb.calls.clear()
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    run(tmp_path, data, "--exp-name", "w2", "--max-train-steps", "1", "--report-to", "wandb")
    assert [c["project"] for c in recorded(fake_wandb, "init")] == ["from-env"]
    fake_wandb.calls.clear()
    monkeypatch.delenv("WANDB_PROJECT")
    # resumed in another shell (no $WANDB_PROJECT): the run continues in its own project (it once moved to vae-repa,
    # where wandb started a new run under the same id)
    run(tmp_path, data, "--exp-name", "w2", "--max-train-steps", "2", "--report-to", "wandb", "--resume", "latest")
    assert [c["project"] for c in recorded(fake_wandb, "init")] == ["from-env"]
    assert json.loads((tmp_path / "runs/w2/args.json").read_text())["tracker_project_name"] == "from-env"
    # a leg without a tracker keeps the record for the next one
    run(tmp_path, data, "--exp-name", "w2", "--max-train-steps", "3", "--resume", "latest")
    run(tmp_path, data, "--exp-name", "w2", "--max-train-steps", "4", "--report-to", "wandb", "--resume", "latest")
    assert [c["project"] for c in recorded(fake_wandb, "init")] == ["from-env", "from-env"]
    fake_wandb.calls.clear()
    run(tmp_path, data, "--exp-name", "w3", "--max-train-steps", "1", "--report-to", "wandb")
    assert [c["project"] for c in recorded(fake_wandb, "init")] == ["vae-repa"]  # the name every run had before


def test_tensorboard_hparams_keep_numbers_as_numbers(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional (requirements.txt installs it; make test does)")
    yaml = pytest.importorskip("yaml", reason="accelerate writes TensorBoard's hparams.yml with PyYAML")
    data = make_dataset(tmp_path / "data")
    run(tmp_path, data, "--exp-name", "tb", "--max-train-steps", "1", "--report-to", "tensorboard",
        "--tracker-project-name", "proj")
    (hparams,) = (tmp_path / "runs/tb/proj").rglob("hparams.yml")
    values = yaml.safe_load(hparams.read_text())
    assert type(values["learning_rate"]) is float and type(values["batch_size"]) is int
    assert values["flip"] is True and values["align"] == "['vae-repa']"  # hparams take no lists: text


def test_a_resume_without_a_checkpoint_reads_the_project_from_args_json(tmp_path):
    """--resume latest after an attempt that died before its first checkpoint: the project its args.json recorded."""
    from training.run_settings import recorded_value

    (tmp_path / "args.json").write_text(json.dumps({"model": "SiT-B/2", "tracker_project_name": "mine"}))
    assert recorded_value("tracker_project_name", None, tmp_path) == "mine"
    assert recorded_value("tracker_project_name", {"args": {"tracker_project_name": "ckpt"}}, tmp_path) == "ckpt"
    assert recorded_value("tracker_project_name", None, None) is None  # not a resume
    (tmp_path / "args.json").write_text("{not json")
    assert recorded_value("tracker_project_name", None, tmp_path) is None  # check_same_run reports it
    assert recorded_value("tracker_project_name", None, tmp_path / "missing") is None
