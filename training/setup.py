"""The set-up of a training run (the loop itself is training/loop.py): run directory and log, the checkpoint to resume
from, accelerator, model, optimizer and EMA, methods, seeds and RNG restore, trackers, data."""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.util
import json
import logging
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import alignment
from alignment import ARCH_KEYS, model_from_args
from checkpoints import CHECKPOINT_FORMAT, DamagedCheckpointError, list_checkpoints, load_checkpoint, set_rng_state
from cli import UsageError
from devices import ddp_options, enable_deterministic_mode, gpu_launch_problem, on_rank0
from training import guard, run_settings
from training.run_lock import LOCK_NAME, RunLock, in_use_message, lock_age, read_holder, stale_reason

logger = logging.getLogger("train")


# ----------------------------------------------------------------------------------------------
# The run directory, its log and the checkpoint to resume from


def locate_run(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (if any); refuses to reuse a run without --resume."""
    run_dir = Path(args.output_dir) / args.exp_name
    if args.resume == "latest":
        ckpts = list_checkpoints(run_dir / "checkpoints")
        return run_dir, ckpts[max(ckpts)] if ckpts else None
    if args.resume is not None:
        if not Path(args.resume).is_file():
            raise UsageError(f"--resume {args.resume}: " + ("a folder, not a checkpoint file: name its NNNNNNN.pt, or "
                             "resume a run with --resume latest and its --output-dir / --exp-name" if Path(
                                 args.resume).is_dir() else "no such checkpoint file"))
        return run_dir, Path(args.resume)
    if run_dir.exists() and any(run_dir.iterdir()):
        holder = read_holder(run_dir / LOCK_NAME)
        if holder is not None and stale_reason(holder, lock_age(run_dir / LOCK_NAME)) is None:
            raise UsageError(in_use_message(run_dir, holder))
        raise UsageError(f"run directory {run_dir} already exists; pass --resume latest to continue it or "
                         f"choose another --exp-name (nothing was changed)")
    return run_dir, None


def check_same_run(run_dir: Path, run_args: dict) -> str:
    """--resume latest found no checkpoint: the run starts anew in `run_dir`, which may hold an earlier attempt of
    this run (an args.json with the same settings) but not another run's files (UsageError, before anything there is
    written or removed). Returns the line for the log."""
    path = run_dir / "args.json"
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict) or not isinstance(raw.get("model"), str):
                raise ValueError("not the settings of a train.py run")
            # the settings it recorded (an older version's file lacks today's keys: those are not differences)
            recorded = alignment.upgrade_run_args(raw).keys()
            saved = {k: v for k, v in alignment.with_defaults(raw).items() if k in recorded}
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"--resume latest: {run_dir} holds no checkpoint, and its args.json cannot be read "
                             f"({e}), so it may be another run's: choose another --exp-name, or move the directory "
                             "away (nothing was changed)") from e
        differ = [f"--{k.replace('_', '-')}: checkpoint {saved[k]!r}, now {run_args.get(k)!r}" for k in ARCH_KEYS
                  if k in saved and run_settings.plain(saved[k]) != run_settings.plain(run_args.get(k))]
        differ += run_settings.setting_differences(saved, run_args)[1]
        if differ:
            shown = "; ".join(d.replace(": checkpoint ", ": args.json ", 1) for d in differ)
            raise UsageError(f"--resume latest: {run_dir} holds no checkpoint, and another run's settings "
                             f"({path}): {shown}. Choose another --exp-name, or move the directory away (nothing "
                             "was changed)")
    return f"no checkpoint in {run_dir}: starting a new run"


def open_resume_checkpoint(path: Path, trust: bool, run_args: dict, last_step: int) -> dict:
    """The checkpoint to resume from, checked against this run's architecture and `last_step`, where the run ends
    (UsageError if it does not fit, or is past the end)."""
    try:
        checkpoint = load_checkpoint(path, trust=trust)
    except DamagedCheckpointError as e:
        raise UsageError(f"--resume: {e}. {guard.intact_alternative(path)}") from e
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--resume: {e}") from e
    needed = {"args", "model", "ema", "opt", "rng", "data"}
    if checkpoint.get("format") != CHECKPOINT_FORMAT or not needed <= checkpoint.keys():
        raise UsageError(f"checkpoint {path} is not a train.py checkpoint (model, EMA, optimizer, RNG and data "
                         "position); exports and REPA's checkpoints are for sampling")
    saved = alignment.with_defaults(checkpoint["args"])  # what the run trained with (old runs: 0 = default block)
    mismatched = [k for k in ARCH_KEYS if k in saved and saved[k] != run_args.get(k)]
    if mismatched:
        raise UsageError(f"checkpoint {path} does not match this run: " + ", ".join(
            f"{k}: checkpoint {saved[k]!r} vs now {run_args.get(k)!r}" for k in mismatched))
    if isinstance(checkpoint.get("step"), int) and checkpoint["step"] > last_step:
        flag = ("--max-train-steps", run_args["max_train_steps"]) if last_step == run_args["max_train_steps"] else \
            ("--epochs", f"{run_args['epochs']} (its passes end at step {last_step})")
        raise UsageError(f"{flag[0]} {flag[1]}: checkpoint {path} is at step {checkpoint['step']} already; pass a "
                         f"larger {flag[0]} to train on")
    return checkpoint


def make_run_dir(run_dir: Path, lock: RunLock) -> tuple[bool, list[str]]:
    """Make and lock the run directory: (whether this call created it, the lock's log lines). UsageError if it cannot
    be written (a directory this call made is removed again) or another train.py holds it."""
    created = False
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            run_dir.mkdir()  # atomic: of two runs starting at once, one creates it
            created = True
        notes = lock.acquire()
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("probe")  # a few bytes: an empty file fits on a full disk
        probe.unlink()
    except OSError as e:
        lock.release()
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise UsageError(f"--output-dir: cannot write the run directory {run_dir} ({e})") from e
    return created, notes


def setup_logging(run_dir: Path, is_main: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, handlers=handlers, force=True,
                        format="[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


# ----------------------------------------------------------------------------------------------
# Accelerator, model, optimizer, trackers


def make_accelerator(args: argparse.Namespace):
    """The Accelerator (device, processes, precision, trackers), after the processes-vs-GPUs check."""
    from accelerate import Accelerator
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs, InitProcessGroupKwargs

    problem = gpu_launch_problem(args.device)  # before the process group: every rank stops, none hangs
    if problem is not None:
        raise UsageError(problem)
    if args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:
        raise UsageError(f"--report-to {args.report_to} needs the {args.report_to} package, an optional one: "
                         f"pip install -e '.[trackers]' (or pip install {args.report_to})")
    if args.deterministic:
        enable_deterministic_mode()
    # cpu=True without CUDA (or with --device cpu), so that torchrun's processes form a gloo group instead of running
    # alone. A long timeout: rank 0 writing an XL checkpoint to a slow file system keeps the others waiting.
    pg_kwargs = InitProcessGroupKwargs(timeout=datetime.timedelta(hours=1))
    hook = {"fp32": DDPCommunicationHookType.NO, "bf16": DDPCommunicationHookType.BF16}[args.ddp_comm]
    ddp_kwargs = DistributedDataParallelKwargs(**ddp_options(args.ddp_bucket_cap_mb, args.ddp_static_graph),
                                               comm_hook=hook)
    use_cpu = args.device == "cpu" or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=args.mixed_precision,
                              kwargs_handlers=[pg_kwargs, ddp_kwargs],
                              log_with=None if args.report_to == "none" else args.report_to,
                              project_dir=str(Path(args.output_dir) / args.exp_name))
    if accelerator.device.type == "cuda" and args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def build_model_and_optimizer(args: argparse.Namespace, run_args: dict, checkpoint: dict | None,
                              device: torch.device):
    """(model, EMA, AdamW) on the device: identical initial weights on every rank, or the checkpoint's."""
    torch.manual_seed(args.seed)
    model = model_from_args(run_args)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
    model.to(device)
    ema.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon, weight_decay=args.adam_weight_decay,
                                  fused=device.type == "cuda")
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["opt"])
    return model, ema, optimizer


