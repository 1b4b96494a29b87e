"""Sampling speed of today's path (fp32 weights under bf16 autocast) and of the fast paths, side by side in one run.

    python scripts/benchmark_sample.py --sampler-steps 25 --decode --out benchmarks/results/sample_h100.json

Each variant is one row: `autocast` (fp32 weights under bf16 autocast: generate.py's path before the speed issue),
`bf16-weights` (samplers.sampling_model(model, "bf16"): matmul weights stored in bf16, the same bits under
autocast), `compile` (the same plus torch.compile with static shapes), `compile-cudagraphs` (the bf16-weight model
compiled with mode="reduce-overhead"; CUDA only) and `fp32` (no autocast). Per variant: the latency of one model
forward at the guided batch (2 x --batch-size) and the unguided one (median of --repeats calls after --warmup),
the first call (compilation) apart; the whole SDE sampler (samplers.euler_maruyama_sampler, per-sample generators
as generate.py draws them, CFG --cfg-scale for --guidance-low <= t <= --guidance-high) run for --sampler-steps and,
when that is fewer than --num-steps, extrapolated to --num-steps by the forward costs of the guided and unguided
calls counted in each run; images/s and GPU-hours for 50K images; the error of one forward and of the sampler's
final latents against the autocast path on the same inputs; peak memory on CUDA. --decode adds the cost of decoding
the batch with a random-weight SD-VAE of the real architecture in fp32 (what generate.py does). The weights are
random (timing needs no checkpoint) with every Linear layer drawn from N(0, 0.02^2): adaLN-Zero's init would make
every block the identity and the output zero, and the errors would mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402
from integrity import atomic_write  # noqa: E402

VARIANTS = ("fp32", "autocast", "bf16-weights", "compile", "compile-cudagraphs")
DEFAULT_VARIANTS = ("autocast", "bf16-weights", "compile", "compile-cudagraphs")
NUM_IMAGES = 50_000
# SD-VAE's architecture (stabilityai/sd-vae-ft-ema), for a random-weight decoder of the real cost.
SD_VAE_CONFIG = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                     sample_size=256)
SD_VAE_SCALE = 0.18215


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser(__doc__)
    p.add_argument("--model", choices=cli.MODEL_NAMES, default="SiT-XL/2", metavar="NAME",
                   help=f"architecture, one of {', '.join(cli.MODEL_NAMES)}")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (generate.py's per-proc batch)")
    p.add_argument("--num-steps", type=int, default=250, help="sampler steps of the protocol the figures are for")
    p.add_argument("--sampler-steps", type=int, default=None,
                   help="steps of the timed sampler runs (default: --num-steps); fewer are extrapolated to "
                        "--num-steps by the counted guided and unguided forwards")
    p.add_argument("--cfg-scale", type=float, default=1.8, help="classifier-free guidance scale")
    p.add_argument("--guidance-low", type=float, default=0.0, help="guidance applies at t >= this")
    p.add_argument("--guidance-high", type=float, default=0.7, help="guidance applies at t <= this")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                   help=f"rows to time (default: {' '.join(DEFAULT_VARIANTS)}, and fp32 first on the CPU)")
    p.add_argument("--repeats", type=int, default=10, help="timed forward calls per batch size")
    p.add_argument("--sampler-repeats", type=int, default=1, help="timed sampler runs per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed forward calls per batch size after the first")
    p.add_argument("--decode", action="store_true", help="also time SD-VAE decoding of one batch (needs diffusers)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights; samples 0..batch-1 of this global seed")
    p.add_argument("--latent-size", type=int, default=32, help="latent side (32: 256 px images)")
    p.add_argument("--depth", type=int, default=None, help="override depth (tiny CPU smoke runs)")
    p.add_argument("--hidden-size", type=int, default=None, help="override hidden size (tiny CPU smoke runs)")
    p.add_argument("--num-heads", type=int, default=None, help="override heads (tiny CPU smoke runs)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the model")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if min(args.batch_size, args.num_steps, args.repeats, args.sampler_repeats, args.latent_size) < 1:
        p.error("--batch-size, --num-steps, --repeats, --sampler-repeats and --latent-size must be positive")
    if args.warmup < 0 or (args.sampler_steps is not None and not 1 <= args.sampler_steps <= args.num_steps):
        p.error("need --warmup >= 0 and 1 <= --sampler-steps <= --num-steps")
    if args.cfg_scale < 1 or not 0 <= args.guidance_low <= args.guidance_high <= 1:
        p.error("need --cfg-scale >= 1 and 0 <= --guidance-low <= --guidance-high <= 1")
    args.sampler_steps = args.sampler_steps or args.num_steps
    return args


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before the slow imports below (main parses again)

import torch  # noqa: E402

from profiling import git_commit  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Models and the calls the sampler makes


class CountingModel:
    """Calls `model(x, t, y=y)` and records each call's batch size (guided calls have twice the batch)."""

    def __init__(self, model, num_classes: int, mark_step: bool = False):
        self.model, self.num_classes, self.mark_step, self.batches = model, num_classes, mark_step, []

    def __call__(self, x, t, y):
        self.batches.append(x.shape[0])
        if self.mark_step:  # CUDA graphs: each call is a new step (outputs of the last one are consumed)
            torch.compiler.cudagraph_mark_step_begin()
        return self.model(x, t, y=y)

    def forwards(self, batch: int) -> dict:
        return {"guided": self.batches.count(2 * batch), "unguided": self.batches.count(batch)}


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The backbone with random weights on the CPU in fp32: every Linear weight and bias from N(0, 0.02^2)."""
    from alignment import model_from_args

    torch.manual_seed(args.seed)
    model = model_from_args({"model": args.model, "depth": args.depth, "hidden_size": args.hidden_size,
                             "num_heads": args.num_heads, "num_classes": args.num_classes,
                             "latent_shape": [4, args.latent_size, args.latent_size]}, with_heads=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    torch.nn.init.normal_(module.bias, std=0.02)
    return model.eval()


def variant_model(base: torch.nn.Module, variant: str, device: torch.device):
    """(callable model, autocast on?) of a variant, from a copy of the fp32 base model."""
    import samplers

    model = copy.deepcopy(base).to(device)
    if variant in ("fp32", "autocast"):
        return model.eval(), variant == "autocast"
    net = samplers.sampling_model(model, "bf16", compile=variant == "compile")
    if variant == "compile-cudagraphs":
        net = torch.compile(net, dynamic=False, mode="reduce-overhead")
    return net, True


def protocol_forwards(num_steps: int, batch: int, args: argparse.Namespace) -> dict:
    """Guided and unguided forwards of the SDE sampler at `num_steps`, counted by running it with a stub model."""
    import samplers

    def stub(x, t, y):
        return (torch.zeros_like(x),)

    counter = CountingModel(stub, args.num_classes)
    z = torch.zeros(batch, 1, 1, 1)
    samplers.euler_maruyama_sampler(counter, z, torch.zeros(batch, dtype=torch.long), num_steps=num_steps,
                                    cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
                                    guidance_high=args.guidance_high, generator=torch.Generator().manual_seed(0))
    return counter.forwards(batch)


# ----------------------------------------------------------------------------------------------
# Measurements


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def error_stats(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Max and mean absolute error, also relative to the reference's standard deviation."""
    diff = (out.double() - ref.double()).abs()
    std = ref.double().std().item()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "ref_std": std,
            "max_rel_std": diff.max().item() / std, "mean_rel_std": diff.mean().item() / std}


