"""Write docs/benchmarks.md from benchmarks/results/*.json: one table per kind of result, each row with its device,
torch version, commit and the command that produced it.

    python scripts/benchmarks_doc.py           # rewrite docs/benchmarks.md
    python scripts/benchmarks_doc.py --check   # exit 1 if docs/benchmarks.md is not what this would write

Kinds: the transcribed H100 baseline, training (scripts/benchmark_train.py: speed, where the step time goes, memory
fits), sampling (scripts/benchmark_sample.py),
encoding, evaluation, the quickstart and the pixel-rounding measurement. A file of no known kind is listed by name.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402  (torch-free)

NOT_RECORDED = "not recorded"


def short(commit: str | None) -> str:
    """The first 7 hex digits of a commit, keeping any remark after it ('(uncommitted changes)')."""
    if not commit:
        return NOT_RECORDED
    return re.sub(r"\b([0-9a-f]{7})[0-9a-f]{33}\b", r"\1", str(commit))


def num(value, digits: int = 3) -> str:
    """A figure with `digits` significant digits (integers as they are), '' for None."""
    if value is None:
        return ""
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def code(command: str | None) -> str:
    return f"`{command}`" if command and command != NOT_RECORDED else NOT_RECORDED


def cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------------------------
# One function per kind: rows of {column: value}


def baseline_rows(d: dict, name: str) -> list[dict]:
    return [{"what": r["what"], "figure": r["figure"], "device": d["device"], "torch": d["torch"],
             "commit": short(d["commit"]), "command": code(d.get("command")), "file": name} for r in d["rows"]]


def train_rows(d: dict, name: str) -> list[dict]:
    return [{"device": d["device"], "torch": d["torch"], "commit": short(d.get("commit")), "model": r["model"],
             "methods": r.get("methods", r["align"]), "batch": r["batch_size"], "precision": d.get("precision", ""),
             "compile": compiled(d), "img/s": num(r["images_per_s"], 4),
             "peak GB": num(r.get("peak_memory_gb")), "fwd GMAC/img": num(r.get("forward_gmacs_per_image"), 4),
             "+FLOPs": percent(r.get("flop_overhead")), "+time": percent(r.get("time_overhead")),
             "first step s": num(r.get("first_step_s")), "command": code(d.get("command")), "file": name}
            for r in d["results"]] + [
        {"device": d["device"], "torch": d["torch"], "commit": short(d.get("commit")), "model": f["model"],
         "methods": f.get("methods", f["align"]), "batch": f["batch_size"], "precision": d.get("precision", ""),
         "compile": compiled(d),
         "img/s": f"failed: {f['error'].split(':')[0]}", "command": code(d.get("command")), "file": name}
        for f in d.get("failures", [])]


def compiled(d: dict) -> str:
    """'no', 'yes', or 'yes (mode)' for a torch.compile mode other than the default."""
    if not d.get("compile"):
        return "no"
    mode = d.get("compile_mode") or "default"
    return "yes" if mode == "default" else f"yes ({mode})"


def step_rows(d: dict, name: str) -> list[dict]:
    """Where each training row's step time goes: its phases (median ms) and, when profiled, kernel time by kind."""
    rows = []
    for r in d["results"]:
        if "phase_ms" not in r:
            continue
        prof = r.get("profile", {})
        kinds = prof.get("by_kind_ms", {})
        busy = prof.get("busy_ms_per_step")
        rows.append({"device": d["device"], "torch": d["torch"], "commit": short(d.get("commit")), "model": r["model"],
                     "methods": r.get("methods", r["align"]), "batch": r["batch_size"], "compile": compiled(d),
                     "attention": d.get("sdpa_backend", "default"),
                     "step ms (median)": num(1000 * statistics.median(r["step_times_s"])),
                     "phases ms": ", ".join(f"{k} {num(v)}" for k, v in r["phase_ms"].items()),
                     "busy": "" if prof.get("busy_fraction") is None else f"{100 * prof['busy_fraction']:.0f}%",
                     "kernel time by kind": ", ".join(f"{k} {100 * v / busy:.0f}%" for k, v in kinds.items()
                                                      if busy and v >= 0.01 * busy),
                     "command": code(d.get("command")), "file": name})
    return rows


def memory_rows(d: dict, name: str) -> list[dict]:
    return [{"device": d["device"], "torch": d["torch"], "commit": short(d.get("commit")), "model": f["model"],
             "methods": f.get("methods", f["align"]), "compile": compiled(d),
             "batches measured": " ".join(map(str, f["batch_sizes"])), "fixed GB": num(f["fixed_gb"]),
             "GB per image": num(f["gb_per_image"]), "device GB": num(f["device_memory_gb"]),
             "largest batch (fit)": f["largest_batch"], "command": code(d.get("command")), "file": name}
            for f in d.get("memory_fits", [])]