def log_summary(args: argparse.Namespace, model: torch.nn.Module, methods: list, device: torch.device, world: int,
                local_batch: int) -> None:
    if args.deterministic:
        logger.info("deterministic kernels on %s (CUBLAS_WORKSPACE_CONFIG=%s, math attention)", device,
                    os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    n_params = sum(p.numel() for p in model.parameters())
    prefixes = model.head_state_prefixes()
    head_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))
    logger.info("model %s: %.2fM parameters (%.2fM in alignment heads)", args.model, n_params / 1e6,
                head_params / 1e6)
    logger.info("effective global batch %d images per optimizer step = %d processes x %d per process x %d "
                "accumulation steps", world * local_batch * args.gradient_accumulation_steps, world, local_batch,
                args.gradient_accumulation_steps)
    logger.info("alignment: %s", "none (vanilla SiT)" if not methods else "; ".join(m.describe() for m in methods))
    if world > 1:
        logger.info("DDP: %g MB gradient buckets (viewed in place), no buffer broadcast, static graph %s, gradients "
                    "communicated in %s", args.ddp_bucket_cap_mb, "on" if args.ddp_static_graph else "off",
                    args.ddp_comm)
    for method in methods:
        if method.external_parameters():
            logger.info("%s runs %.1fM parameters outside the trained model each step", method.name,
                        method.external_parameters() / 1e6)


