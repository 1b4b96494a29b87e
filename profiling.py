"""For the benchmarks: where a step's time goes (phase timers, and a torch.profiler summary that sums the time of the
GPU's kernels, or on the CPU of each operator's own work, by kind of work), and the commit a figure was measured at.

On CUDA the phase timers are events recorded in the stream, so a phase's time is what the GPU spent between its
marks, idle gaps included (a phase the host cannot launch fast enough shows up as its own gap). The kernel summary
adds up the kernels' own time by kind; the union of the kernels' intervals over the step time is the fraction of the
step the GPU was busy.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

# (kind, pattern searched in a lower-cased kernel name (CUDA) or operator name (CPU, "aten::..." matched whole, so
# that aten::expand is not aten::exp)): the first kind that matches wins, so the order matters (a compiled LayerNorm
# fusion is "triton_per_fused_native_layer_norm_...": a norm; "triton_poi_fused__to_copy_add_..." a fusion, not a
# copy; an eager cast is a copy kernel).
_ATEN = r"^aten::_?({})(_backward)?_?$"
CATEGORIES: list[tuple[str, re.Pattern]] = [(kind, re.compile(pattern)) for kind, pattern in [
    ("attention", r"flash|fmha|attention|sdpa|scaled_dot_product"),
    ("optimizer", r"adam"),
    ("norm", r"layer_?norm|rms_?norm|group_?norm"),
    ("matmul", r"gemm|nvjet|xmma|cutlass|cublas|wgmma|triton_tem|convolution|conv2d|"
               + _ATEN.format("mm|addmm|bmm|baddbmm|linear|matmul")),
    ("fused (compiled)", r"triton"),
    ("foreach", r"multi_tensor|foreach"),
    ("copy", r"copy|memcpy|memset|" + _ATEN.format("fill|zero|clone|contiguous")),
    ("reduction", r"reduce|" + _ATEN.format("sum|mean|norm|linalg_vector_norm|max|min|amax|amin")),
    ("elementwise", r"elementwise|pointwise|" + _ATEN.format(
        "add|sub|rsub|mul|div|gelu|silu|sigmoid|tanh|exp|pow|sqrt|rsqrt|neg|where|clamp|cos|sin|lerp|threshold")),
]]
OTHER = "other"
REPOSITORY = Path(__file__).resolve().parent


def git_commit() -> str:
    """The repository's commit, with " (uncommitted changes)" when its tree differs from it; "unknown" without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        return commit + (" (uncommitted changes)" if git("status", "--porcelain").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def category(name: str) -> str:
    """The kind of work a kernel (or CPU operator) named `name` does, by CATEGORIES; 'other' if none matches."""
    lowered = name.lower()
    return next((kind for kind, pattern in CATEGORIES if pattern.search(lowered)), OTHER)


class PhaseTimer:
    """Times the phases of repeated steps: `start()` at a step's beginning, `mark(name)` at the end of each phase,
    `medians_ms()` after the steps. CUDA events on a CUDA device (read once, after the last step), the host clock
    elsewhere (where the work is done when the call returns)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: list[list[tuple[str, object]]] = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.steps.append([("", self._now())])

    def mark(self, name: str) -> None:
        self.steps[-1].append((name, self._now()))

    def medians_ms(self) -> dict[str, float]:
        """Each phase's median over the steps, in milliseconds, in the order of the marks."""
        if self.cuda:
            torch.cuda.synchronize()
        per_phase: dict[str, list[float]] = {}
        for marks in self.steps:
            for (_, begin), (name, end) in zip(marks, marks[1:]):
                ms = begin.elapsed_time(end) if self.cuda else 1000 * (end - begin)
                per_phase.setdefault(name, []).append(ms)
        return {name: statistics.median(values) for name, values in per_phase.items()}


def own_times_us(events, cuda: bool) -> tuple[dict[str, tuple[float, int]], float]:
    """({name: (microseconds, calls)}, busy microseconds) from a profiler's events. On CUDA: the device's kernels,
    copies and fills (user annotations left out: they span other kernels), busy being the union of their intervals
    (kernels that overlap, on several streams, count once). Elsewhere: each CPU operator's self time (its children's
    apart), busy being their sum."""
    from torch.autograd import DeviceType

    totals: dict[str, tuple[float, int]] = {}
    intervals = []
    for e in events:
        if cuda:
            if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
                continue
            us = e.time_range.elapsed_us()
            intervals.append((e.time_range.start, e.time_range.end))
        else:
            if e.device_type != DeviceType.CPU:
                continue
            us = e.self_cpu_time_total
        if us > 0:
            t, n = totals.get(e.name, (0.0, 0))
            totals[e.name] = (t + us, n + 1)
    return totals, union_length(intervals) if cuda else sum(t for t, _ in totals.values())


def union_length(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of [start, end] intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarize(times_us: dict[str, tuple[float, int]], steps: int, wall_ms: float, busy_us: float | None = None,
              step_ms: float | None = None, top: int = 15) -> dict:
    """Per step: the kernels' (or operators') time in ms by kind, the busy time (`busy_us`, default: the sum), its
    share of `step_ms` (default: the profiled steps' wall time `wall_ms`), and the `top` names by time."""
    kinds: dict[str, float] = {}
    for name, (us, _) in times_us.items():
        kinds[category(name)] = kinds.get(category(name), 0.0) + us / 1000 / steps
    busy = (sum(us for us, _ in times_us.values()) if busy_us is None else busy_us) / 1000 / steps
    step_ms = step_ms or wall_ms
    ranked = sorted(times_us.items(), key=lambda item: -item[1][0])[:top]
    return {"steps": steps, "wall_ms_per_step": wall_ms, "busy_ms_per_step": busy,
            "busy_fraction": busy / step_ms if step_ms > 0 else None,
            "by_kind_ms": dict(sorted(kinds.items(), key=lambda item: -item[1])),
            "top": [{"name": name[:160], "kind": category(name), "ms_per_step": us / 1000 / steps,
                     "calls_per_step": n / steps} for name, (us, n) in ranked]}


def profile_steps(step: Callable[[], None], steps: int, device: torch.device, trace: str | None = None,
                  step_ms: float | None = None) -> dict:
    """Runs `step` `steps` times under torch.profiler and summarises them (summarize). `step_ms`: the step's time
    measured without the profiler, for the busy fraction (the profiler slows the host, not the kernels); by default
    the profiled steps' own. The Chrome trace is written to `trace` when given (a name ending in .gz is compressed)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        begin = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall_ms = 1000 * (time.perf_counter() - begin) / steps
    if trace:
        prof.export_chrome_trace(trace)
    times, busy_us = own_times_us(prof.events(), cuda)
    return summarize(times, steps, wall_ms, busy_us, step_ms)
