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
#   PARTS="sample train loader tests"     which parts run, in this order (default: tests sample train loader)
#   DEADLINE_S=540 MIN_S=60               end by DEADLINE_S seconds after the start: a part still running 45 s before
#                                         is stopped (keeping the rows it wrote, copied to $OUT), and none starts with
#                                         under MIN_S seconds for it
#   SAMPLE_VARIANTS="autocast bf16-weights compile"   the sampling benchmark's rows (default: all four on CUDA)
#   SAMPLE_STEPS=, TRAIN_STEPS=           timed sampler steps (default 25) and training steps (default 30)
#   SAMPLE_BATCH=64                       the sampling benchmark's batch (default 256; generate.py's default is 64),
#                                         written to sample-b64_<gpu>.json
#   PROFILE_STEPS=3                       training steps profiled per row after the timed ones (kernel time by kind,
#                                         top kernels, busy fraction: the rows' "profile"); 0 for none
#   TRACES=1                              also the Chrome traces of those steps, in $OUT/traces/
#   LOADER=0                              without the last benchmark: preprocessing's data loading (JPEG decode + crop)
#                                         as 1, 2, 4 and 8 ranks at once on this machine's cores (CPU only, ~1 min),
#                                         written to benchmarks/results/encode_loader_<gpu>.json
#   TRAIN_ARGS="--models SiT-XL/2 --align none vae-repa --batch-size 128"   benchmark_train.py's rows instead of
#                                         --table4 (each row compiles on CUDA first: its time is recorded as first_step_s)
#   TRAIN_ARGS="--models SiT-XL/2 --align vae-repa --batch-size 128 --ddp --compile-unit block"   the path train.py
#                                         runs (each block compiled, DDP-wrapped with its options); the same with
#                                         --compile-unit model is the whole-model compile that a101ca5 measured
#
# For a short lent GPU (15 device-minutes, start-up included), two calls, the measurements first:
#   PARTS="sample train loader" DEADLINE_S=480 SAMPLE_VARIANTS="autocast bf16-weights compile" TRAIN_STEPS=20 \
#     TRAIN_ARGS="--models SiT-XL/2 --align none vae-repa --batch-size 32 128" bash scripts/gpu_check.sh
#   (with the run tool's timeout_s a minute above DEADLINE_S; the parts' durations are estimates, none measured)
#   PARTS=tests DEADLINE_S=<what is left> GPU_TESTS="tests/test_gpu.py tests/test_profiling.py \
#     tests/test_benchmarks.py tests/test_benchmark_sample.py" bash scripts/gpu_check.sh
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
# run_part NAME COMMAND...: runs a part with the time DEADLINE_S leaves (counted from the script's start, less 45 s:
# a stopped part's last write and the copy to $OUT), unless that is under MIN_S seconds; at its end the part gets
# SIGINT, then SIGKILL 30 s later. The benchmarks rewrite their JSON after each row, so a stopped one keeps those.
run_part() {
  local name=$1 left rc start
  shift
  left=$(( ${DEADLINE_S:-86400} - SECONDS - 45 ))
  if [ "$left" -lt "${MIN_S:-60}" ] || [ "$left" -lt 1 ]; then
    echo "=== $name: skipped, $left s left of DEADLINE_S=${DEADLINE_S:-}"
    return 0
  fi
  echo "=== $name"
  start=$(date +%s)
  timeout --signal=INT --kill-after=30 "$left" "$@"
  rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - start )) s"
  [ "$rc" -eq 0 ] || status=$rc
}
parts="${PARTS:-tests sample train loader}$([ "${FULL:-0}" = 1 ] && echo " full")"
[ "${GPU_TESTS:-}" = "skip" ] && parts=${parts//tests/}
[ "${BENCH:-1}" = "1" ] || parts=$(echo "$parts" | sed 's/sample//; s/train//; s/loader//')
[ "${LOADER:-1}" = "1" ] || parts=${parts//loader/}
gpu=$("$PYTHON" -c 'import re, torch
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower().replace("nvidia", "")).strip("-"))')
mkdir -p benchmarks/results "$out/benchmarks/results" "$out/docs"
publish() {  # after each benchmark: the doc rewritten, and the JSON files and the doc copied to $OUT
  "$PYTHON" scripts/benchmarks_doc.py >/dev/null && cp docs/benchmarks.md "$out/docs/"
  cp benchmarks/results/*_"${gpu}".json "$out/benchmarks/results/" 2>/dev/null || true
}
echo "=== parts: $parts (DEADLINE_S=${DEADLINE_S:-none})"
for part in $parts; do
  case $part in
    tests)
      # shellcheck disable=SC2086  # GPU_TESTS may name several paths
      run_part "pytest -m gpu ${GPU_TESTS:-tests}" "$PYTHON" -m pytest -m gpu -v -s -rA -p no:cacheprovider \
        --junitxml "$out/gpu_tests.xml" ${GPU_TESTS:-tests} ;;
    sample)
      batch=${SAMPLE_BATCH:-256}
      sample_name=sample$([ "$batch" = 256 ] || echo "-b$batch")
      variants=()
      # shellcheck disable=SC2206  # SAMPLE_VARIANTS holds several names
      [ -n "${SAMPLE_VARIANTS:-}" ] && variants=(--variants $SAMPLE_VARIANTS)
      run_part "benchmark_sample.py: SiT-XL/2, batch $batch, SDE ${SAMPLE_STEPS:-25} timed steps -> 250, decode" \
        "$PYTHON" scripts/benchmark_sample.py --model SiT-XL/2 --batch-size "$batch" --num-steps 250 \
        --sampler-steps "${SAMPLE_STEPS:-25}" --repeats 5 --warmup 2 --decode "${variants[@]}" \
        --out "benchmarks/results/${sample_name}_${gpu}.json"
      publish ;;
    train)
      train_args=${TRAIN_ARGS:---table4}
      train_name=$(echo "$train_args" | tr -c 'a-zA-Z0-9\n' '-' | sed 's/^-*//; s/-*$//; s/--*/-/g')
      [ "$train_args" = "--table4" ] && train_name=table4
      profile=(--profile-steps "${PROFILE_STEPS:-3}")
      [ "${TRACES:-0}" = "1" ] && profile+=(--trace-dir "$out/traces")
      # shellcheck disable=SC2086  # TRAIN_ARGS holds several arguments
      run_part "benchmark_train.py $train_args --steps ${TRAIN_STEPS:-30} ${profile[*]}" \
        "$PYTHON" scripts/benchmark_train.py $train_args --steps "${TRAIN_STEPS:-30}" --warmup 5 "${profile[@]}" \
        --out "benchmarks/results/train-${train_name}_${gpu}.json"
      publish ;;
    loader)
      run_part "benchmark_encode.py --loader-ranks 1 2 4 8 ($(nproc) cores)" \
        "$PYTHON" scripts/benchmark_encode.py --loader-ranks 1 2 4 8 --images 4000 \
        --out "benchmarks/results/encode_loader_${gpu}.json"
      publish ;;
    full)
      run_part "the rest of the suite on this machine (quickstart excepted)" "$PYTHON" -m pytest -q -rA \
        -p no:cacheprovider -m "not gpu" -k "not quickstart" --junitxml "$out/suite_on_gpu_machine.xml" tests ;;
    *) echo "error: unknown part '$part' in PARTS (tests, sample, train, loader, full)"; status=2 ;;
  esac
done
echo "=== measured figures"
grep -h -o '\[gpu measurement\].*' "$out/gpu_check.log" || true
exit "$status"
