"""Metrics during training (train.py --eval-every): the EMA model samples K images through the sampling package, as
generate.py does, on all ranks at once, and ADM's metrics against --eval-ref are logged and appended to
<run dir>/metrics.jsonl."""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

import samplers
from cli import UsageError, cfg_channels_in_effect, check_cfg_channels
from devices import first_fault
from sampling.batch import SamplingSettings, sample_batch
from training.eval_flags import add_arguments, check_arguments  # noqa: F401  (train.py's flags, torch-free)

logger = logging.getLogger("train")
METRICS_FILE = "metrics.jsonl"
METRIC_KEYS = ("fid", "sfid", "inception_score", "inception_score_std", "precision", "recall")


class EvaluationFault(UsageError):
    """The evaluation failed on some process (e.g. out of memory while sampling); the checkpoint of its step is
    written, and every process stops with the same line."""


def read_rows(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl (a line cut short by a kill is ignored)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_row(run_dir: Path, row: dict) -> bool:
    """Append `row` unless its step has a row already; True if written. The line is flushed and synced."""
    path = Path(run_dir) / METRICS_FILE
    if any(r.get("step") == row["step"] for r in read_rows(run_dir)):
        return False
    text = json.dumps(row) + "\n"
    if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        text = "\n" + text  # after a line cut short by a kill
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return True


def sampling_settings(args: argparse.Namespace) -> SamplingSettings:
    """The sampling settings of the --eval-* flags (generate.py's defaults for the others, e.g. no time shift)."""
    return SamplingSettings(global_seed=args.eval_seed, label_sampling=args.eval_label_sampling,
                            num_steps=args.eval_num_steps, heun=args.eval_heun, cfg_scale=args.eval_cfg_scale,
                            cfg_channels=getattr(args, "eval_cfg_channels", "all"),
                            guidance_low=args.eval_guidance_low, guidance_high=args.eval_guidance_high,
                            mode=args.eval_mode, pixel_rounding=args.eval_pixel_rounding)


def generate_flags(args: argparse.Namespace) -> list[str]:
    """generate.py's flags that reproduce an evaluation's samples from the checkpoint of the same step."""
    flags = ["--mode", args.eval_mode, "--num-steps", str(args.eval_num_steps), "--cfg-scale", str(args.eval_cfg_scale),
             "--cfg-channels", str(getattr(args, "eval_cfg_channels", "all")),
             "--guidance-low", str(args.eval_guidance_low), "--guidance-high", str(args.eval_guidance_high),
             "--global-seed", str(args.eval_seed), "--label-sampling", args.eval_label_sampling,
             "--pixel-rounding", args.eval_pixel_rounding, "--num-fid-samples", str(args.eval_samples),
             "--compile" if args.compile else "--no-compile"]  # compiled kernels round differently: say which
    return flags + (["--heun"] if args.eval_heun else [])


class Evaluator:
    """Loads the VAE and the Inception network once; `run` evaluates the EMA model at one step on every rank."""

    def __init__(self, args: argparse.Namespace, run_args: dict, run_dir: Path, accelerator):
        from evaluations.inception import InceptionFeatures
        from latent_codecs.autoencoder import load_vae

        self.args, self.run_args, self.run_dir, self.accelerator = args, run_args, Path(run_dir), accelerator
        self.device = accelerator.device
        self.precision = "bf16" if self.device.type == "cuda" else "fp32"  # generate.py --precision auto
        self.compile = bool(args.compile)  # as the training model: per block, generate.py's unit too
        self.vae = load_vae(run_args["vae"]).to(self.device)
        self.inception = InceptionFeatures(args.inception_weights).to(self.device)
        self.reference = None  # computed on rank 0 at the first evaluation, then kept
        self.info = {"arch": {"latent_shape": list(run_args["latent_shape"])}, "latent_scale": run_args["latent_scale"],
                     "latent_shift": run_args["latent_shift"], "path_type": run_args["path_type"]}

    def due(self, step: int) -> bool:
        return step % self.args.eval_every == 0 or step == self.args.max_train_steps

    def pending(self, step: int) -> bool:
        """True when `step` is an evaluation step without a row (e.g. a kill interrupted its evaluation); rank 0
        reads metrics.jsonl and tells the others, so that all ranks agree even without a shared file system."""
        answer = [step > 0 and self.due(step) and all(r.get("step") != step for r in read_rows(self.run_dir))]
        if self.accelerator.num_processes > 1:
            torch.distributed.broadcast_object_list(answer, src=0)
        return answer[0]

    def _sample(self, ema: torch.nn.Module) -> tuple[list[int], np.ndarray]:
        """This rank's sample indices and their images, sampled exactly as generate.py samples them."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        indices = list(range(rank, self.args.eval_samples, world))  # generate.py's split of the indices
        settings = sampling_settings(self.args)
        if self.precision.startswith("bf16") or self.compile:  # a copy: the training EMA stays as it is
            # bf16: matmul weights copied straight to bf16 (no fp32 copy of the EMA): the same samples, less work
            net = samplers.matmul_weights_copy(ema) if self.precision.startswith("bf16") else copy.deepcopy(ema)
            ema = samplers.sampling_model(net, self.precision, compile=self.compile)
        images = [sample_batch(ema, self.vae, indices[b:b + self.args.eval_batch_size], settings, self.info,
                               self.device, self.precision)
                  for b in range(0, len(indices), self.args.eval_batch_size)]
        return indices, np.concatenate(images) if images else np.zeros((0, 1, 1, 3), np.uint8)

    def _extract(self, images: np.ndarray):
        """The Inception features of this rank's images (None for none)."""
        from evaluations import DEFAULT_BATCH_SIZE
        from evaluations.data import ArrayImages
        from evaluations.inception import extract_features

        return extract_features(self.inception, ArrayImages(images, "samples"), batch_size=DEFAULT_BATCH_SIZE,
                                device=self.device, progress=False) if len(images) else None

    def _local(self, ema: torch.nn.Module, step: int) -> tuple[list[int], object, str | None]:
        """This rank's (indices, features, None), or ([], None, the line naming what failed): an error here (e.g. out
        of memory on one GPU) must not leave this rank alone while the others wait for its features."""
        was_training, what = ema.training, "sampling its images"
        ema.eval()
        try:
            indices, images = self._sample(ema)
            what = "computing the Inception features of its images"
            return indices, self._extract(images), None
        except Exception as e:  # noqa: BLE001  (any error: every rank must hear of it)
            logger.warning("step %d: the evaluation failed while %s", step, what, exc_info=True)
            return [], None, f"{what}: {type(e).__name__}: {e}"
        finally:
            ema.train(was_training)

    def _agree(self, step: int, fault: str | None) -> None:
        """A point every rank reaches: raise EvaluationFault on every rank if any rank's `fault` is set (the line of
        the first such rank, gathered, so every rank's line and rank 0's log.txt name it); else return."""
        world = self.accelerator.num_processes
        found = first_fault(fault, world)
        if found is None:
            return
        rank, fault = found
        where = f" on process {rank}" if world > 1 else ""
        raise EvaluationFault(f"the evaluation at step {step} failed{where} while {fault}"
                              + ("; every process stopped with it" if world > 1 else "")
                              + f". The checkpoint of step {step} is written: fix the cause and run the same command "
                              f"with --resume latest, which evaluates step {step} again")

    def _gather(self, indices: list[int], feats):
        """Rank 0: every rank's features, in sample order (the Inception Score scores contiguous splits)."""
        from evaluations.inception import Features

        world = self.accelerator.num_processes
        parts = [(indices, feats)]
        if world > 1:
            parts = [None] * world if self.accelerator.is_main_process else None
            torch.distributed.gather_object((indices, feats), parts, dst=0)
        if not self.accelerator.is_main_process:
            return None
        order = np.argsort(np.concatenate([np.asarray(i, np.int64) for i, f in parts if f is not None]))
        return Features(*(np.concatenate([getattr(f, k) for _, f in parts if f is not None])[order]
                          for k in ("pool", "spatial", "logits")))

    def run(self, ema: torch.nn.Module, step: int, wall_seconds: float) -> dict | None:
        """Evaluate the EMA model at `step` on all ranks; rank 0 logs and appends the row (returned there). An error
        on any rank, in its sampling or features or in rank 0's scoring, stops every rank together (EvaluationFault)."""
        logger.info("step %d: evaluating the EMA model (%d samples, %s %d steps, CFG %g) against %s", step,
                    self.args.eval_samples, self.args.eval_mode, self.args.eval_num_steps, self.args.eval_cfg_scale,
                    self.args.eval_ref)
        start = time.time()
        indices, feats, fault = self._local(ema, step)
        self._agree(step, fault)  # every rank has its features, or every rank stops here
        features = self._gather(indices, feats)
        row = fault = None
        if self.accelerator.is_main_process:
            try:
                row = self._score(features, step, wall_seconds, start)
            except Exception as e:  # noqa: BLE001  (the others wait for rank 0 below: they must hear of it)
                logger.warning("step %d: the evaluation failed while scoring", step, exc_info=True)
                fault = f"scoring the samples against {self.args.eval_ref}: {type(e).__name__}: {e}"
        self._agree(step, fault)  # all ranks wait for each other here
        return row

    def _score(self, features, step: int, wall_seconds: float, start: float) -> dict:
        """Rank 0: score the gathered features, log them and append the row."""
        from evaluations.scoring import open_reference, reference_features, score_features

        accelerator = self.accelerator
        if self.reference is None:
            images, stats = open_reference(self.args.eval_ref, num_workers=0)
            self.reference = reference_features(images, stats, self.inception, device=self.device, progress=False)
        metrics = score_features(features, self.reference, device=self.device)
        eval_seconds = time.time() - start
        before = sum(r.get("eval_seconds", 0.0) for r in read_rows(self.run_dir))
        world = accelerator.num_processes
        row = {"step": step, "images_seen": step * self.args.batch_size,
               "wall_seconds": round(wall_seconds, 3),
               "gpu_hours": wall_seconds * world / 3600 if self.device.type == "cuda" else None,
               "eval_seconds": round(eval_seconds, 3),
               "eval_fraction": (before + eval_seconds) / max(wall_seconds + eval_seconds, 1e-9),
               **{k: metrics[k] for k in METRIC_KEYS}, "num_samples": metrics["num_samples"],
               "protocol": {"ref": str(self.args.eval_ref), "generate_flags": generate_flags(self.args),
                            "cfg_channels": cfg_channels_in_effect(self.args.eval_cfg_scale, getattr(
                                self.args, "eval_cfg_channels", "all"), self.run_args["latent_shape"][0]),
                            "precision": self.precision, "compiled": self.compile, "processes": world},
               "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if append_row(self.run_dir, row):
            logger.info("step %d: FID %.4g, sFID %.4g, IS %.4g%s; evaluation took %.1fs (%.1f%% of the run's "
                        "wall time so far)", step, row["fid"], row["sfid"], row["inception_score"],
                        "" if row["precision"] is None else
                        f", precision {row['precision']:.3f}, recall {row['recall']:.3f}",
                        eval_seconds, 100 * row["eval_fraction"])
        else:
            logger.warning("step %d: metrics.jsonl already holds this step; the new figures are not written", step)
        accelerator.log({f"eval/{k}": v for k, v in row.items() if k in METRIC_KEYS and v is not None}, step=step)
        return row


def make_evaluator(args: argparse.Namespace, run_args: dict, run_dir: Path, accelerator) -> Evaluator | None:
    """The evaluator when --eval-every is set (Inception weights that cannot be read are a usage error)."""
    if args.eval_every <= 0:
        return None
    check_cfg_channels("--eval-cfg-channels", getattr(args, "eval_cfg_channels", "all"), run_args["latent_shape"][0])
    from evaluations.data import EvaluationError

    try:
        return Evaluator(args, run_args, run_dir, accelerator)
    except EvaluationError as e:
        raise UsageError(f"--eval-every: {e}") from e
