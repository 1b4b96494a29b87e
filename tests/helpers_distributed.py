"""Test helpers for runs of several real processes on this machine (gloo on the CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on now, for launches that must name one (two simulated nodes meeting there); a
    launch on one node uses torchrun's --standalone instead, whose rendezvous takes its port from the system with no
    window in which another suite's launch could take it too."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, script: Path, *argv: str, nproc: int = 2,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """`nproc` gloo processes on this machine, which see no GPU. Without TORCH_DISTRIBUTED_DEBUG=DETAIL (gloo's report
    of mismatched collectives): with torch 2.14 on these CPUs DDP's constructor segfaults under it in many launches. A
    rank left behind in a collective still shows, as gloo's own errors or the subprocess timeout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "TORCH_DISTRIBUTED_DEBUG": "OFF"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)
