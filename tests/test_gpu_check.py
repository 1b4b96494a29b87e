"""scripts/gpu_check.sh's part runner, on the CPU, with a stand-in interpreter: the parts run in PARTS order, a part
still running 45 s before DEADLINE_S is stopped and keeps what it wrote, which reaches $OUT, and a part with under
MIN_S left is skipped."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The stand-in for python: answers the script's CUDA probes, and plays each benchmark: sampling ends at once, training
# writes its JSON and then runs until stopped, as a long benchmark stopped at the deadline would.
SHIM = r"""#!/usr/bin/env bash
case "$*" in
  *is_available*) exit 0 ;;
  *get_device_name*) echo fake-gpu ;;
  "-") cat >/dev/null; echo "python (stand-in)" ;;
  *benchmark_sample.py*) echo sampled ;;
  *benchmark_train.py*)
    out=${@: -1}
    echo '{"rows": "written before the stop"}' > "$out"
    trap 'echo "train: stopped"; exit 130' INT
    for _ in $(seq 600); do sleep 0.1; done ;;
  *benchmark_encode.py*) echo loaded ;;
  *benchmarks_doc.py*) exit 0 ;;
  *) echo "stand-in: unexpected $*" >&2; exit 9 ;;
esac
"""


def test_parts_run_in_order_and_the_deadline_stops_and_skips(tmp_path):
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "docs" / "benchmarks.md").write_text("# Benchmarks\n")
    shutil.copy(ROOT / "scripts" / "gpu_check.sh", root / "scripts" / "gpu_check.sh")
    shim = tmp_path / "python"
    shim.write_text(SHIM)
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(shim), "OUT": str(out), "PARTS": "sample train loader", "DEADLINE_S": "50",
           "MIN_S": "2", "TRAIN_ARGS": "--models SiT-XL/2 --batch-size 128"}
    proc = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    log = proc.stdout
    assert proc.returncode == 124, log + proc.stderr  # timeout's status for the stopped part
    sample = log.index("=== benchmark_sample.py")
    train = log.index("=== benchmark_train.py --models SiT-XL/2 --batch-size 128")
    assert sample < train < log.index("train: stopped") < log.index("=== benchmark_encode.py")
    assert "=== benchmark_sample.py: SiT-XL/2, batch 256, SDE 25 timed steps -> 250, decode: exit 0" in log
    assert "--loader-ranks 1 2 4 8 (" in log and "cores): skipped" in log and "loaded" not in log
    kept = out / "benchmarks" / "results" / "train-models-SiT-XL-2-batch-size-128_fake-gpu.json"
    assert kept.read_text().strip() == '{"rows": "written before the stop"}'
    assert (out / "docs" / "benchmarks.md").is_file() and (out / "gpu_check.log").read_text() == log