def percent(value) -> str:
    """An overhead (0.092) as a percentage (+9.2%), '' for None."""
    return "" if value is None else f"{100 * value:+.1f}%"


def sample_rows(d: dict, name: str) -> list[dict]:
    args, rows = d["args"], []
    steps = f"{d['protocol']['num_steps']}" + (f" (from {args['sampler_steps']})" if d.get("extrapolated") else "")
    for r in d["results"]:
        row = {"device": d["device"], "torch": d["torch"], "commit": short(d.get("commit")), "model": args["model"],
               "batch": args["batch_size"], "variant": r["variant"], "steps": steps}
        if r["status"] != "ok":
            rows.append({**row, "img/s": f"{r['status']}: {r.get('note', '')}", "command": code(d.get("command")),
                         "file": name})
            continue
        acc = r.get("accuracy", {}).get("vs_autocast")
        rows.append({**row, "fwd 2B ms": num(r["forward"]["guided"]["median_ms"], 4),
                     "img/s": num(r["sampler"]["images_per_s"], 4), "h / 50K": num(r["sampler"]["gpu_hours_per_50k"]),
                     "speed-up": num(r.get("speedup_vs_autocast", {}).get("sampler")),
                     "latent err / std": num(acc["latents"]["max_rel_std"], 2) if acc else "",
                     "decode share": num(r.get("with_decode", {}).get("decode_fraction"), 2),
                     "peak GB": num(r.get("peak_memory_gb")), "command": code(d.get("command")), "file": name})
    return rows


def encode_rows(d: dict, name: str) -> list[dict]:
    m = d["machine"]
    return [{"device": f"{r['device']} ({m.get('cpu', '')}, torch threads: {r['torch_threads']})", "torch": m["torch"],
             "commit": short(m.get("git_commit")), "VAE": r["vae"], "res": r["resolution"], "precision": r["precision"],
             "batch": r["batch_size"], "flip": "yes" if r["flip"] else "no",
             "encode img/s": num(r["vae_encode_images_per_s"]),
             "CLI img/s": num(r.get("cli_images_per_s_including_vae_load")),
             "command": code(r.get("command") or d.get("command")), "file": name}
            for r in d["runs"] if "vae_encode_images_per_s" in r]


def encode_loader_rows(d: dict, name: str) -> list[dict]:
    m = d["machine"]
    return [{"device": f"cpu ({m.get('cpu', '')})", "cpu_count": m.get("cpu_count", ""), "torch": m["torch"],
             "commit": short(m.get("git_commit")), "res": r["resolution"], "JPEG": r.get("jpeg_size", ""),
             "batch": r["batch_size"], "ranks": p["ranks"], "workers/rank": p["workers_per_rank"],
             "images": p["images"], "img/s": num(p["images_per_s"]),
             "efficiency": "" if p["efficiency"] is None else f"{p['efficiency']:.2f}",
             "command": code(r.get("command")), "file": name}
            for r in d["runs"] if "loader_scaling" in r for p in r["loader_scaling"]]


def eval_rows(d: dict, name: str) -> list[dict]:
    m = d["machine"]
    return [{"device": f"{r['device']} (torch threads: {r['torch_threads']})", "torch": m["torch"],
             "commit": short(m.get("git_commit") or d.get("commit")), "weights": r["weights"],
             "images": r["images"], "features img/s": num(r["features_images_per_s"]),
             "50K run s (est.)": num(r["estimated_50k_run_seconds"]), "command": code(d.get("command")), "file": name}
            for r in d["runs"]]


def quickstart_rows(d: dict, name: str) -> list[dict]:
    return [{"device": d.get("device", NOT_RECORDED), "torch": d.get("torch", NOT_RECORDED),
             "commit": short(d.get("commit")), "row": r["name"], "accuracy": num(r.get("accuracy")),
             "FD": num(r.get("fd")), "command": code(d.get("command")), "file": name} for r in d["rows"]]


def rounding_rows(d: dict, name: str) -> list[dict]:
    return [{"device": d.get("machine", NOT_RECORDED), "torch": d.get("torch", NOT_RECORDED),
             "commit": short(d.get("commit")), "run": r["run"], "rounding": r["rounding"],
             "accuracy": num(r["accuracy"]), "FD": num(r["fd"]),
             "pixels one level brighter": num(r["pixels_one_level_brighter"]), "command": code(d.get("command")),
             "file": name} for r in d["rows"]]


def first_row(d: dict, key: str) -> dict:
    rows = d.get(key)
    return rows[0] if isinstance(rows, list) and rows and isinstance(rows[0], dict) else {}


