"""The quickstart's pictures: image grids (one row per class), PNGs side by side, the loss curves of the training
runs, and the metric curves over training steps and seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_class_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int, path: Path,
                    title: str | None = None) -> None:
    """A PNG with one row per class (the first `per_class` images of that class, left to right)."""
    from PIL import Image, ImageDraw

    h, w = images.shape[1:3]
    pad, margin = 2, 16 if title else 0
    grid = np.full((margin + num_classes * (h + pad) + pad, per_class * (w + pad) + pad, 3), 255, np.uint8)
    for c in range(num_classes):
        for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            top, left = margin + pad + c * (h + pad), pad + j * (w + pad)
            grid[top:top + h, left:left + w] = images[i]
    image = Image.fromarray(grid)
    if title:
        ImageDraw.Draw(image).text((pad, 2), title, fill=(0, 0, 0))
    image.save(path)


def side_by_side(paths: list[Path], dest: Path, gap: int = 12) -> None:
    """Paste PNGs left to right on a white background (the README's one-picture comparison)."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images)),
                       "white")
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width + gap
    canvas.save(dest)


def plot_loss_curves(curves: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """Denoising loss vs step of each run (left) and the VAE-REPA alignment loss (right), one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, (name, log) in enumerate(curves.items()):  # one colour per run in both panels
        left.plot(log["step"], log["loss"], label=name, color=f"C{k}", marker="." if len(log["step"]) < 30 else None)
        if np.any(log.get("vae_repa_loss", np.zeros(1)) > 0):
            right.plot(log["step"], log["vae_repa_loss"], label=name, color=f"C{k}")
    left.set(xlabel="training step", ylabel="denoising (velocity) loss (log scale)", title="denoising loss",
             yscale="log")
    # plain numbers on the log axis (matplotlib would label a range inside one decade "6 x 10^-1" or not at all)
    left.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    left.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    right.set(xlabel="training step", ylabel="smooth-L1 alignment loss", title="VAE-REPA alignment loss")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_metric_curves(points: dict[str, dict[int, dict[int, dict]]], path: Path, note: str) -> None:
    """points[arm][seed][step] = {"accuracy", "fd"}: per metric, each arm's mean over seeds with its min-max band and
    the seeds as faint lines (left), and the paired difference VAE-REPA - vanilla, mean ± std (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("accuracy", "class accuracy (higher is better)"),
               ("fd", "Fréchet distance, CNN features (lower is better)"))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
    arms = list(points)
    seeds = sorted(set.intersection(*(set(points[a]) for a in arms)))
    for i, (key, label) in enumerate(metrics):
        left, right = axes[i]
        for k, arm in enumerate(arms):
            steps = sorted(set.intersection(*(set(points[arm][s]) for s in seeds)))
            values = np.array([[points[arm][s][t][key] for t in steps] for s in seeds])
            colour = f"C{k}"
            for row in values:
                left.plot(steps, row, color=colour, alpha=0.25, lw=0.8)
            left.plot(steps, values.mean(0), color=colour, marker="o", label=f"{arm} (mean of {len(seeds)} seeds)")
            left.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.15)
        steps = sorted(set.intersection(*(set(points[a][s]) for a in arms for s in seeds)))
        diff = np.array([[points[arms[0]][s][t][key] - points[arms[1]][s][t][key] for t in steps] for s in seeds])
        spread = diff.std(0, ddof=1) if len(seeds) > 1 else np.zeros(len(steps))
        right.axhline(0, color="grey", lw=0.8)
        right.plot(steps, diff.mean(0), color="k", marker="o", label="mean paired difference")
        right.fill_between(steps, diff.mean(0) - spread, diff.mean(0) + spread, color="k", alpha=0.15,
                           label="± std over seeds")
        left.set(xlabel="training step", ylabel=label)
        right.set(xlabel="training step", ylabel=f"{arms[0]} − {arms[1]}", title=f"paired difference, {key}")
        for ax in (left, right):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.text(0.5, 0.01, note, ha="center", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
