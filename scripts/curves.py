"""FID (and IS, sFID, precision, recall) against training iterations for a set of runs: one table, one figure.

    python scripts/curves.py runs/SiT-XL-2-vae-repa runs/SiT-XL-2-vanilla --ref VIRTUAL_imagenet256_labeled.npz
    python scripts/curves.py runs/* --ref REF.npz --nproc-per-node 8      # generate.py under torchrun, 8 GPUs

Every checkpoint (`checkpoints/NNNNNNN.pt`) of each run that has no result yet is sampled by generate.py and scored
by evaluations/evaluator.py, as a user would run them by hand, with the full protocol by default (50K samples, SDE 250
steps, no guidance: the paper's Table 2). Work goes to <run>/curves/<protocol>/: generate.py's sample folder per
checkpoint (resumed if a run was killed), the evaluator's JSON, and <step>.json, the finished result; a checkpoint
with a result is never sampled again, so a second run of this command does no work. The rows that train.py
--eval-every logged (metrics.jsonl, usually fewer samples) are added to the table as their own series.
Then it writes <out-dir>/curves.csv, curves.md and curves.png: FID and IS against iterations, images seen and
GPU-hours, one line per run, the paper's Table 2 points for the same model and method beside them.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import CFG_CHANNELS_HELP, cfg_channels, parser  # noqa: E402  (torch-free)

# VAE-REPA paper, Table 2: FID-50K on ImageNet 256x256, batch 256, no CFG; (model, method) -> {iterations: FID}.
PAPER_TABLE2 = {
    ("SiT-B/2", "vanilla"): {400_000: 33.0},
    ("SiT-B/2", "vae-repa"): {400_000: 28.9},
    ("SiT-L/2", "vanilla"): {200_000: 28.2, 400_000: 18.8},
    ("SiT-L/2", "vae-repa"): {200_000: 22.5, 400_000: 14.3},
    ("SiT-XL/2", "vanilla"): {400_000: 17.2, 600_000: 14.6, 7_000_000: 8.3},
    ("SiT-XL/2", "vae-repa"): {400_000: 11.7, 1_000_000: 8.2, 2_000_000: 7.0, 4_000_000: 6.6},
    ("SiT-XL/2", "repa"): {100_000: 19.4, 200_000: 11.1, 400_000: 7.9},
    ("SiT-XL/2", "repa+vae-repa"): {100_000: 16.3, 200_000: 9.2, 400_000: 6.8},
}
PAPER_BATCH = 256
METRICS_FILE = "metrics.jsonl"  # training/evaluation.py's METRICS_FILE (that module imports torch)
COLUMNS = ("run", "series", "model", "method", "step", "images_seen", "gpu_hours", "num_samples", "fid", "sfid",
           "inception_score", "precision", "recall")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("runs", nargs="+", help="train.py run directories (each with args.json and checkpoints/)")
    p.add_argument("--ref", default=None,
                   help="reference batch for the evaluator (ADM's VIRTUAL_imagenet256_labeled.npz for ImageNet 256); "
                        "needed unless every checkpoint has a result already")
    p.add_argument("--out-dir", default="curves", help="where curves.csv, curves.md and curves.png go "
                                                        "(default: %(default)s)")
    g = p.add_argument_group("protocol (generate.py's flags; defaults: the paper's Table 2 protocol)")
    g.add_argument("--num-samples", type=int, default=50_000, help="images per checkpoint (default: %(default)s)")
    g.add_argument("--mode", choices=("sde", "ode"), default="sde", help="sampler (default: %(default)s)")
    g.add_argument("--num-steps", type=int, default=250, help="sampler steps (default: %(default)s)")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale (default: %(default)s, none)")
    g.add_argument("--guidance-high", type=float, default=1.0, help="guidance applies at t <= this (default: 1)")
    g.add_argument("--cfg-channels", type=cfg_channels, default="all", metavar="all|N",
                   help=f"as generate.py --cfg-channels: {CFG_CHANNELS_HELP} (default: %(default)s)")
    g.add_argument("--global-seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    g = p.add_argument_group("hardware")
    g.add_argument("--nproc-per-node", type=int, default=1,
                   help="processes for generate.py (torchrun when > 1; default: %(default)s)")
    g.add_argument("--per-proc-batch-size", type=int, default=64, help="generate.py's batch per process")
    g.add_argument("--device", default=None, help="generate.py and evaluator device (default: cuda when available)")
    g.add_argument("--inception-weights", default=None, help="the evaluator's --inception-weights (default: its own)")
    g.add_argument("--delete-samples", action="store_true",
                   help="delete a checkpoint's PNGs and .npz once its result is written (50K PNGs: ~5 GB each)")
    args = p.parse_args(argv)
    check_args(args, p.error)
    return args


def check_args(args: argparse.Namespace, error) -> None:
    """The protocol's ranges and the paths, before any work: a mistake used to surface as generate.py's error under
    "rerun to resume" (or a traceback, or an empty table with exit 0)."""
    rules = [(flag, lambda v: v >= 1, "positive") for flag in ("--num-samples", "--num-steps", "--per-proc-batch-size",
                                                                "--nproc-per-node")]
    rules += [("--cfg-scale", lambda v: v >= 1, ">= 1 (1: no guidance)"), ("--guidance-high", lambda v: 0 <= v <= 1,
              "in [0, 1]"), ("--global-seed", lambda v: v >= 0, "non-negative")]
    for flag, ok, what in rules:
        if not ok(value := getattr(args, flag[2:].replace("-", "_"))):
            error(f"{flag} must be {what}, got {value}")
    for run in map(Path, args.runs):
        if not (run / "checkpoints").is_dir() and not (run / METRICS_FILE).is_file():
            what = "no such folder" if not run.exists() else f"no checkpoints/ and no {METRICS_FILE}"
            error(f"{run} is not a train.py run directory ({what})")
    if args.ref is not None and not Path(args.ref).exists():
        error(f"--ref {args.ref}: no such file or folder")
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        error(f"--out-dir {args.out_dir} is a file; expected a folder")


def protocol_tag(args: argparse.Namespace) -> str:
    tag = f"{args.num_samples}-{args.mode}-{args.num_steps}steps-cfg{args.cfg_scale}"
    if args.cfg_scale > 1 and args.guidance_high != 1.0:
        tag += f"-high{args.guidance_high}"
    if args.cfg_scale > 1 and args.cfg_channels != "all":
        tag += f"-ch{args.cfg_channels}"
    return tag + f"-seed{args.global_seed}" + (f"-ref-{Path(args.ref).stem}" if args.ref else "")


def protocol_caption(args: argparse.Namespace) -> str:
    guidance = "no guidance" if args.cfg_scale == 1 else f"CFG {args.cfg_scale} for t <= {args.guidance_high}"
    if args.cfg_scale > 1:
        guidance += " on all channels" if args.cfg_channels == "all" else f" on channels 0-{args.cfg_channels - 1}"
    return (f"{args.num_samples:,} samples per checkpoint, {args.mode.upper()} sampler with {args.num_steps} steps, "
            f"{guidance}, random labels, EMA weights; reference: {Path(args.ref).name if args.ref else '?'}")


def run_tool(argv: list[str], nproc: int = 1) -> None:
    """Run a script (generate.py, evaluations/evaluator.py: argv[0]) as a user would, in this directory (torchrun for
    several processes); stop on failure."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={nproc}"]
    done = subprocess.run(launcher + argv)
    if done.returncode != 0:
        raise SystemExit(f"error: {Path(argv[0]).name} failed (exit {done.returncode}); rerun to resume")


