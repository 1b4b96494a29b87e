"""Processes and GPUs: the launch check every entry point makes before any collective, the process group of a
torchrun launch, rank-0-then-share, the compile default and the deterministic mode."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from cli import UsageError


def _names_gpus(visible: str) -> bool:
    """True if a CUDA_VISIBLE_DEVICES value asks for at least one GPU (an index >= 0, a GPU- or MIG- UUID)."""
    first = visible.split(",")[0].strip()
    return first.isdigit() or first.startswith(("GPU-", "MIG-"))


def gpu_launch_problem(device: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """One line saying why this process cannot have a GPU of its own as launched, or None if it can (or runs on
    the CPU). `device`: 'cpu', 'cuda' or None (CUDA when a GPU is visible).

    Every rank reaches the same verdict from the launcher's environment (LOCAL_WORLD_SIZE, set by torchrun and
    accelerate launch; LOCAL_RANK otherwise), so all of them stop before any collective instead of one failing
    inside it with `invalid device ordinal`."""
    env = os.environ if env is None else env
    if device is not None and torch.device(device).type == "cpu":
        return None
    visible = env.get("CUDA_VISIBLE_DEVICES")
    shown = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "CUDA_VISIBLE_DEVICES unset"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        if device is not None:
            return f"--device {device}: no CUDA device is visible ({shown}); use --device cpu"
        if visible is not None and _names_gpus(visible):
            return (f"{shown} names GPUs, but none is visible (a wrong index, or no driver): correct it, or "
                    "run on the CPU with --device cpu")
        return None
    index = torch.device(device).index if device is not None else None
    if index is not None and index >= count:
        return f"--device {device}: only {count} GPU(s) visible ({shown})"
    local_rank = int(env.get("LOCAL_RANK", 0) or 0)
    local_world = int(env.get("LOCAL_WORLD_SIZE", 0) or 0) or local_rank + 1
    if index is not None and local_world > 1:
        return f"--device {device}: {local_world} processes on this node would share one GPU; pass --device cuda"
    if local_world > count:
        return (f"{local_world} processes on this node but {count} visible GPU(s) ({shown}): start at most {count} "
                f"per node (e.g. torchrun --nproc_per_node {count}), or run on the CPU with --device cpu")
    return None


def enable_deterministic_mode() -> None:
    """Bitwise-reproducible CUDA kernels for this process: deterministic algorithms (an error for an op that has
    none), cuBLAS with a fixed workspace, cuDNN without autotuning, and the math attention backend, whose
    backward has no atomics (flash, memory-efficient and cuDNN attention are switched off). Slower; set it
    before the first CUDA operation, because cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it starts."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):  # torch >= 2.4
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_math_sdp(True)


def resolve_compile(requested: bool | None, device: torch.device, deterministic: bool = False) -> bool:
    """--compile's value in train.py and generate.py: as given, or by default (None) on with CUDA, where it is
    measured faster, and off on the CPU and under train.py's --deterministic (whose exact resume on CUDA is checked
    with eager kernels)."""
    return device.type == "cuda" and not deterministic if requested is None else bool(requested)


def init_processes(device_flag: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's or accelerate's environment, with a process group when the world
    has more than one process; the launch is checked first, so every rank stops (none hangs) on a bad one."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    problem = gpu_launch_problem(device_flag)
    if problem is not None:
        raise UsageError(problem)
    device = torch.device(device_flag or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=1))
    return rank, world, device


def first_fault(fault: str | None, world: int) -> tuple[int, str] | None:
    """Every rank calls this at the same point with its own fault line (None: it has none) and gets the same answer:
    the lowest rank that has one and its line, or None when no rank has. A rank that failed must not leave alone:
    the others would wait for it in their next collective (the process group's timeout, an hour here). One object
    gather; no collective with a single process."""
    if world == 1:
        return None if fault is None else (0, fault)
    faults = [None] * world
    dist.all_gather_object(faults, fault)
    return next(((r, f) for r, f in enumerate(faults) if f is not None), None)


def together(fn: Callable[[], Any], world: int) -> Any:
    """Run `fn` on every rank and return its result; if it raised on any rank, every rank raises: the failing ones
    their own error (its traceback intact), the others a UsageError naming the first rank that failed and its line."""
    result, error = None, None
    try:
        result = fn()
    except Exception as e:
        error = e
    try:
        found = first_fault(None if error is None else str(error), world)
    except Exception:
        if error is None:
            raise
        raise error from None  # the meeting failed too (a peer gone): this rank's own error is the one to show
    if error is not None:
        raise error
    if found is not None:
        raise UsageError(f"rank {found[0]} failed: {found[1]}")
    return result


def on_rank0(fn: Callable[[], Any], rank: int, world: int, then_others: bool = False) -> Any:
    """Run `fn` on rank 0 and share its result with every rank; with `then_others`, the other ranks run `fn`
    themselves once rank 0 has succeeded (e.g. to load what rank 0 downloaded). If it fails on any rank, every rank
    raises (`together`)."""
    if world == 1:
        return fn()
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    box = [(None if then_others else result, None if error is None else str(error))]
    dist.broadcast_object_list(box, src=0)  # the result and rank 0's fault in one collective
    shared, message = box[0]
    if error is not None:
        raise error
    if message is not None:
        raise UsageError(f"rank 0 failed: {message}")
    if not then_others:
        return result if rank == 0 else shared
    return together(lambda: result if rank == 0 else fn(), world)  # a rank whose own attempt fails stops them all


def end_processes() -> None:
    """Tear the process group down (if any), then collect what still held on to it (pending work, the tensors the
    collectives used) while the interpreter is whole: left to the interpreter's exit, gloo's threads can abort a
    process whose work is done ("terminate called without an active exception", exit -6: seen in 2 of 28
    two-process generate.py runs on a loaded CPU, in none of 50 with the collection)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def barrier(world: int) -> None:
    """Wait for every process (nothing to wait for alone)."""
    if world > 1:
        dist.barrier()


def ddp_options(bucket_cap_mb: float = 25, static_graph: bool = False) -> dict:
    """DistributedDataParallel's settings in train.py (and the benchmark of its step): the gradients live in DDP's
    buckets (no second copy of them: 2.8 GB at SiT-XL/2), no buffer is broadcast before each forward (the models'
    buffers, position embeddings and RoPE tables, never change), buckets of `bucket_cap_mb`, `static_graph`."""
    return {"gradient_as_bucket_view": True, "broadcast_buffers": False, "bucket_cap_mb": bucket_cap_mb,
            "static_graph": static_graph}