# (title, description, test of a file's JSON, rows)
KINDS: list[tuple[str, str, Callable[[dict], bool], Callable[[dict, str], list[dict]]]] = [
    ("H100 baseline (transcribed)",
     "The figures to beat, transcribed by hand from the H100 run at commit a101ca5 recorded in shared/PERF-BASELINE.md "
     "(not produced by a script in this form; the exact commands were not recorded).",
     lambda d: d.get("kind") == "transcribed-baseline", baseline_rows),
    ("Training", "`scripts/benchmark_train.py`: optimizer steps on synthetic latents, after warm-up; a method set with "
     "SRA once per SRA teacher precision (`sra (teacher fp32)`, SRA's own, and `sra (teacher autocast)`).",
     lambda d: "images_per_s" in first_row(d, "results") or "align" in first_row(d, "failures"), train_rows),
    ("Training: where the step time goes",
     "`scripts/benchmark_train.py`: each phase's median time over the timed steps (on CUDA, between events in the "
     "stream: idle gaps count in the phase they fall in; forward includes the methods' loss terms); with "
     "`--profile-steps`, the share of the GPU's kernel time by kind of work and the step's busy fraction.",
     lambda d: "phase_ms" in first_row(d, "results"), step_rows),
    ("Training: memory",
     "`scripts/benchmark_train.py` at two or more batch sizes: peak memory fitted as fixed + per image x batch, and "
     "the largest batch whose predicted peak fits the device (the allocator's fragmentation is not in the fit).",
     lambda d: bool(d.get("memory_fits")), memory_rows),
    ("Sampling",
     "`scripts/benchmark_sample.py`: SDE sampler with CFG on the doubled batch inside the guidance interval; img/s "
     "and hours for 50K images on that device, sampler only (decode share: fraction of time with fp32 SD-VAE "
     "decoding added); steps 250 (from N): extrapolated from N-step runs by the counted forwards; speed-up and "
     "latent error (max abs / std of the latents) against the autocast row of the same run.",
     lambda d: d.get("benchmark") == "sample", sample_rows),
    ("Encoding", "Preprocessing (VAE encoding) speed.",
     lambda d: "vae_encode_images_per_s" in first_row(d, "runs"), encode_rows),
    ("Encoding: data loading across ranks",
     "`scripts/benchmark_encode.py --loader-ranks`: the CPU side of preprocessing alone. R ranks at once on one "
     "machine, each reading its 1/R share of synthetic JPEGs through encode's DataLoader (decode + RGB + ADM crop, "
     "encode's batches and collate) with workers/rank decoding processes; img/s over all ranks, from the start signal "
     "to the last rank's end; efficiency = img/s / (R x img/s of R = 1 in the same run).",
     lambda d: "loader_scaling" in first_row(d, "runs"), encode_loader_rows),
    ("Evaluation", "Evaluator (Inception features, metrics) speed.",
     lambda d: "features_images_per_s" in first_row(d, "runs"), eval_rows),
    ("Quickstart", "`scripts/quickstart.py` results (its own metrics: digit-classifier accuracy, Frechet distance).",
     lambda d: "name" in first_row(d, "rows") and "accuracy" in first_row(d, "rows"), quickstart_rows),
    ("Pixel rounding", "`scripts/measure_pixel_rounding.py` on a quickstart run (its own metrics).",
     lambda d: "rounding" in first_row(d, "rows"), rounding_rows),
]


def markdown_table(rows: list[dict]) -> list[str]:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return lines


def render(results_dir: Path) -> str:
    tables: dict[str, list[dict]] = {title: [] for title, *_ in KINDS}
    unknown = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise SystemExit(f"error: {path} is not valid JSON ({e})") from None
        kinds = [k for k in KINDS if isinstance(data, dict) and k[2](data)]
        if not kinds:
            unknown.append(path.name)
        for title, _, _, rows in kinds:
            tables[title] += rows(data, path.name)
    lines = ["# Benchmarks", "",
             "Written by `scripts/benchmarks_doc.py` from `benchmarks/results/*.json`: do not edit by hand; rerun "
             "`python scripts/benchmarks_doc.py` after adding a result (the tests run it with `--check`). Figures "
             "from different devices or busy CPUs are not comparable: compare rows of the same run (same file).",
             ""]
    for title, description, _, _ in KINDS:
        if tables[title]:
            lines += [f"## {title}", "", description, "", *markdown_table(tables[title]), ""]
    if unknown:
        lines += ["## Other files", "", "Of no kind this script knows: " + ", ".join(unknown) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"),
                   help="folder of the JSON files (default: benchmarks/results)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"),
                   help="the Markdown file (default: docs/benchmarks.md)")
    p.add_argument("--check", action="store_true", help="only compare: exit 1 if the file differs")
    args = p.parse_args(argv)
    text = render(Path(args.results_dir))
    out = Path(args.out)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            print(f"{out} is not what scripts/benchmarks_doc.py writes from {args.results_dir}: run "
                  f"`python scripts/benchmarks_doc.py`", file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
