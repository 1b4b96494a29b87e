"""How the quickstart scores: a small digit classifier (class accuracy of the samples, and the feature space of the
Frechet distance), the Frechet distance, and the statistics over training seeds and logged losses."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from quickstart_images import to_tensor
from tqdm.auto import tqdm


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


def final_mean(values: np.ndarray, fraction: float = 0.1) -> float:
    """Mean of the last `fraction` of the logged values (at least one): a less noisy 'final loss'."""
    k = max(1, math.ceil(fraction * len(values)))
    return float(np.mean(values[-k:]))


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