# ----------------------------------------------------------------------------------------------
# Data


def open_dataset(args: argparse.Namespace, with_images: bool = False):
    from dataset import DatasetError, LatentDataset

    if not Path(args.data_dir).exists():
        raise UsageError(f"--data-dir {args.data_dir} does not exist (run preprocessing/ first)")
    try:
        return LatentDataset(args.data_dir, in_memory=args.in_memory, use_flip=args.flip, seed=args.seed,
                             with_images=with_images)
    except DatasetError as e:
        raise UsageError(f"--data-dir {args.data_dir}: {e}") from e


def check_dataset_flags(args: argparse.Namespace, dataset) -> None:
    """REPA's --resolution and --num-classes: the dataset fixes both; a flag that disagrees stops the run."""
    found = {"resolution": dataset.manifest.get("resolution"), "num_classes": dataset.num_classes}
    for name, value in found.items():
        given, flag = getattr(args, name, None), f"--{name.replace('_', '-')}"
        if given is None:
            continue
        if value is None:
            raise UsageError(f"{flag} {given}: --data-dir {args.data_dir} does not record its {name.replace('_', ' ')}"
                             f" (its manifest.json has no '{name}'), so the flag cannot be checked: drop it")
        if int(given) != int(value):
            raise UsageError(f"{flag} {given}, but --data-dir {args.data_dir} holds {name.replace('_', ' ')} "
                             f"{value}: drop the flag or pass the matching dataset")


