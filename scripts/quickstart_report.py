"""What the quickstart reports at the end: the results table and its caption, results.json and results.txt, and the
list of where each output is."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS_FILE = "results.txt"  # the table, with its caption and verdicts
SHARED_NOISE_NOTE = (
    "Both arms, and every SiT seed, are sampled with the same generate.py seed: sample i has the same class, initial "
    "noise and SDE noise in every run, so the paired differences are not sampling noise. Scores from {samples} samples "
    "per point; shaded (left): min-max over the {seeds} SiT seeds, faint lines: single seeds.")


def model_description(args: argparse.Namespace) -> str:
    """What the quickstart trains, said plainly: SiT-S/2's layout shrunk, not SiT-S/2 itself."""
    return (f"a SiT with SiT-S/2's layout (patch 2) shrunk to {args.depth} blocks of width {args.hidden_size} with "
            f"{args.num_heads} heads (SiT-S/2 itself has 12 blocks of width 384 and 6 heads)")


def format_table(rows: list[dict]) -> str:
    header = f"{'':<24}{'class accuracy':>15}{'FD (CNN feat.)':>16}{'denoise loss':>14}{'align loss':>12}"
    lines = [header, "-" * len(header)]
    def cell(row: dict, key: str, width: int, fmt: str) -> str:
        value = row.get(key)
        return f"{'-' if value is None else format(value, fmt):>{width}}"

    for r in rows:
        lines.append(f"{r['name']:<24}{cell(r, 'accuracy', 15, '.3f')}{cell(r, 'fd', 16, '.2f')}"
                     f"{cell(r, 'loss', 14, '.4f')}{cell(r, 'vae_repa_loss', 12, '.4f')}")
    return "\n".join(lines)


def table_caption(args: argparse.Namespace, num_real: int, num_seeds: int) -> str:
    """What each column of the results table is and which direction is better."""
    return (
        f"Results: {model_description(args)}, {args.train_steps} steps, "
        f"{num_seeds} SiT seed{'s' if num_seeds > 1 else ''} per arm ({'paired: ' if num_seeds > 1 else ''}VAE, "
        f"latents, classifier and sampling noise shared). class accuracy: fraction of the {args.num_samples} samples "
        f"per run that the digit classifier assigns to the requested class (higher is better; the 'real (held out)' "
        f"row is the classifier's own accuracy, the ceiling; chance is 1 / classes). FD: Frechet distance between "
        f"the classifier's features of the samples and of {num_real} held-out real images (lower is better). denoise "
        f"loss / align loss: mean of the last 10% of logged training losses (velocity MSE; VAE-REPA's smooth-L1 "
        f"term): lower fits the training data better, but they are not sample quality.")


def write_results(out: Path, results: dict, table: str) -> str:
    """results.json (`results`, which holds the caption and the paired summaries) and RESULTS_FILE (caption, table,
    one sentence per metric); returns the sentences."""
    (out / "results.json").write_text(json.dumps(results, indent=2))
    verdict = "\n".join(p["sentence"] for p in results["paired"])
    (out / RESULTS_FILE).write_text(f"{results['caption']}\n\n{table}\n\n{verdict}\n")
    return verdict


def print_outputs(where: list[tuple[str, Path]], total_seconds: float) -> None:
    """The closing list: what each output is and where it is."""
    print(f"\nOutputs (total {total_seconds / 60:.1f} min):")
    width = max(len(what) for what, _ in where)
    for what, path in where:
        print(f"  {what:<{width}}  {path}")