def time_forwards(net, autocast: bool, inputs: dict, args, device) -> tuple[dict, dict, torch.Tensor]:
    """Per batch size: first call (compilation) and --repeats timed calls after --warmup; the guided output."""
    timings, first, output = {}, {}, None
    for kind, (x, t, y) in inputs.items():
        times = []
        for i in range(1 + args.warmup + args.repeats):
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = net(x, t, y)[0]
            if i == 0 and kind == "guided":
                output = out.float().cpu()
            sync(device)
            times.append(time.perf_counter() - t0)
        first[kind] = times[0]
        timed = times[1 + args.warmup:]
        timings[kind] = {"batch": x.shape[0], "times_ms": [1000 * s for s in timed],
                         "median_ms": 1000 * statistics.median(timed)}
    return timings, first, output


def run_sampler(net, autocast: bool, args, device) -> tuple[float, torch.Tensor, dict]:
    """One sampler run on samples 0..batch-1 drawn as sampling.batch draws them: (seconds, latents, forwards)."""
    import samplers
    from sampling.seeds import NOISE_STREAM, sample_generator, sample_labels

    indices = list(range(args.batch_size))
    generators = [sample_generator(args.seed, i, NOISE_STREAM) for i in indices]
    z = samplers.randn((len(indices), 4, args.latent_size, args.latent_size), generators, device, torch.float32)
    y = sample_labels(indices, args.num_classes, "random", args.seed).to(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        x = samplers.euler_maruyama_sampler(net, z, y, num_steps=args.sampler_steps, cfg_scale=args.cfg_scale,
                                            guidance_low=args.guidance_low, guidance_high=args.guidance_high,
                                            generator=generators)
    sync(device)
    return time.perf_counter() - t0, x.float().cpu(), net.forwards(args.batch_size)


def time_variant(base, variant: str, inputs: dict, args, device, protocol: dict) -> tuple[dict, torch.Tensor,
                                                                                          torch.Tensor]:
    """The variant's row, its guided forward output and its sampler's final latents (both on the CPU)."""
    net, autocast = variant_model(base, variant, device)
    counter = CountingModel(net, args.num_classes, mark_step=variant == "compile-cudagraphs")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if variant.startswith("compile"):
        torch._dynamo.reset()  # a fresh compilation per variant (inductor's disk cache may still serve it)
        torch._dynamo.utils.counters.clear()
    with torch.inference_mode():
        forward, first, output = time_forwards(counter, autocast, inputs, args, device)
        runs = []
        for _ in range(args.sampler_repeats):
            counter.batches.clear()
            runs.append(run_sampler(counter, autocast, args, device))
    seconds = [r[0] for r in runs]
    counted = runs[0][2]
    lat = {k: forward[k]["median_ms"] / 1000 for k in ("guided", "unguided")}
    cost = lambda n: n["guided"] * lat["guided"] + n["unguided"] * lat["unguided"]  # noqa: E731
    per_batch = statistics.median(seconds) * cost(protocol) / cost(counted)
    row = {"variant": variant, "status": "ok", "autocast": autocast, "forward": forward,
           "first_call_s": first,
           "graphs_compiled": torch._dynamo.utils.counters["stats"]["unique_graphs"] if "compile" in variant else None,
           "compile_s": {k: first[k] - forward[k]["median_ms"] / 1000 for k in first} if "compile" in variant
           else None,
           "sampler": {"steps": args.sampler_steps, "forwards": counted, "times_s": seconds,
                       "median_s": statistics.median(seconds), "protocol_s_per_batch": per_batch,
                       "images_per_s": args.batch_size / per_batch,
                       "gpu_hours_per_50k": NUM_IMAGES / (args.batch_size / per_batch) / 3600},
           "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    del net, counter
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row, output, runs[0][1]


def time_decode(latents: torch.Tensor, args, device) -> dict:
    """fp32 decoding of the batch by a random-weight SD-VAE (generate.py's decode_latents)."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        return {"status": "skipped", "note": f"diffusers is not installed ({e})"}
    from latent_codecs.autoencoder import decode_latents

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**SD_VAE_CONFIG).to(device).eval()
    x = latents.to(device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        for _ in range(1 + min(args.repeats, 3)):
            t0 = time.perf_counter()
            decode_latents(vae, x, SD_VAE_SCALE, 0.0)
            sync(device)
            times.append(time.perf_counter() - t0)
    result = {"status": "ok", "batch": x.shape[0], "first_s": times[0], "times_s": times[1:],
              "median_s": statistics.median(times[1:]),
              "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    del vae
    return result


# ----------------------------------------------------------------------------------------------
# Report


def add_comparisons(rows: list[dict], outputs: dict, latents: dict, decode: dict | None) -> None:
    """Errors against the autocast (and fp32) rows, speed-ups against autocast, and decoding's share of the time."""
    ok = {r["variant"]: r for r in rows if r["status"] == "ok"}
    ref = ok.get("autocast")
    for row in ok.values():
        v = row["variant"]
        row["accuracy"] = {f"vs_{name}": {"forward": error_stats(outputs[v], outputs[name]),
                                           "latents": error_stats(latents[v], latents[name])}
                           for name in ("autocast", "fp32") if name in ok and name != v}
        if ref is not None:
            row["speedup_vs_autocast"] = {
                "forward_guided": ref["forward"]["guided"]["median_ms"] / row["forward"]["guided"]["median_ms"],
                "forward_unguided": ref["forward"]["unguided"]["median_ms"] / row["forward"]["unguided"]["median_ms"],
                "sampler": ref["sampler"]["protocol_s_per_batch"] / row["sampler"]["protocol_s_per_batch"]}
        if decode and decode.get("status") == "ok":
            total = row["sampler"]["protocol_s_per_batch"] + decode["median_s"]
            row["with_decode"] = {"images_per_s": decode["batch"] / total,
                                  "gpu_hours_per_50k": NUM_IMAGES * total / decode["batch"] / 3600,
                                  "decode_fraction": decode["median_s"] / total}


def table(report: dict) -> str:
    lines = [f"{'variant':19s} {'fwd 2B ms':>9s} {'fwd B ms':>9s} {'compile s':>9s} {'img/s':>8s} "
             f"{'h/50K':>7s} {'speedup':>7s} {'max err fwd':>11s} {'max err lat':>11s} {'peak GB':>7s}"]
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"{r['variant']:19s} {r['status']}: {r['note']}")
            continue
        nan = float("nan")
        comp = f"{sum(r['compile_s'].values()):.1f}" if r["compile_s"] else ""
        acc = r["accuracy"].get("vs_autocast") or {"forward": {"max_abs": nan}, "latents": {"max_rel_std": nan}}
        fwd, smp = r["forward"], r["sampler"]
        lines.append(
            f"{r['variant']:19s} {fwd['guided']['median_ms']:9.2f} {fwd['unguided']['median_ms']:9.2f} {comp:>9s}"
            f" {smp['images_per_s']:8.3f} {smp['gpu_hours_per_50k']:7.2f}"
            f" {r.get('speedup_vs_autocast', {}).get('sampler', nan):7.2f}"
            f" {acc['forward']['max_abs']:11.3g} {acc['latents']['max_rel_std']:11.3g}"
            f" {nan if r['peak_memory_gb'] is None else r['peak_memory_gb']:7.1f}")
    p = report["protocol"]
    lines.append(f"img/s, h/50K: SDE {p['num_steps']} steps ({p['forwards']['guided']} guided + "
                 f"{p['forwards']['unguided']} unguided forwards), "
                 + ("measured" if not report["extrapolated"] else
                    f"extrapolated from {report['args']['sampler_steps']}-step runs by forward cost")
                 + "; sampler only. Errors vs autocast: forward max abs; latents max abs / their std")
    d = report.get("decode")
    if d:
        lines.append(f"decode: {d['median_s']:.3f} s per batch of {d['batch']} (fp32)" if d["status"] == "ok"
                     else f"decode: {d['status']}: {d['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(["python", "scripts/benchmark_sample.py", *(sys.argv[1:] if argv is None else argv)])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variants = args.variants or ((() if device.type == "cuda" else ("fp32",)) + DEFAULT_VARIANTS)
    commit = git_commit()
    base = build_model(args)
    b, s = args.batch_size, args.latent_size
    gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.inference_mode():  # inference tensors, as the sampler makes: a compiled graph serves both
        x = torch.randn(b, 4, s, s, generator=gen).to(device)
        y = torch.randint(args.num_classes, (b,), generator=gen).to(device)
        t = torch.full((b,), 0.5, device=device)
        inputs = {"guided": (torch.cat([x, x]), torch.cat([t, t]),
                             torch.cat([y, torch.full_like(y, args.num_classes)])), "unguided": (x, t, y)}
    protocol = protocol_forwards(args.num_steps, 1, args)
    rows, outputs, latents = [], {}, {}

    def write_report(decode: dict | None) -> dict:
        """The report of the rows so far, written to --out after each variant (atomically: a run stopped part-way
        keeps them)."""
        add_comparisons(rows, outputs, latents, decode)
        report = {"benchmark": "sample", "command": command,
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                  else f"cpu ({platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()})",
                  "torch": torch.__version__, "commit": commit, "python": platform.python_version(),
                  "args": vars(args), "variants": list(variants), "weights": "random, every Linear from N(0, 0.02^2)",
                  "protocol": {"mode": "sde", "num_steps": args.num_steps, "cfg_scale": args.cfg_scale,
                               "guidance_low": args.guidance_low, "guidance_high": args.guidance_high,
                               "forwards": protocol},
                  "extrapolated": args.sampler_steps != args.num_steps,
                  "extrapolation": "protocol seconds = measured sampler seconds x (guided x guided-forward ms + "
                                   "unguided x unguided-forward ms) of the protocol / the same of the timed run",
                  "results": rows, "decode": decode}
        if args.out:
            with atomic_write(args.out, "w") as f:
                f.write(json.dumps(report, indent=1) + "\n")
        return report

    for variant in variants:
        if variant == "compile-cudagraphs" and device.type != "cuda":
            rows.append({"variant": variant, "status": "skipped", "note": "CUDA graphs need a CUDA device"})
            continue
        try:
            row, outputs[variant], latents[variant] = time_variant(base, variant, inputs, args, device, protocol)
        except Exception as e:  # one failing variant (e.g. out of memory) must not lose the others' figures
            traceback.print_exc()
            row = {"variant": variant, "status": "failed", "note": f"{type(e).__name__}: {e}"[:500]}
        rows.append(row)
        write_report(None)
        if row["status"] == "failed":
            if device.type == "cuda":
                torch.cuda.empty_cache()  # after the except block, which freed the failed frames' tensors
            continue
        print(f"{variant}: forward {row['forward']['guided']['median_ms']:.2f} ms at {2 * b}, "
              f"{row['sampler']['images_per_s']:.3f} images/s", flush=True)
    decode = None
    if args.decode:
        try:
            decode = time_decode(next(iter(latents.values())) if latents else x.cpu(), args, device)
        except Exception as e:
            traceback.print_exc()
            decode = {"status": "failed", "note": f"{type(e).__name__}: {e}"[:500]}
    print(table(write_report(decode)))
    if args.out:
        print(f"wrote {args.out}")
    return 1 if any(r["status"] == "failed" for r in rows) or (decode or {}).get("status") == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
