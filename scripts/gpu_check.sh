#!/usr/bin/env bash
# Every GPU check in one run, for a machine with a CUDA GPU: versions, `pytest -m gpu`, and with FULL=1 the rest of
# the suite on that machine too (how the GPU-only failures of issue 11 were found). Results go under $OUT when it is
# set, else gpu_check_out/: gpu_check.log (everything printed), gpu_tests.xml (junit, with the measured figures as
# properties) and, with FULL=1, suite_on_gpu_machine.xml. Exit status: non-zero if any test failed.
#
#   scripts/gpu_check.sh --fetch-wheels   on a machine with pip access: the packages a bare GPU image may lack
#                                         (diffusers, torch-fidelity, ...) as wheels in .whl/, at the versions of
#                                         constraints/py3.12.txt (CPython 3.12)
#   bash scripts/gpu_check.sh             on the GPU machine (with .whl/ beside it, if fetched); ~5 min of tests on
#                                         one H100, then the benchmarks below (each part prints its time)
#   FULL=1 bash scripts/gpu_check.sh      also the CPU tests there, quickstart excepted (~5 more minutes)
#   BENCH=0 bash scripts/gpu_check.sh     without the benchmarks that follow the tests by default (estimated ~5 min
#                                         on one H100, not yet measured): scripts/benchmark_sample.py at the real
#                                         setting (SiT-XL/2, batch 256, SDE 25 timed steps extrapolated to 250, with
#                                         decoding) and a short scripts/benchmark_train.py --table4, written to
#                                         benchmarks/results/sample_<gpu>.json and train-table4_<gpu>.json, copied to
#                                         $OUT/benchmarks/results/, with docs/benchmarks.md rewritten from them
#   GPU_TESTS=skip bash scripts/gpu_check.sh   the benchmarks only; GPU_TESTS=tests/x.py: only those GPU tests
#   SAMPLE_STEPS=, TRAIN_STEPS=           timed sampler steps (default 25) and training steps (default 30)
#   PROFILE_STEPS=3                       training steps profiled per row after the timed ones (kernel time by kind,
#                                         top kernels, busy fraction: the rows' "profile"); 0 for none
#   TRACES=1                              also the Chrome traces of those steps, in $OUT/traces/
#   TRAIN_ARGS="--models SiT-XL/2 --align none vae-repa --batch-size 128"   benchmark_train.py's rows instead of
#                                         --table4 (each row compiles on CUDA first: its time is recorded as first_step_s)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PACKAGES=(diffusers importlib-metadata lazy-importer zipp torch-fidelity mlxtend)

if [ "${1:-}" = "--fetch-wheels" ]; then
  specs=()
  for name in "${PACKAGES[@]}"; do
    pattern=$(echo "$name" | sed 's/[-_]/[-_]/g')
    spec=$(grep -i -E "^${pattern}==" constraints/py3.12.txt) || { echo "error: $name is not in constraints/py3.12.txt" >&2; exit 1; }
    specs+=("$spec")
  done
  mkdir -p .whl
  exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "${specs[@]}"
fi

out=${OUT:-gpu_check_out}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

missing=$("$PYTHON" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("diffusers", "torch_fidelity", "accelerate", "timm", "scipy", "pytest")
               if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing the wheels in .whl/ (missing here: $missing)"
  # Into the interpreter's own environment, so that the tests' subprocesses find them too; else a folder on PYTHONPATH.
  if ! "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu_check_site \
      .whl/*.whl && export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
  fi
elif [ -n "$missing" ]; then
  echo "warning: missing here: $missing (run scripts/gpu_check.sh --fetch-wheels where pip works, bring .whl/)"
fi

echo "=== versions ($(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
"$PYTHON" - <<'EOF'
import importlib, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None})")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
for name in ("numpy", "scipy", "accelerate", "diffusers", "timm", "torch_fidelity", "torchvision", "wandb", "pytest"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except ImportError:
        print(f"{name} not installed")
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: no CUDA GPU is visible here, so the GPU tests would only be skipped; run this on a GPU machine"
  exit 3
fi

status=0
if [ "${GPU_TESTS:-tests}" != "skip" ]; then
  echo "=== pytest -m gpu ${GPU_TESTS:-tests}"
  start=$(date +%s)
  # shellcheck disable=SC2086  # GPU_TESTS may name several paths
  "$PYTHON" -m pytest -m gpu -v -s -rA -p no:cacheprovider --junitxml "$out/gpu_tests.xml" ${GPU_TESTS:-tests}
  status=$?
  echo "=== pytest -m gpu: exit $status after $(( $(date +%s) - start )) s"
fi

if [ "${BENCH:-1}" = "1" ]; then
  gpu=$("$PYTHON" -c 'import re, torch
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower().replace("nvidia", "")).strip("-"))')
  mkdir -p benchmarks/results "$out/benchmarks/results" "$out/docs"
  echo "=== benchmark_sample.py: SiT-XL/2, batch 256, SDE ${SAMPLE_STEPS:-25} timed steps -> 250, decode"
  start=$(date +%s)
  "$PYTHON" scripts/benchmark_sample.py --model SiT-XL/2 --batch-size 256 --num-steps 250 \
    --sampler-steps "${SAMPLE_STEPS:-25}" --repeats 5 --warmup 2 --decode --out "benchmarks/results/sample_${gpu}.json"
  bench=$?
  echo "=== benchmark_sample.py: exit $bench after $(( $(date +%s) - start )) s"
  [ "$bench" -eq 0 ] || status=$bench
  train_args=${TRAIN_ARGS:---table4}
  train_name=$(echo "$train_args" | tr -c 'a-zA-Z0-9\n' '-' | sed 's/^-*//; s/-*$//; s/--*/-/g')
  [ "$train_args" = "--table4" ] && train_name=table4
  profile=(--profile-steps "${PROFILE_STEPS:-3}")
  [ "${TRACES:-0}" = "1" ] && profile+=(--trace-dir "$out/traces")
  echo "=== benchmark_train.py $train_args --steps ${TRAIN_STEPS:-30} ${profile[*]}"
  start=$(date +%s)
  # shellcheck disable=SC2086  # TRAIN_ARGS holds several arguments
  "$PYTHON" scripts/benchmark_train.py $train_args --steps "${TRAIN_STEPS:-30}" --warmup 5 "${profile[@]}" \
    --out "benchmarks/results/train-${train_name}_${gpu}.json"
  bench=$?
  echo "=== benchmark_train.py: exit $bench after $(( $(date +%s) - start )) s"
  [ "$bench" -eq 0 ] || status=$bench
  "$PYTHON" scripts/benchmarks_doc.py && cp docs/benchmarks.md "$out/docs/"
  cp benchmarks/results/*_"${gpu}".json "$out/benchmarks/results/" 2>/dev/null || true
fi

if [ "${FULL:-0}" = "1" ]; then
  echo "=== the rest of the suite on this machine (quickstart excepted)"
  start=$(date +%s)
  "$PYTHON" -m pytest -q -rA -p no:cacheprovider -m "not gpu" -k "not quickstart" \
    --junitxml "$out/suite_on_gpu_machine.xml" tests
  full=$?
  echo "=== suite: exit $full after $(( $(date +%s) - start )) s"
  [ "$full" -eq 0 ] || status=$full
fi
echo "=== measured figures"
grep -h -o '\[gpu measurement\].*' "$out/gpu_check.log" || true
exit "$status"
