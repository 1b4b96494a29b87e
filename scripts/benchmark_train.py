"""Training cost of vanilla SiT and of each alignment method in one run, on synthetic latents (and images).

    python scripts/benchmark_train.py --models SiT-B/2 SiT-XL/2 --batch-size 256 --steps 200 \
        --out benchmarks/results/train_h100.json
    python scripts/benchmark_train.py --table4 --out benchmarks/results/table4_h100.json   # the paper's Table 4
    python scripts/benchmark_train.py --models SiT-XL/2 --align none vae-repa --batch-size 32 128 --profile-steps 3 \
        --out benchmarks/results/train_xl2_h100.json   # where the time goes, and which batch fits

Each step is what train.py does per optimizer step (bf16 autocast forward with the methods' terms, fp32 losses,
backward, clipping, fused AdamW, foreach EMA); the data loader is left out. Per configuration it reports images/s
after warm-up, peak memory, the parameters run outside the trained model (REPA's encoder, SRA's teacher part) and
in its heads, GFLOPs per image counted with torch's FlopCounterMode (forward multiply-accumulates, as the paper
counts them, and forward + backward FLOPs), and the latency of one forward pass (median of 3). REPA's encoder has
random weights here unless --enc-weights names a file: the cost is the same, and nothing is downloaded. The model
is compiled as train.py compiles it (by default on CUDA, not on the CPU; --compile / --no-compile), and each row
records how long its first step took (compilation included). Each row also has the median time of each phase of the
step (`phase_ms`: forward with the loss terms, backward, clipping, optimizer, EMA), and with --profile-steps a
torch.profiler summary (`profile`: kernel time by kind, top kernels, the GPU's busy fraction; profiling.py). Several
--batch-size values fit peak memory to a line (`memory_fits`: the largest batch the GPU holds); a batch that runs out
of memory is listed in `failures` and larger ones of its methods are skipped. The JSON is rewritten after each row.
A method set with SRA is timed once per SRA teacher precision (--sra-teacher-precision, default both: fp32, SRA's own
and train.py's default, and autocast, the teacher under --precision as runs before that flag had it); each row's
`methods` names it, e.g. `sra (teacher fp32)`, beside `align` (the set, as train.py's --align).

Each method row also has `flop_overhead` (its forward + backward FLOPs over the same model's vanilla ones, minus 1)
beside `time_overhead` (its step time over vanilla's, minus 1). The FLOP overhead is what the step time grows by when
the added work runs as efficiently as the backbone; no kernel work takes the time overhead below u x the FLOP overhead,
u being the backbone's share of the machine's practical peak. VAE-REPA's head (the paper's: 5 Linear layers,
d -> 2d -> 2d -> 2d -> 2d -> p^2 C on every token) adds 6 x its forward multiply-adds per image to training (3 matrix
products per layer, 2 FLOPs each): +9.2% on SiT-B/2 (138.0 -> 150.7 GFLOPs), +4.0% on SiT-XL/2 (711.7 -> 740.3),
counted here with attention's backward as its 4 products. (The H100 baseline's 139 / 152 and 716 / 744.5 are higher by
one Q K^T product per block in both rows: the fused kernels' backward recomputes the scores.) On an H100, compiled
B/2 at 2430 img/s runs at u = 0.42 of 804 TFLOP/s, so VAE-REPA costs B/2 at least +3.9% however fast its head runs:
"<= 3% everywhere" cannot hold for B/2 with the paper's head (which we do not shrink). XL/2 (u = 0.48 at 534 img/s,
batch 128) has a floor of +1.9%.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli  # noqa: E402
from alignment import METHOD_NAMES  # noqa: E402  (torch-free)
from integrity import atomic_write  # noqa: E402
from models.registry import MODEL_NAMES, size_problem  # noqa: E402

COMPILE_MODES = ["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]
# The paper's Table 4 (SiT-XL/2, H100, batch 256): EFP in M (external + head), iterations/s, GFLOPs, latency ms.
PAPER_TABLE4 = {"none": (0, 0, 8.1, 114.46, 18.05), "repa": (303, 8, 5.4, 194.50, 29.03),
                "sra": (481, 2, 5.1, 197.57, 30.90), "vae-repa": (0, 18, 7.2, 118.55, 19.20)}
TABLE4_SETS = ["none", "repa", "sra", "vae-repa", "repa,vae-repa"]
VAVAE_MODELS = ["SiT-XL/2", "LightningDiT-XL/1"]  # Table 2's VAVAE rows beside the SD-VAE model
SDPA_BACKEND_NAMES = ("cudnn", "default", "efficient", "flash", "math")  # benchmark_train_step.SDPA_BACKENDS' keys
TEACHER_PRECISIONS = ("fp32", "autocast")  # alignment.peers.TEACHER_PRECISIONS (tests/test_benchmarks.py checks)


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser(__doc__)
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=["SiT-B/2", "SiT-XL/2"], help="models to time")
    p.add_argument("--align", nargs="+", default=["none", "vae-repa"], metavar="SET",
                   help="method sets to time, each as train.py's --align (e.g. none vae-repa repa,vae-repa sra)")
    p.add_argument("--table4", action="store_true",
                   help=f"the paper's Table 4: SiT-XL/2, sets {' '.join(TABLE4_SETS)}, batch 32 per GPU, REPA with "
                        "DINOv2 ViT-L; prints the paper's figures beside ours")
    p.add_argument("--vavae-rows", action="store_true",
                   help=f"Table 2's VAVAE rows: {' and '.join(VAVAE_MODELS)} (on VA-VAE latents, with LightningDiT's "
                        "objective), each vanilla and with VAE-REPA, batch 32 per GPU")
    p.add_argument("--sra-teacher-precision", nargs="+", choices=TEACHER_PRECISIONS, default=list(TEACHER_PRECISIONS),
                   metavar="P", help="SRA's EMA teacher precision (train.py's --sra-teacher-precision): a set with SRA "
                                     "is timed once per value, its rows labelled 'sra (teacher fp32)' etc. (default: "
                                     "both; fp32 is SRA's own and train.py's default, autocast runs the teacher "
                                     "under --precision)")
    p.add_argument("--enc-type", default="dinov2-vit-b", help="REPA's encoder (Table 4: dinov2-vit-l)")
    p.add_argument("--enc-weights", default=None, help="REPA's encoder weights file (default: random weights)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[256], metavar="B",
                   help="per-GPU batch size; several (e.g. 32 128 256) time every row at each, and fit the peak "
                        "memory to estimate the largest batch that fits the GPU")
    p.add_argument("--steps", type=int, default=100, help="timed optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, allocator)")
    p.add_argument("--latent-size", type=int, default=32,
                   help="SD-VAE latent side (32 for 256 px); models at patch 1 get VA-VAE latents of the same images "
                        "(32 channels, half the side)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast precision")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model, as train.py (default: on with CUDA, off on the CPU)")
    p.add_argument("--compile-unit", choices=("block", "model"), default="block",
                   help="what is compiled: each block and head before DDP wraps the model, as train.py compiles it, "
                        "or the whole model around DDP (train.py's way until the per-block compile, measured at "
                        "a101ca5)")
    p.add_argument("--ddp", action=argparse.BooleanOptionalAction, default=False,
                   help="wrap the model in DistributedDataParallel with train.py's options, in a process group of "
                        "one (nccl on CUDA, gloo on the CPU): the path users run, without the communication")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile's mode when compiling (train.py uses 'default'; 'reduce-overhead' adds CUDA "
                        "graphs, the max-autotune modes search kernel configurations: slow to compile)")
    p.add_argument("--sdpa-backend", choices=SDPA_BACKEND_NAMES, default="default",
                   help="attention kernel for the timed steps (default: torch's choice, flash attention on an H100; "
                        "'cudnn' is cuDNN's attention on Hopper)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after the timed steps, profile this many more with torch.profiler and record where the time "
                        "goes (kernel time by kind, the top kernels, the GPU's busy fraction) in each row's 'profile'")
    p.add_argument("--trace-dir", default=None,
                   help="with --profile-steps: also write each row's Chrome trace here (<model>_<methods>_b<batch>"
                        ".json.gz; open in chrome://tracing or Perfetto)")
    p.add_argument("--depth", type=int, default=None, help="override depth (tiny CPU smoke runs)")
    p.add_argument("--hidden-size", type=int, default=None, help="override hidden size (tiny CPU smoke runs)")
    p.add_argument("--num-heads", type=int, default=None, help="override heads (tiny CPU smoke runs)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.table4:
        args.models, args.align, args.enc_type = ["SiT-XL/2"], TABLE4_SETS, "dinov2-vit-l"
        if "--batch-size" not in (argv if argv is not None else sys.argv[1:]):
            args.batch_size = [32]  # the paper's 8 x 32 share of batch 256: SiT-XL/2 at 256 does not fit one GPU
    if args.vavae_rows:
        args.models, args.align = VAVAE_MODELS, ["none", "vae-repa"]
        if "--batch-size" not in (argv if argv is not None else sys.argv[1:]):
            args.batch_size = [32]
    sets = {n.strip() for a in args.align for n in a.split(",") if n.strip()}  # as train.py reads --align
    rules = (("--steps", args.steps >= 1, "positive"), ("--warmup", args.warmup >= 0, "non-negative"),
             ("--profile-steps", args.profile_steps >= 0, "non-negative"),
             ("--trace-dir", not args.trace_dir or args.profile_steps, "given with --profile-steps N (N > 0)"),
             ("--batch-size", min(args.batch_size) >= 1, "positive (each)"),
             ("--latent-size", args.latent_size >= 2 and args.latent_size % (32 if "repa" in sets else 2) == 0,
              "a positive even number, and a multiple of 32 with repa (its encoder takes 256 * k pixel images)"),
             ("--align", sets <= {*METHOD_NAMES, "none"}, f"sets of {', '.join(METHOD_NAMES)} or none"))
    problems = [f"{flag} must be {what}" for flag, ok, what in rules if not ok]
    problems += filter(None, (size_problem(m, args.depth, args.hidden_size, args.num_heads) for m in args.models))
    if problems:
        p.error(problems[0])
    return args


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before the slow imports below (main parses again)

import torch  # noqa: E402
from benchmark_train_step import TrainStep, fake_train_flops  # noqa: E402

from devices import resolve_compile  # noqa: E402
from profiling import PhaseTimer, git_commit, profile_steps  # noqa: E402

FAKE_VANILLA_GFLOPS: dict[tuple, float] = {}


def configurations(args) -> list[tuple[str, str | None]]:
    """(method set, SRA teacher precision) of each row per model and batch: a set with SRA once per
    --sra-teacher-precision value, any other set once (None)."""
    return [(align, precision) for align in args.align
            for precision in (args.sra_teacher_precision if "sra" in align.split(",") else [None])]


def label(align: str, precision: str | None) -> str:
    """A row's methods as reported: the --align set, and SRA's teacher precision where the set has SRA."""
    return align if precision is None else f"{align} (teacher {precision})"


def add_overheads(results: list[dict], args) -> None:
    """Each row's `flop_overhead` (train FLOPs / the same model's vanilla ones - 1: the floor) and `time_overhead`
    (vanilla images/s / the row's - 1: what the step costs more), against the run's vanilla row of that model and
    batch size; the vanilla FLOPs are counted on fake tensors when the run has no such row (time_overhead is None
    then)."""
    base = {(r["model"], r["batch_size"]): r for r in results if r["align"] == "none"}
    for r in results:
        ref = base.get((r["model"], r["batch_size"]))
        if ref:
            vanilla_flops = ref["train_gflops_per_image"]
        else:  # counted once per model and shape (this runs after every row)
            key = (r["model"], args.depth, args.hidden_size, args.num_heads, args.latent_size)
            if key not in FAKE_VANILLA_GFLOPS:
                FAKE_VANILLA_GFLOPS[key] = fake_train_flops(r["model"], "none", args) / 1e9
            vanilla_flops = FAKE_VANILLA_GFLOPS[key]
        r["flop_overhead"] = r["train_gflops_per_image"] / vanilla_flops - 1
        r["time_overhead"] = ref["images_per_s"] / r["images_per_s"] - 1 if ref else None


def largest_batches(results: list[dict], memory_gb: float) -> list[dict]:
    """Per model and methods measured at two or more batch sizes: the least-squares line of peak memory over batch
    size (fixed GB: weights, gradients, optimizer state; GB per image: activations), and the largest batch whose
    predicted peak fits in `memory_gb` (the allocator's fragmentation is not in the line: leave a margin)."""
    groups: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in results:
        if r.get("peak_memory_gb") is not None:
            key = (r["model"], r.get("methods", r["align"]))
            groups.setdefault(key, []).append((r["batch_size"], r["peak_memory_gb"]))
    fits = []
    for (model, methods), points in groups.items():
        if len({b for b, _ in points}) < 2:
            continue
        mean_b = statistics.fmean(b for b, _ in points)
        mean_m = statistics.fmean(m for _, m in points)
        slope = (sum((b - mean_b) * (m - mean_m) for b, m in points) / sum((b - mean_b) ** 2 for b, _ in points))
        fixed = mean_m - slope * mean_b
        fits.append({"model": model, "align": methods.split(" ")[0], "methods": methods, "fixed_gb": fixed,
                     "gb_per_image": slope,
                     "device_memory_gb": memory_gb, "batch_sizes": sorted(b for b, _ in points),
                     "largest_batch": int((memory_gb - fixed) // slope) if slope > 0 else None})
    return fits


def free_memory() -> None:
    """What earlier rows left: unreachable objects, the allocator's cached blocks, and dynamo's compiled code (its
    cache is keyed by the forward's code, so a row would otherwise reuse an earlier row's graph, or a dynamic-shape
    one once the batch size changed)."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def warm_up(step: TrainStep, steps: int, sync) -> float | None:
    """The untimed steps (compilation happens in the first); how long the first took."""
    first_step_s = None
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        first_step_s = first_step_s or time.perf_counter() - t0
    return first_step_s


def forward_latency(step: TrainStep, sync) -> float:
    """Seconds of one forward pass without gradients, the median of 3 (after one untimed pass, which compiles the
    no_grad graph when the model is compiled)."""
    with torch.no_grad():
        step.forward()
        latencies = []
        for _ in range(3):
            t0 = time.perf_counter()
            step.forward()
            sync()
            latencies.append(time.perf_counter() - t0)
        return statistics.median(latencies)


def timed_steps(step: TrainStep, steps: int, device: torch.device, sync) -> tuple[list[float], PhaseTimer]:
    """The timed steps: each one's seconds, and its phases on a PhaseTimer (peak memory counted from here)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, timer = [], PhaseTimer(device)
    for _ in range(steps):
        t0 = time.perf_counter()
        step(timer)
        sync()
        times.append(time.perf_counter() - t0)
    return times, timer


def profile_row(step: TrainStep, name: str, align: str, b: int, args, device: torch.device,
                times: list[float]) -> dict:
    """torch.profiler's summary of --profile-steps more steps (and the Chrome trace's path with --trace-dir)."""
    trace = None
    if args.trace_dir:
        Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{name}_{align}").strip("-")
        trace = str(Path(args.trace_dir) / f"{slug}_b{b}.json.gz")
    try:
        profile = profile_steps(step, args.profile_steps, device, trace, step_ms=1000 * statistics.median(times))
    except torch.OutOfMemoryError as e:  # the profiler's own memory: the row's timings are kept
        profile = {"error": f"{type(e).__name__}: {e}"[:300]}
    if trace:
        profile["trace"] = trace
    return profile


def time_config(name: str, align: str, b: int, args, device: torch.device, precision: str | None = None) -> dict:
    """One row: `name` with the method set `align` at per-GPU batch `b` (SRA's teacher in `precision`)."""
    step = TrainStep(name, align, b, args, device, precision)
    forward_flops, train_flops = step.flops_per_image()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first_step_s = warm_up(step, args.warmup, sync)
    latency = forward_latency(step, sync)
    times, timer = timed_steps(step, args.steps, device, sync)
    total = sum(times)
    prefixes = step.model.head_state_prefixes()
    result = {"model": name, "align": align, "methods": label(align, precision), "sra_teacher_precision": precision,
              "batch_size": b, "steps": args.steps,
              "images_per_s": b * args.steps / total, "steps_per_s": args.steps / total, "step_times_s": times,
              "external_params_m": sum(m.external_parameters() for m in step.methods) / 1e6,
              "head_params_m": sum(p.numel() for n, p in step.model.named_parameters()
                                   if n.startswith(prefixes)) / 1e6,
              "forward_gmacs_per_image": forward_flops / 2e9, "train_gflops_per_image": train_flops / 1e9,
              "forward_latency_ms": 1000 * latency, "first_step_s": first_step_s or times[0],
              "phase_ms": timer.medians_ms(),
              "derived_iters_per_s_batch256_8gpus": 8 * b * args.steps / total / 256}
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.profile_steps:
        result["profile"] = profile_row(step, name, result["methods"], b, args, device, times)
    return result


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def table(results: list[dict], with_paper: bool) -> str:
    base = {(r["model"], r["batch_size"]): r for r in results if r["align"] == "none"}
    lines = [f"{'model':17s} {'methods':14s} {'batch':>5s} {'EFP (M)':>13s} {'img/s/GPU':>10s} {'it/s 8x256*':>11s} "
             f"{'GMAC/img':>9s} {'fwd+bwd GFLOP':>13s} {'+FLOPs':>7s} {'+time':>7s} {'latency ms':>10s}"
             + ("   paper: EFP, it/s, GFLOPs, ms" if with_paper else "")]
    for r in results:
        ref = base.get((r["model"], r["batch_size"]))
        rel = (f" ({100 * (r['images_per_s'] / ref['images_per_s'] - 1):+.0f}%)" if ref and r is not ref else "")
        line = (f"{r['model']:17s} {r['methods']:14s} {r['batch_size']:5d} {r['external_params_m']:6.0f} + "
                f"{r['head_params_m']:4.1f} "
                f"{r['images_per_s']:10.1f} {r['derived_iters_per_s_batch256_8gpus']:11.2f}{rel:7s} "
                f"{r['forward_gmacs_per_image']:9.2f} {r['train_gflops_per_image']:13.1f} "
                f"{percent(r.get('flop_overhead')):>7s} {percent(r.get('time_overhead')):>7s} "
                f"{r['forward_latency_ms']:10.1f}")
        if with_paper and r["align"] in PAPER_TABLE4:
            ext, head, its, gflops, ms = PAPER_TABLE4[r["align"]]
            line += f"   {ext} + {head}, {its}, {gflops}, {ms}"
        lines.append(line)
    lines.append("* derived: 8 x images/s per GPU / 256, if 8 GPUs scale linearly; GMAC = the paper's 'GFLOPs' "
                 "(forward multiply-accumulates per image); +FLOPs: train FLOPs over vanilla's (the floor), +time: "
                 "step time over vanilla's")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.compile = resolve_compile(args.compile, device)  # the JSON records the value used
    if args.ddp and not torch.distributed.is_initialized():  # a group of one, met in memory: no port to collide on
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                             store=torch.distributed.HashStore())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    base_report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                   or "cpu", "torch": torch.__version__, "commit": git_commit(), "precision": args.precision,
                   "compile": args.compile, "compile_mode": args.compile_mode if args.compile else None,
                   "compile_unit": args.compile_unit if args.compile else None, "ddp": args.ddp,
                   "command": " ".join(["python", "scripts/benchmark_train.py",
                                        *(sys.argv[1:] if argv is None else argv)]),
                   "sdpa_backend": args.sdpa_backend, "enc_type": args.enc_type,
                   "encoder_weights": args.enc_weights or "random"}
    memory_gb = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    results, failures = [], []

    def report() -> dict:
        """The report of the rows so far, written after each row (atomically: a run stopped part-way keeps them)."""
        add_overheads(results, args)
        fits = largest_batches(results, memory_gb) if memory_gb else []
        data = {**base_report, "results": results, "failures": failures, "memory_fits": fits}
        if args.out:
            with atomic_write(args.out, "w") as f:
                f.write(json.dumps(data, indent=1))
        return data

    for name in args.models:
        for b in sorted(args.batch_size):
            for align, precision in configurations(args):
                methods = label(align, precision)
                if any(f["model"] == name and f["methods"] == methods and f["batch_size"] < b for f in failures):
                    print(f"{name} {methods} batch {b}: skipped (a smaller batch ran out of memory)", flush=True)
                    continue
                try:
                    results.append(time_config(name, align, b, args, device, precision))
                except torch.OutOfMemoryError as e:  # a batch too large: recorded, and the other rows still run
                    failures.append({"model": name, "align": align, "methods": methods, "batch_size": b,
                                     "error": f"{type(e).__name__}: {e}"[:300]})
                    print(f"{name} {methods} batch {b}: out of memory", flush=True)
                else:
                    print(f"{name} {methods} batch {b}: {results[-1]['images_per_s']:.1f} images/s", flush=True)
                free_memory()  # here, once a failed row's frames and their tensors are gone
                report()
    final = report()
    print(table(results, with_paper=args.table4))
    for r in results:
        print(f"{r['model']} {r['methods']} batch {r['batch_size']}, median ms per phase: "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["phase_ms"].items()))
        if "by_kind_ms" in r.get("profile", {}):
            prof = r["profile"]
            busy = "" if prof["busy_fraction"] is None else f" ({100 * prof['busy_fraction']:.0f}% of the step)"
            print(f"  profiled {'kernel' if device.type == 'cuda' else 'operator'} time {prof['busy_ms_per_step']:.1f} "
                  f"ms per step{busy}: " + ", ".join(f"{k} {v:.1f}" for k, v in prof["by_kind_ms"].items()))
    for f in final["memory_fits"]:
        print(f"{f['model']} {f['methods']}: peak memory {f['fixed_gb']:.1f} GB + {f['gb_per_image']:.3f} GB per image "
              f"(fit over batches {f['batch_sizes']}): the largest batch for {f['device_memory_gb']:.0f} GB is about "
              f"{f['largest_batch']}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