def run_info(run: Path) -> dict:
    args = json.loads((run / "args.json").read_text()) if (run / "args.json").is_file() else {}
    align = args.get("align", [])
    align = (["vae-repa"] if align else []) if isinstance(align, bool) else list(align)
    custom = any(args.get(k) is not None for k in ("depth", "hidden_size", "num_heads"))
    return {"model": args.get("model", "?") + (" (custom size)" if custom else ""),
            "method": "+".join(sorted(align)) or "vanilla", "batch_size": args.get("batch_size"),
            "processes": args.get("world_size", 1)}


def wall_seconds(ckpt: Path, step: int, logged: dict[int, dict]) -> float | None:
    """The run's wall time when the checkpoint was written: metrics.jsonl's row, else the checkpoint's own record."""
    if step in logged and logged[step].get("wall_seconds") is not None:
        return logged[step]["wall_seconds"]
    import torch

    try:
        return torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True).get("wall_seconds")
    except Exception:  # noqa: BLE001 - an older or foreign checkpoint: no time recorded
        return None


def evaluate_checkpoint(args: argparse.Namespace, run: Path, step: int, ckpt: Path, info: dict,
                        logged: dict[int, dict]) -> dict:
    """The full-protocol result of one checkpoint: read if finished, else generate.py + the evaluator (resumable)."""
    work = run / "curves" / protocol_tag(args)
    result_path = work / f"{step:07d}.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    if args.ref is None:
        raise SystemExit(f"error: {ckpt} has no result yet; pass --ref to evaluate it")
    sample_dir = work / f"{step:07d}"
    metrics_path = work / f"{step:07d}.metrics.json"
    if not metrics_path.is_file():
        # generate.py keeps the PNGs a killed attempt wrote and only samples the missing ones
        gen = [str(ROOT / "generate.py"), "--ckpt", str(ckpt), "--sample-dir", str(sample_dir), "--num-fid-samples",
               str(args.num_samples), "--mode", args.mode, "--num-steps", str(args.num_steps), "--cfg-scale",
               str(args.cfg_scale), "--cfg-channels", str(args.cfg_channels), "--guidance-high",
               str(args.guidance_high), "--global-seed",
               str(args.global_seed), "--per-proc-batch-size", str(args.per_proc_batch_size)]
        run_tool(gen + (["--device", args.device] if args.device else []), args.nproc_per_node)
        npzs = sorted(sample_dir.glob("*.npz"))
        if len(npzs) != 1:
            raise SystemExit(f"error: expected one .npz in {sample_dir}, found {len(npzs)}")
        ev = [str(ROOT / "evaluations" / "evaluator.py"), str(args.ref), str(npzs[0]), "--out", str(metrics_path),
              "--overwrite", "--quiet"]
        ev += (["--device", args.device] if args.device else [])
        run_tool(ev + (["--inception-weights", args.inception_weights] if args.inception_weights else []))
    metrics = json.loads(metrics_path.read_text())
    seconds = wall_seconds(ckpt, step, logged)
    result = {"step": step, "images_seen": step * info["batch_size"] if info["batch_size"] else None,
              "gpu_hours": seconds * info["processes"] / 3600 if seconds is not None else None,
              **{k: metrics.get(k) for k in COLUMNS[7:]}, "checkpoint": str(ckpt),
              "protocol": protocol_caption(args)}
    tmp = result_path.with_name(result_path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(result_path)
    if args.delete_samples:
        shutil.rmtree(sample_dir, ignore_errors=True)
    return result


def collect(args: argparse.Namespace) -> list[dict]:
    """Table rows: each run's full-protocol results, its metrics.jsonl rows, and the paper's Table 2 points."""
    from checkpoints import list_checkpoints  # imports torch: after parsing, so that --help answers at once
    from training.evaluation import read_rows

    rows, paper_done = [], set()
    for run in map(Path, args.runs):
        info, name = run_info(run), run.name
        logged = {r["step"]: r for r in read_rows(run)}
        base = {"run": name, "model": info["model"], "method": info["method"]}
        for step, ckpt in sorted(list_checkpoints(run / "checkpoints").items()):
            result = evaluate_checkpoint(args, run, step, ckpt, info, logged)
            rows.append({**base, "series": f"{result['num_samples']:,} samples", **result})
        for _, r in sorted(logged.items()):
            rows.append({**base, "series": f"in training, {r.get('num_samples', 0):,} samples",
                         **{k: r.get(k) for k in COLUMNS[4:]}})
        key = (info["model"], info["method"])
        if key in PAPER_TABLE2 and key not in paper_done:
            paper_done.add(key)
            for step, fid in PAPER_TABLE2[key].items():
                rows.append({"run": f"paper: {key[0]} {key[1]}", "series": "VAE-REPA paper, Table 2 (50,000 samples)",
                             "model": key[0], "method": key[1], "step": step, "images_seen": step * PAPER_BATCH,
                             "num_samples": 50_000, "fid": fid})
    return rows


def write_table(rows: list[dict], out: Path, caption: str) -> None:
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([{k: ("" if r.get(k) is None else r[k]) for k in COLUMNS} for r in rows])

    def cell(value) -> str:
        if value is None:
            return "–"
        return f"{value:.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)

    lines = [f"FID against training (lower is better; IS, precision, recall: higher is better). {caption}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in COLUMNS) + " |" for r in rows]
    (out / "curves.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    axes_x = (("step", "training iterations (optimizer steps)"), ("images_seen", "images seen (iterations × batch)"),
              ("gpu_hours", "GPU-hours (wall time × processes)"))
    metrics = (("fid", "FID ↓ (log scale)"), ("inception_score", "Inception Score ↑"))
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), squeeze=False)
    series = {}
    for r in rows:
        series.setdefault((r["run"], r["series"]), []).append(r)
    colours = {}
    for (run, kind), points in series.items():
        paper = kind.startswith("VAE-REPA paper")
        colour = colours.setdefault(run, f"C{len(colours)}")
        for i, (metric, _) in enumerate(metrics):
            for j, (x, _) in enumerate(axes_x):
                pts = sorted((p[x], p[metric]) for p in points if p.get(x) is not None and p.get(metric) is not None)
                if not pts:
                    continue
                style = dict(ls=":", marker="s", mfc="none") if paper else (
                    dict(ls="--", marker="x") if kind.startswith("in training") else dict(ls="-", marker="o"))
                axes[i][j].plot(*zip(*pts), color=colour, label=f"{run} ({kind})", **style)
    for i, (_, ylabel) in enumerate(metrics):
        for j, (_, xlabel) in enumerate(axes_x):
            ax = axes[i][j]
            ax.set_xscale("log")
            if i == 0:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
                ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if not ax.lines:
                ax.text(0.5, 0.5, "no data (the runs recorded no time)" if j == 2 else "no data",
                        ha="center", va="center", transform=ax.transAxes)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=8)
    fig.text(0.5, 0.01, f"Ours: {caption}. Paper points (VAE-REPA, Table 2): 50,000 samples, no CFG, batch 256; "
             "GPU-hours unknown for the paper. Dashed: figures train.py --eval-every logged "
             "(fewer samples, so higher FID).", ha="center", fontsize=9, wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 0.9))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = collect(args)
    if not any(r["run"] in {Path(run).name for run in args.runs} for r in rows):
        print(f"error: nothing to plot: no checkpoints/NNNNNNN.pt and no {METRICS_FILE} rows in "
              f"{', '.join(args.runs)}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    caption = protocol_caption(args)
    write_table(rows, out, caption)
    plot(rows, out / "curves.png", caption)
    print(f"wrote {out / 'curves.csv'}, {out / 'curves.md'} and {out / 'curves.png'} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
