"""The quickstart's subprocesses: the encode, train.py and generate.py commands of each run, where their outputs go,
running them with their output logged (and a few lines echoed), and reading train.py's log back."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from quickstart_progress import eta_text

REPO = Path(__file__).resolve().parents[1]
ARMS = ("vae-repa", "vanilla")


def run_name(arm: str, seed: int, args: argparse.Namespace) -> str:
    return arm if args.seeds == 1 else f"{arm}-seed{seed}"


def eval_steps(args: argparse.Namespace) -> list[int]:
    """The steps whose checkpoints are sampled and scored: --curve-points of them, evenly spaced, the last included."""
    every = args.train_steps // args.curve_points
    return sorted({every * (k + 1) for k in range(args.curve_points - 1)} | {args.train_steps})


def encode_command(args: argparse.Namespace, out: Path, image_dir: Path, scale: float, shift: float) -> list[str]:
    """preprocessing.encode with the tiny VAE in out/vae: the images to latent shards in out/latents."""
    return [sys.executable, "-m", "preprocessing.encode", "--source", str(image_dir),
            "--dest", str(out / "latents"), "--resolution", str(args.resolution), "--vae", str(out / "vae"),
            "--scale", repr(scale), "--shift", repr(shift), "--dtype", "fp32", "--batch-size", "250",
            "--num-workers", "0"]


def train_command(args: argparse.Namespace, out: Path, arm: str, seed: int | None = None) -> list[str]:
    seed = args.seed if seed is None else seed
    steps = eval_steps(args)
    every = steps[0] if len(steps) > 1 else args.train_steps
    cmd = [sys.executable, "train.py", "--data-dir", str(out / "latents"), "--output-dir", str(out / "runs"),
           "--exp-name", run_name(arm, seed, args), "--seed", str(seed),
           "--model", "SiT-S/2", "--depth", str(args.depth), "--hidden-size", str(args.hidden_size),
           "--num-heads", str(args.num_heads), "--vae-repa-depth", str(args.vae_repa_depth),
           "--vae-repa-coeff", str(args.vae_repa_coeff),
           "--max-train-steps", str(args.train_steps), "--batch-size", str(args.batch_size),
           "--learning-rate", str(args.learning_rate), "--ema-decay", f"{args.ema_decay:.6f}",
           "--logging-steps", str(args.logging_steps), "--checkpointing-steps", str(every),
           "--keep-last", "1", "--keep-every", str(every), "--sample-every", "0", "--mixed-precision", "no",
           "--num-workers", "0", "--in-memory", "--no-flip"]
    return cmd + (["--no-align"] if arm == "vanilla" else [])


def sample_dir(args: argparse.Namespace, out: Path, name: str, step: int) -> Path:
    return out / "samples" / name if args.curve_points == 1 else out / "samples" / name / f"step-{step:07d}"


def generate_command(args: argparse.Namespace, out: Path, arm: str, seed: int | None = None,
                     step: int | None = None) -> list[str]:
    """generate.py on one checkpoint; the sampling seed is --seed for every run, so all runs share the noise."""
    name = run_name(arm, args.seed if seed is None else seed, args)
    step = args.train_steps if step is None else step
    return [sys.executable, "generate.py", "--ckpt", str(out / "runs" / name / "checkpoints" / f"{step:07d}.pt"),
            "--sample-dir", str(sample_dir(args, out, name, step)), "--mode", args.sampler,
            "--num-steps", str(args.sampling_steps), "--cfg-scale", str(args.cfg_scale),
            "--num-fid-samples", str(args.num_samples), "--label-sampling", "balanced",
            "--global-seed", str(args.seed), "--per-proc-batch-size", str(min(args.num_samples, 500)),
            "--device", args.device]


def subprocess_env(device: str) -> dict[str, str]:
    """Environment for the pipeline's subprocesses; `cpu` hides the GPUs from them."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_logged(cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
               echo: Callable[[str], str | None] = lambda line: None, cwd: Path = REPO) -> None:
    """Run a command, its stdout and stderr into `log_path`; print what `echo` returns for each line (None: nothing).

    Raises RuntimeError with the end of the log when the command fails.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            for part in line.rstrip("\n").split("\r"):  # tqdm redraws with carriage returns
                shown = echo(part) if part.strip() else None
                if shown:
                    print("      " + shown.strip(), flush=True)
        code = proc.wait()
    if code != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise RuntimeError(f"command failed with exit status {code}: {' '.join(cmd)}\n"
                           f"--- last lines of {log_path} ---\n{tail}")


def train_progress_filter(args: argparse.Namespace) -> Callable[[str], str | None]:
    """What to show of train.py's output: the model summary and about 5 of the loss lines, each with the time
    left at the rate so far."""
    every = max(args.logging_steps, args.train_steps // 5 // args.logging_steps * args.logging_steps)
    start = time.time()

    def show(line: str) -> str | None:
        match = re.search(r"\bstep (\d+): .*|\bmodel .* parameters.*", line)
        if match is None or (match.group(1) is not None and int(match.group(1)) % every):
            return None
        shown = re.sub(r" ?images_per_s=\S+", "", match.group(0))
        if match.group(1) is not None:
            step = int(match.group(1))
            shown += f"  [{eta_text(time.time() - start, step, args.train_steps)}]"
        return shown

    return show


LOG_LINE = re.compile(r"\bstep (\d+): (.*)$")
LOG_VALUE = re.compile(r"(\w+)=([-+0-9.eEinfa]+)")


def parse_train_log(path: Path) -> dict[str, np.ndarray]:
    """{"step": ..., "loss": ..., "vae_repa_loss": ..., ...} from train.py's `step N: k=v ...` lines (`loss` is the
    denoising loss, as REPA logs it)."""
    rows: dict[str, list[float]] = {}
    for line in Path(path).read_text().splitlines():
        match = LOG_LINE.search(line)
        if match is None:
            continue
        values = {"step": float(match.group(1))}
        values.update({k: float(v) for k, v in LOG_VALUE.findall(match.group(2))})
        for key, value in values.items():
            rows.setdefault(key, []).append(value)
    return {k: np.asarray(v) for k, v in rows.items()}
