"""Training as 2 and 3 real gloo processes with many DDP buckets, gradient accumulation and a resume in the middle,
eager and compiled per block: the same losses and weights as one process at the same global batch, and no recompile
after the first step of each process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import TINY_TRAIN, record_checksums, write_latent_dataset
from helpers_distributed import torchrun

# train.train with three test-only changes, none in the product:
# - The training draws of each sample (time, noise, label dropout) come from a generator seeded from that sample's
#   bytes, not from the rank's RNG: loss.training_loss runs once per sample and the batch's terms are the means of
#   the samples' (every term is a mean over the batch of per-sample terms, and no layer couples samples), so a global
#   step's losses and gradients do not depend on how its samples are split over processes.
# - Each block and head is compiled by a counting backend (dynamo's graphs, run as Python: no code generation), which
#   records at which of this process's optimizer steps each graph was compiled.
# - Recorded per optimizer step: the loss terms averaged over the ranks, at full precision, and the gradients'
#   global norm (after DDP's all-reduce, before clipping); after the run, DDP's buckets, the final model and EMA, and
#   how many compiled units and kinds of unit (blocks, heads) the model has.
WORKER = """
import hashlib, os, sys, torch
import loss, train
from models.heads import AlignmentHeads
from training import loop

out, argv = sys.argv[1], sys.argv[2:]
steps, graphs, losses, norms, buckets = [0], [], [], [], []

def counting_backend(gm, example_inputs):
    graphs.append(steps[0])
    return gm.forward

compile_blocks = AlignmentHeads.compile_blocks
AlignmentHeads.compile_blocks = lambda self, **kwargs: compile_blocks(self, backend=counting_backend)

def per_sample_loss(model, x, y, config, null_class, methods=(), **inputs):
    outs = []
    for i in range(len(x)):
        seed = hashlib.sha256(x[i].cpu().numpy().tobytes() + y[i].cpu().numpy().tobytes()).digest()
        one = {k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in inputs.items()}
        outs.append(loss.training_loss(model, x[i : i + 1], y[i : i + 1], config, null_class, methods,
                                       generator=torch.Generator().manual_seed(int.from_bytes(seed[:8], "little")),
                                       **one))
    return {k: torch.stack([o[k] for o in outs]).mean() for k in outs[0]}

loop.training_loss = per_sample_loss
accumulate = loop.accumulate_gradients

def recorded(*args, **kwargs):
    parts, epoch, position = accumulate(*args, **kwargs)
    mean = parts.detach().clone()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(mean)
        mean /= torch.distributed.get_world_size()
    losses.append(mean)
    return parts, epoch, position

loop.accumulate_gradients = recorded
gradient_norm = loop.gradient_norm

def norm_recorded(*args):
    norm = gradient_norm(*args)
    norms.append(norm.clone())
    return norm

loop.gradient_norm = norm_recorded
update_ema = loop.update_ema

def counted(*args):
    steps[0] += 1
    return update_ema(*args)

loop.update_ema = counted
run_steps = loop.run_steps

def record(run):
    run_steps(run)  # DDP's buckets: as rebuilt after the first step, in the order gradients came (a run of one step
    if hasattr(run.model, "_get_ddp_logging_data"):  # has not rebuilt them yet: its first ones)
        data = run.model._get_ddp_logging_data()
        buckets.append(data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes"))

loop.run_steps = record
model, ema = train.train(train.parse_args(argv))
name = f"{argv[argv.index('--exp-name') + 1]}-{argv[argv.index('--max-train-steps') + 1]}"
units = [*model.blocks, *(getattr(model, attr) for attr, _ in model.head_taps.values())]
torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "graphs": graphs, "losses": losses,
            "norms": norms, "units": len(units), "kinds": len({type(u) for u in units}), "buckets": buckets},
           f"{out}/{name}-rank{os.environ['RANK']}.pt")
"""
# 24 images: an epoch is 4 micro-batches of 6 (2 optimizer steps) on 1, 2 and 3 processes alike (the sampler cuts
# nothing), so each global micro-batch is the same 6 images whatever the split; a run stopped at step 3 resumes in the
# middle of the second epoch. Width 128 in buckets of 0.05 MB: about 20 buckets for 3 compiled units.
IMAGES, STEPS = 24, ["--max-train-steps", "5"]
FLAGS = [*TINY_TRAIN, "--hidden-size", "128", "--num-heads", "4", "--batch-size", "6", "--gradient-accumulation-steps",
         "2", "--ddp-bucket-cap-mb", "0.05", "--logging-steps", "2", "--checkpointing-steps", "2"]


def make_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((IMAGES, 4, 8, 8)).astype(np.float32)
    write_latent_dataset(root, mean, np.full_like(mean, 0.1), rng.integers(0, 3, IMAGES), shard_size=8, num_classes=3)
    return record_checksums(root)


def train_in(tmp_path: Path, data: Path, name: str, nproc: int, *flags: str) -> None:
    r = torchrun(tmp_path, tmp_path / "worker.py", str(tmp_path), "--data-dir", str(data), "--output-dir",
                 str(tmp_path / "runs"), *FLAGS, "--exp-name", name, *flags, nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]


def results(tmp_path: Path, name: str, nproc: int) -> list[dict]:
    """Each rank's record of the run stopped at step 3 and resumed to step 5, joined: losses and gradient norms of
    steps 1-5, the final weights, and per process the optimizer steps at which graphs were compiled."""
    ranks = []
    for rank in range(nproc):
        first, resumed = (torch.load(tmp_path / f"{name}-{steps}-rank{rank}.pt", weights_only=False)
                          for steps in (3, 5))
        ranks.append({**resumed, "losses": torch.stack(first["losses"] + resumed["losses"]),
                      "norms": torch.stack(first["norms"] + resumed["norms"]),
                      "graphs": [first["graphs"], resumed["graphs"]], "buckets": first["buckets"] + resumed["buckets"]})
    return ranks


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, dict]:
    """The dataset, and one process's eager run of 5 steps straight at the same global batch (6, accumulated twice)."""
    tmp_path = tmp_path_factory.mktemp("one")
    data = make_dataset(tmp_path / "data")
    (tmp_path / "worker.py").write_text(WORKER)
    train_in(tmp_path, data, "one", 1, *STEPS)
    return data, torch.load(tmp_path / "one-5-rank0.pt", weights_only=False)


