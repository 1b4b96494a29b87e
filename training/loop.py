"""The training loop, apart from train.py's command line (as edm2 keeps them): steps, logging, checkpoints, sample
grids; its set-up is in training/setup.py."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import alignment
from checkpoints import CHECKPOINT_FORMAT, rng_state
from cli import UsageError
from devices import resolve_compile
from integrity import atomic_write, worker_init
from latent_codecs.autoencoder import decode_latents, load_vae
from loss import LossConfig, training_loss
from training import guard, run_settings
from training.checkpoint_writer import CheckpointWriter, prune_checkpoints
from training.evaluation import make_evaluator
from training.setup import (
    batches,
    build_model_and_optimizer,
    check_dataset_flags,
    check_same_run,
    epoch_step_limit,
    locate_run,
    log_run_start,
    log_summary,
    make_accelerator,
    open_dataset,
    open_resume_checkpoint,
    open_run_dir,
    resume_position,
    seed_and_restore_rng,
    set_up_methods,
    split_batch,
)
from training.trackers import init_trackers, settle_project

logger = logging.getLogger("train")


# ----------------------------------------------------------------------------------------------
# EMA, checkpoints, sample grids


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over all parameters at once."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


@torch.no_grad()
def sample_grid(ema, vae, args: dict, device: torch.device, n: int, steps: int) -> torch.Tensor:
    """Images in [0, 1] from the EMA model: fixed noise and labels, Euler ODE, decoded by the VAE."""
    from samplers import euler_sampler

    gen = torch.Generator().manual_seed(args["seed"])
    noise = torch.randn(n, *args["latent_shape"], generator=gen).to(device)
    labels = (torch.arange(n) % args["num_classes"]).to(device)
    latents = euler_sampler(ema, noise, labels, num_steps=steps, path_type=args["path_type"])
    images = decode_latents(vae, latents, args["latent_scale"], args["latent_shift"])
    return ((images + 1) / 2).clamp(0, 1).cpu()


def save_checkpoint(accelerator, writer: CheckpointWriter, state: dict, run_dir: Path,
                    args: argparse.Namespace) -> None:
    """Every rank's RNG state gathered, then rank 0 hands the checkpoint to the background writer (a snapshot in CPU
    memory: training goes on while it is written), which prunes by the retention rule once it is written."""
    device, world, step = accelerator.device, accelerator.num_processes, state["step"]
    rng_states = [rng_state(device)]
    if world > 1:
        rng_states = [None] * world
        torch.distributed.all_gather_object(rng_states, rng_state(device))
    if not accelerator.is_main_process:
        return
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    folder = run_dir / "checkpoints"
    # older ones go only once this one is written, fsynced and read back against what was written (integrity.py)
    prune = functools.partial(prune_checkpoints, folder, step, args.keep_last, args.keep_every,
                              getattr(args, "eval_every", 0))
    writer.submit({"format": CHECKPOINT_FORMAT, **state, "rng": rng_states, "scaler": scaler},
                  folder / f"{step:07d}.pt", after=prune)


def save_sample_grid(ema, vae, run_args: dict, device, run_dir: Path, step: int, accelerator) -> None:
    from torchvision.utils import make_grid, save_image

    images = sample_grid(ema, vae, run_args, device, run_args["sample_grid_size"], run_args["sample_grid_steps"])
    grid = make_grid(images, nrow=int(math.ceil(math.sqrt(len(images)))))
    path = run_dir / "samples" / f"{step:07d}.png"
    with atomic_write(path) as f:
        save_image(grid, f, format="png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", grid, global_step=step)
        else:
            tracker.log_images({"samples": [(grid.permute(1, 2, 0).numpy() * 255).astype(np.uint8)]}, step=step)
    logger.info("saved sample grid %s", path)


# ----------------------------------------------------------------------------------------------
# Training


def step_inputs(batch: dict, needs: set, ema: torch.nn.Module, device: torch.device, epoch: int) -> dict:
    """What the enabled alignment methods need from this batch (alignment.StepInputs' optional fields)."""
    inputs = {"epoch": epoch}
    if "posterior_mean" in needs:
        inputs["posterior_mean"] = batch["target"].to(device, non_blocking=True)
    if "images" in needs:
        inputs["images"] = batch["images"].to(device, non_blocking=True)
    if "teacher" in needs:
        inputs["teacher"] = ema
    return inputs


def accumulate_gradients(model, null_class: int, data, accelerator, args: argparse.Namespace, loss_config: LossConfig,
                         methods: list, needs: set, ema: torch.nn.Module,
                         watch: guard.Watch | None = None) -> tuple[torch.Tensor, int, int]:
    """Forward and backward of one optimizer step's micro-batches (gradients synchronised on the last one only).

    Returns the mean over micro-batches of the loss terms (`loss_config.terms(methods)`), and the data epoch and
    position after them."""
    device, n = accelerator.device, args.gradient_accumulation_steps
    parts = 0
    for micro in range(n):
        batch, epoch, position = next(data)
        x, y = batch["x"].to(device, non_blocking=True), batch["y"].to(device, non_blocking=True)
        if watch is not None:
            watch.note_batch(x, batch["index"])
        inputs = step_inputs(batch, needs, ema, device, epoch)
        with accelerator.no_sync(model) if micro < n - 1 else contextlib.nullcontext(), accelerator.autocast():
            out = training_loss(model, x, y, loss_config, null_class, methods, **inputs)
            accelerator.backward(out["total"] / n)
        parts = parts + torch.stack([out[k].detach() for k in loss_config.terms(methods)]) / n
    return parts, epoch, position


@dataclass
class Run:
    """A training run once set up: what the step loop reads, and the position it advances."""

    args: argparse.Namespace
    accelerator: Any
    run_dir: Path
    run_args: dict  # the settings as args.json and the checkpoints record them
    methods: list
    needs: set  # what the methods need from each batch (step_inputs)
    loss_config: LossConfig
    raw_model: torch.nn.Module
    model: torch.nn.Module  # raw_model (its blocks compiled with --compile) as accelerate prepared it (DDP)
    ema: torch.nn.Module
    optimizer: Any
    data: guard.DataStream  # (batch, epoch, position) from the resumable loader
    step: int
    epoch: int
    position: int
    vae: Any  # for the sample grids (rank 0, --sample-every > 0), else None
    watch: guard.Watch
    writer: CheckpointWriter  # rank 0's background checkpoint writes (idle on the other ranks)
    evaluator: Any
    clock_start: float  # time.time() less the seconds trained before a resume


@dataclass
class LogWindow:
    """The losses and the grad norm summed since the last log line, and when and at which step that was."""

    names: list[str]
    sums: torch.Tensor
    since: float
    since_step: int


def train(args: argparse.Namespace):
    """Run training; returns the (unwrapped) model and its EMA on this process."""
    # `hold` keeps the run directory's lock until the block ends, after the last checkpoint write (run.writer's)
    with contextlib.ExitStack() as hold:
        try:
            run = set_up_run(args, hold)
        except OSError as e:  # a full disk, a folder that cannot be written: one line, the directory discarded
            where = f" ({e.filename})" if e.filename else ""
            raise UsageError(f"the run's set-up failed: {e.strerror or e}{where}") from e
        with run.writer:  # however training ends, the checkpoint write in flight is waited for
            # a kill interrupted this step's evaluation: redo it
            if run.evaluator is not None and run.evaluator.pending(run.step):
                run.evaluator.run(run.ema, run.step, time.time() - run.clock_start)
            run_steps(run)
            # the last write has ended, and every rank knows whether it failed
            run.watch.check(run.step, sync=True, before_checkpoint=True)
        # leave together: a rank that exits while another is in a collective (the last checkpoint's) can abort it
        run.accelerator.wait_for_everyone()
        run.accelerator.end_training()
    logger.info("done: %d steps, run directory %s", run.step, run.run_dir)
    return run.raw_model, run.ema


# ----------------------------------------------------------------------------------------------
# Set-up


def set_up_run(args: argparse.Namespace, hold: contextlib.ExitStack) -> Run:
    """Everything before the first step, in this order: settings and checkpoint checked, run directory (locked in
    `hold`) and log, model and optimizer, methods, seeds and RNG restore, data loader, trackers, guard watch,
    evaluator."""
    accelerator = make_accelerator(args)
    device, world, is_main = accelerator.device, accelerator.num_processes, accelerator.is_main_process
    local_batch = split_batch(args, world)
    compile_by_default = args.compile is None
    # the value used, as run_args (args.json, checkpoints) record it
    args.compile = resolve_compile(args.compile, device, args.deterministic)

    run_dir, resume_from = locate_run(args)
    needs = set().union(*(m.needs for m in alignment.build_methods(vars(args))))
    dataset = open_dataset(args, with_images="images" in needs)
    check_dataset_flags(args, dataset)
    run_args = {k: v for k, v in vars(args).items() if k not in alignment.peers.PARSE_ONLY}
    run_args.update(latent_shape=list(dataset.latent_shape), num_classes=dataset.num_classes, vae=dataset.vae,
                    latent_scale=dataset.scale, latent_shift=dataset.shift, world_size=world)
    # before anything is written: a checkpoint that is refused or does not fit leaves no run directory behind
    last_step = args.max_train_steps if args.epochs is None else min(args.max_train_steps, epoch_step_limit(
        args, len(dataset) // world, local_batch))  # where the run ends: a checkpoint past it is refused
    checkpoint = None if resume_from is None else open_resume_checkpoint(resume_from, args.trust_checkpoint, run_args,
                                                                         last_step)
    # a peer's settings (flips, SRA's schedule and teacher): the dataset's resolution, or the run's own on a resume
    args.notes += alignment.peers.settle(args, None if checkpoint is None else alignment.with_defaults(
        checkpoint["args"]), dataset.manifest.get("resolution"), world)
    run_args.update({k: getattr(args, k) for k in alignment.peers.SETTLED})
    if dataset.use_flip != args.flip:  # a resumed run's own setting
        dataset = open_dataset(args, with_images="images" in needs)
    methods = alignment.build_methods(run_args)
    settle_project(args, run_args, checkpoint, run_dir)
    changed = {} if checkpoint is None else run_settings.compare_settings(
        alignment.with_defaults(checkpoint["args"]), run_args, resume_from)
    if args.resume == "latest" and checkpoint is None:  # another run's files are refused, nothing touched yet
        args.notes.append(check_same_run(run_dir, run_args))
    if checkpoint is not None and (run_dir / "args.json").is_file():
        run_settings.read_args_json(run_dir / "args.json")  # a malformed one is refused before anything is written
    if len(dataset) // world < local_batch:
        raise UsageError(f"--data-dir {args.data_dir} holds {len(dataset)} latents: too few for --batch-size "
                         f"{args.batch_size} (a per-process batch of {local_batch} on {world} processes)")
    open_run_dir(args, accelerator, run_dir, hold)
    log_run_start(args, accelerator, checkpoint, resume_from, compile_by_default)

    raw_model, ema, optimizer = build_model_and_optimizer(args, run_args, checkpoint, device)
    step, epoch, position = resume_position(checkpoint, run_dir)
    if is_main:
        run_settings.record_args(run_dir, run_args, changed, step)
    if args.compile:  # per block, before DDP wraps the model; dynamo must not split the blocks at DDP's buckets
        torch._dynamo.config.optimize_ddp = False
        logger.info("torch.compile: %d blocks and heads, each compiled on its first call",
                    raw_model.compile_blocks())
    model, optimizer = accelerator.prepare(raw_model, optimizer)

    set_up_methods(args, methods, device, raw_model, dataset.image_size)
    if args.compile:  # SRA's EMA teacher blocks, REPA's encoder blocks: neither is in DDP, counted apart
        counts = ", ".join(f"{m.name} {n}" for m in methods if (n := m.compile_blocks(ema)))
        if counts:
            logger.info("torch.compile: also the blocks the methods run outside the trained model: %s", counts)
    seed_and_restore_rng(args, accelerator, checkpoint)
    if checkpoint is not None:
        logger.info("resumed from %s at step %d (epoch %d, position %d)", resume_from, step, epoch, position)

    loss_config = LossConfig(path_type=args.path_type, weighting=args.weighting, cfg_prob=args.cfg_prob,
                             cos_coeff=args.cos_loss_coeff)
    data = open_loader(args, dataset, accelerator, local_batch, epoch, position)
    vae = load_vae(run_args["vae"]).to(device) if args.sample_every > 0 and is_main else None
    init_trackers(accelerator, args, run_args, run_dir)
    log_summary(args, raw_model, methods, device, world, local_batch)
    writer = CheckpointWriter()
    watch = guard.Watch(accelerator, dataset, guard.start_data_verification(dataset, args, is_main), run_dir, writer,
                        data)
    evaluator = make_evaluator(args, run_args, run_dir, accelerator)  # the Inception network, loaded once
    args.created_run_dir = None  # set-up done: from here on the run directory is kept whatever happens
    clock_start = time.time() - (checkpoint.get("wall_seconds", 0.0) if checkpoint is not None else 0.0)
    return Run(args=args, accelerator=accelerator, run_dir=run_dir, run_args=run_args, methods=methods, needs=needs,
               loss_config=loss_config, raw_model=raw_model, model=model, ema=ema, optimizer=optimizer, data=data,
               step=step, epoch=epoch, position=position, vae=vae, watch=watch, writer=writer, evaluator=evaluator,
               clock_start=clock_start)


def open_loader(args: argparse.Namespace, dataset, accelerator, local_batch: int, epoch: int,
                position: int) -> guard.DataStream:
    """The resumable data stream from (epoch, position); --epochs lowers args.max_train_steps to its last step."""
    from dataset import ResumableDistributedSampler

    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    sampler = ResumableDistributedSampler(len(dataset), num_replicas=world, rank=rank, seed=args.seed,
                                          shuffle=True, drop_last=True)
    loader_kwargs = dict(batch_size=local_batch, num_workers=args.num_workers, pin_memory=device.type == "cuda",
                         persistent_workers=False, worker_init_fn=worker_init() if args.num_workers > 0 else None)
    data = guard.DataStream(batches(dataset, sampler, loader_kwargs, epoch, position), accelerator)
    if getattr(args, "epochs", None) is not None:
        limit = epoch_step_limit(args, sampler.per_rank, local_batch)
        logger.info("--epochs %d: the data passes end at step %d; training stops at step %d", args.epochs, limit,
                    min(limit, args.max_train_steps))
        args.max_train_steps = min(limit, args.max_train_steps)
    return data


# ----------------------------------------------------------------------------------------------
# Steps


def run_steps(run: Run) -> None:
    """The step loop up to args.max_train_steps: gradients, optimizer and EMA, then logging, checkpoint,
    evaluation and sample grid as due."""
    from tqdm.auto import tqdm

    args, accelerator = run.args, run.accelerator
    progress = tqdm(total=args.max_train_steps, initial=run.step, disable=not accelerator.is_main_process,
                    desc="train", dynamic_ncols=True)
    # loss: the denoising loss, as REPA logs it
    log_names = [{"total": "total_loss", "denoise": "loss"}.get(k, k) for k in run.loss_config.terms(run.methods)]
    sums = torch.zeros(len(log_names) + 1, device=accelerator.device)  # the losses and the grad norm since the last log
    window = LogWindow(log_names, sums, since=time.time(), since_step=run.step)
    run.model.train()
    first_step = run.step + 1
    while run.step < args.max_train_steps:
        parts, run.epoch, run.position = accumulate_gradients(run.model, run.raw_model.null_class, run.data,
                                                              accelerator, args, run.loss_config, run.methods,
                                                              run.needs, run.ema, run.watch)
        window.sums[:-1] += parts
        run.watch.note_loss(parts)
        window.sums[-1] += gradient_norm(run.model, accelerator, args.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        update_ema(run.ema, run.raw_model, args.ema_decay)
        run.step += 1
        progress.update(1)
        if run.step == first_step:  # with torch.compile, the step that compiled the forward and backward graphs
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()  # the step's kernels, not only their launch, in the logged time
            logger.info("first step: %.1f s%s", time.time() - window.since,
                        " (torch.compile included)" if args.compile else "")

        step = run.step
        log_now = step % args.logging_steps == 0 or step == args.max_train_steps
        eval_now = run.evaluator is not None and run.evaluator.due(step)
        ckpt_now = step % args.checkpointing_steps == 0 or step == args.max_train_steps or eval_now
        run.watch.check(step, sync=log_now or ckpt_now, before_checkpoint=ckpt_now)
        if log_now:
            log_losses(run, window, progress)
        if ckpt_now:
            save_checkpoint(accelerator, run.writer, {
                "model": run.raw_model.state_dict(), "ema": run.ema.state_dict(), "opt": run.optimizer.state_dict(),
                "step": step, "args": run.run_args, "data": {"epoch": run.epoch, "position": run.position},
                "wall_seconds": time.time() - run.clock_start}, run.run_dir, args)
        if eval_now:
            # the checkpoint of an evaluated step is on disk before its row is: a kill never leaves a row whose
            # weights no checkpoint holds (all ranks wait together, in the guard's short slices)
            run.watch.check(step, sync=True, before_checkpoint=True)
            run.evaluator.run(run.ema, step, time.time() - run.clock_start)
        if args.sample_every > 0 and (step % args.sample_every == 0 or step == args.max_train_steps):
            if accelerator.is_main_process:
                save_sample_grid(run.ema, run.vae, run.run_args, accelerator.device, run.run_dir, step, accelerator)
            accelerator.wait_for_everyone()
    progress.close()


def gradient_norm(model, accelerator, max_grad_norm: float) -> torch.Tensor:
    """The gradients' global norm (float, detached), after clipping them to `max_grad_norm` where that is > 0."""
    if max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    else:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return grad_norm.detach().float()


def log_losses(run: Run, window: LogWindow, progress) -> None:
    """One log line: the window's mean losses and grad norm over all ranks, throughput, peak memory; then a new
    window."""
    accelerator, args, device, step = run.accelerator, run.args, run.accelerator.device, run.step
    n = step - window.since_step
    values = (accelerator.reduce(window.sums, reduction="mean") / n).tolist()
    logs = dict(zip(window.names, values[:-1]))
    images = n * args.batch_size * args.gradient_accumulation_steps
    logs.update(grad_norm=values[-1], images_per_s=images / (time.time() - window.since))
    if device.type == "cuda":
        logs["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    progress.set_postfix({k: f"{logs[k]:.4f}" for k in window.names[1:]})
    logger.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in logs.items()))
    accelerator.log(logs, step=step)
    window.sums.zero_()
    window.since, window.since_step = time.time(), step