def epoch_step_limit(args: argparse.Namespace, samples_per_rank: int, local_batch: int) -> int:
    """The optimizer step at which --epochs passes over the data end (REPA's --epochs; micro-batches carry on
    across an epoch's end, so that is micro-batches per epoch x epochs / accumulation, rounded down)."""
    micro_batches = (samples_per_rank // local_batch) * args.epochs
    return max(1, micro_batches // args.gradient_accumulation_steps)


def batches(dataset, sampler, loader_kwargs: dict, epoch: int, position: int):
    """Yield (batch, epoch, position after the batch) forever; `position` counts this rank's samples."""
    local_batch = loader_kwargs["batch_size"]
    while True:
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        sampler.set_start(position)
        # Its own generator: creating a loader must not draw from the global RNG (that would break exact resume).
        loader = DataLoader(dataset, sampler=sampler, drop_last=True, generator=torch.Generator(), **loader_kwargs)
        for batch in loader:
            position += local_batch
            yield batch, epoch, position
        epoch, position = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# The parts of set_up_run (training/loop.py), in the order it calls them


def split_batch(args: argparse.Namespace, world: int) -> int:
    """The per-process batch."""
    # REPA's meaning: --batch-size is split over the processes, and accumulation multiplies it.
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the number of processes ({world})")
    return args.batch_size // world


def open_run_dir(args: argparse.Namespace, accelerator, run_dir: Path, hold: contextlib.ExitStack) -> None:
    """The run directory made and locked by rank 0 (every rank learns the outcome from it), the log opened in it.
    The lock stays in `hold` (released when it closes, after the last checkpoint write)."""
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    lock = hold.enter_context(RunLock(run_dir))
    created, notes = on_rank0(lambda: make_run_dir(run_dir, lock), rank, world)
    if created and is_main:
        args.created_run_dir = run_dir  # removed again if the run is refused before its first step
    setup_logging(run_dir, is_main)
    for note in notes:
        logger.info("%s", note)
    if is_main:
        guard.clean_run_dir(run_dir)


def log_run_start(args: argparse.Namespace, accelerator, checkpoint: dict | None, resume_from: Path | None,
                  compile_by_default: bool) -> None:
    """The log's first lines: notes, the checkpoint resumed from, torch.compile's setting and why."""
    device, world = accelerator.device, accelerator.num_processes
    for note in args.notes:  # first: which methods a REPA-style command line trains, deprecated spellings
        logger.info("note: %s", note)
    if checkpoint is not None and checkpoint["args"].get("world_size") != world:
        logger.warning("resuming with %d processes instead of %d: the data order and noise will differ from "
                       "an uninterrupted run", world, checkpoint["args"].get("world_size"))
    if checkpoint is not None:
        logger.info("checkpoint %s: %s", resume_from, guard.checkpoint_status(resume_from))
    why = (f"the default on {device.type}{' with --deterministic' if args.deterministic else ''}"
           if compile_by_default else f"--{'' if args.compile else 'no-'}compile")
    logger.info("torch.compile: %s (%s)", "on" if args.compile else "off", why)


def resume_position(checkpoint: dict | None, run_dir: Path) -> tuple[int, int, int]:
    """Step, data epoch and position to start from; refused if the run holds checkpoints after the one resumed."""
    step, epoch, position = 0, 0, 0
    if checkpoint is not None:
        step, epoch, position = checkpoint["step"], checkpoint["data"]["epoch"], checkpoint["data"]["position"]
        newer = [s for s in list_checkpoints(run_dir / "checkpoints") if s > step]
        if newer:
            raise UsageError(f"{run_dir / 'checkpoints'} holds checkpoints after step {step} (e.g. "
                             f"{max(newer):07d}.pt) from another attempt; move them away before resuming from an "
                             "earlier one")
    return step, epoch, position


def set_up_methods(args: argparse.Namespace, methods: list, device: torch.device, raw_model, image_size) -> None:
    """Each alignment method's set-up (frozen encoders to the device, heads on the model)."""
    # Before the per-rank seeding and the RNG restore: building an encoder draws random initial weights, which would
    # otherwise shift a resumed run's noise stream away from the uninterrupted run's.
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    try:
        for method in methods:
            method.setup(device, raw_model, image_size=image_size, autocast_dtype=autocast_dtype)
    except ValueError as e:
        raise UsageError(str(e)) from e


def seed_and_restore_rng(args: argparse.Namespace, accelerator, checkpoint: dict | None) -> None:
    """Per-rank seeds; on a resume, the fp16 loss scale and this rank's RNG state from the checkpoint."""
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    random.seed(args.seed + rank)
    np.random.seed((args.seed + rank) % 2**32)
    torch.manual_seed(args.seed * 1000003 + rank)  # per-rank noise and time draws
    if checkpoint is not None:
        if accelerator.scaler is not None and checkpoint.get("scaler") is not None:
            accelerator.scaler.load_state_dict(checkpoint["scaler"])  # fp16 loss scale
        states = checkpoint["rng"]
        if len(states) == world:
            set_rng_state(states[rank], device)