def assert_same_training(ranks: list[dict], reference: dict) -> None:
    """Every rank holds the same weights, bit for bit; losses, gradient norms and weights equal the one-process run's
    up to the float rounding of a different summation order (gradients summed per rank, then all-reduced): the norms
    see the gradients themselves (a wrong scale or sign moves AdamW's steps too little to show). The weights'
    tolerance is looser than the losses': AdamW divides each gradient entry by its running RMS, which enlarges the
    rounding of entries near zero (up to 4e-6 seen on weights of about 0.1, against the 1e-3 a step moves them)."""
    for other in ranks[1:]:
        for key in ("model", "ema"):
            for name, p in ranks[0][key].items():
                assert torch.equal(other[key][name], p), (key, name)
    assert ranks[0]["losses"].shape == (5, len(reference["losses"][0]))
    torch.testing.assert_close(ranks[0]["losses"], torch.stack(reference["losses"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranks[0]["norms"], torch.stack(reference["norms"]), rtol=1e-5, atol=0)
    for key in ("model", "ema"):
        for name, p in reference[key].items():
            torch.testing.assert_close(ranks[0][key][name], p, rtol=1e-4, atol=1e-5, msg=f"{key} {name}")


@pytest.mark.parametrize("nproc", [2, 3])
def test_ddp_with_many_buckets_and_a_resume_trains_as_one_process(tmp_path, one_process, nproc):
    """nproc processes, eager and with each block and head compiled before DDP wraps the model, stopped at step 3 (in
    the middle of an epoch) and resumed with --resume latest to step 5: the losses and gradient norms of each step and
    the final model and EMA equal one process's at the same global batch; DDP had more buckets than compiled units;
    each process compiled its graphs at its first optimizer step only, the resumed one too: at least one per kind of
    unit (block, head) and at most one per unit (identical blocks may share a graph)."""
    data, reference = one_process
    (tmp_path / "worker.py").write_text(WORKER)
    runs = {}
    for name, flag in (("eager", "--no-compile"), ("blocks", "--compile")):
        train_in(tmp_path, data, name, nproc, flag, "--max-train-steps", "3")
        train_in(tmp_path, data, name, nproc, flag, *STEPS, "--resume", "latest")
        assert "resumed from" in (tmp_path / f"runs/{name}/log.txt").read_text()
        runs[name] = ranks = results(tmp_path, name, nproc)
        assert_same_training(ranks, reference)
    for key in ("model", "ema"):  # compiled and eager on the same split: the same up to rounding (so far bit-equal)
        for name, p in runs["eager"][0][key].items():
            torch.testing.assert_close(ranks[0][key][name], p, rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
    for rank in ranks:  # the compiled run's
        for buckets in rank["buckets"]:
            assert len(str(buckets).split(",")) > rank["units"], rank["buckets"]  # more buckets than compiled units
        for graphs in rank["graphs"]:  # each process's: the first run's, the resumed run's
            assert rank["kinds"] <= len(graphs) <= rank["units"] and set(graphs) == {0}, rank["graphs"]
    assert runs["eager"][0]["graphs"] == [[], []]  # eager: nothing compiled
    log = (tmp_path / "runs/blocks/log.txt").read_text()
    assert "torch.compile: 3 blocks and heads, each compiled on its first call" in log
    assert "DDP: 0.05 MB gradient buckets" in log


def test_bf16_gradient_communication_trains_within_its_rounding(tmp_path, one_process):
    """--ddp-comm bf16 on 2 processes: the gradients are rounded to bf16 on their way between the ranks and nothing
    else changes, so the first step's losses (computed before any exchange) are the one-process run's, its gradient
    norm is within bf16's rounding (2^-8 relative, once for the cast and once for the sum) of the one-process run's
    without equalling it, and the weights move as far as AdamW's steps allow."""
    data, reference = one_process
    (tmp_path / "worker.py").write_text(WORKER)
    train_in(tmp_path, data, "bf16", 2, "--no-compile", "--ddp-comm", "bf16", *STEPS)
    bf16 = torch.load(tmp_path / "bf16-5-rank0.pt", weights_only=False)
    torch.testing.assert_close(bf16["losses"][0], reference["losses"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bf16["norms"][0], reference["norms"][0], rtol=1e-2, atol=0)
    assert not torch.equal(bf16["norms"][0], reference["norms"][0])
    assert any(not torch.equal(bf16["model"][k], p) for k, p in reference["model"].items())
    for key, p in reference["model"].items():  # AdamW moves a weight by about lr (1e-3) a step: 5 steps, twice that
        torch.testing.assert_close(bf16["model"][key], p, rtol=0, atol=2 * 5 * 1e-3, msg=key)
    assert "gradients communicated in bf16" in (tmp_path / "runs/bf16/log.txt").read_text()
