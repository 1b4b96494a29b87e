"""What storing one posterior sample per image (LightningDiT's way, preprocessing.encode --posterior sample) changes
against storing the posterior's mean and std in fp16 and drawing a new sample each epoch (ours, the default).

    python scripts/measure_posterior_storage.py --images 8 --out posterior_storage.json

Encodes smooth random images with a VA-VAE-sized tokenizer (VA-VAE f16d32's architecture; random weights unless
--vae names a file, e.g. vavae-imagenet256-f16d32-dinov2.pt) through preprocessing.encode's own encode_batch, and
reports: the fp16 rounding of the stored mean and std; the share of the latents' variance that the posterior noise
makes (what a fresh draw per epoch adds and a stored sample fixes); how far an epoch's sample lies from the stored
one; and the channel-wise statistics of the two ways. With random weights the posterior std is the untrained
network's, so only the fp16 figures carry over to the released VA-VAE.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402


def smooth_images(n: int, resolution: int, seed: int) -> np.ndarray:
    """uint8 (n, R, R, 3): random 8 x 8 colour fields, bicubically upsampled (natural images are smooth too)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(resolution, resolution), mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def relative_rms(error: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sqrt(np.mean(error.astype(np.float64) ** 2) / np.mean(reference.astype(np.float64) ** 2)))


def measure(mean: np.ndarray, std: np.ndarray, seed: int) -> dict:
    """The figures of the docstring from float32 posterior moments (N, C, H, W)."""
    rng = np.random.default_rng(seed)
    mean16, std16 = mean.astype(np.float16).astype(np.float32), std.astype(np.float16).astype(np.float32)
    stored = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)  # LightningDiT: fp32, drawn once
    epoch = mean16 + std16 * rng.standard_normal(mean.shape, dtype=np.float32)  # ours: fp16 moments, a new draw
    axes = (0, 2, 3)
    noise = (std.astype(np.float64) ** 2).mean(axis=axes)
    total = mean.astype(np.float64).var(axis=axes) + noise
    std_ours = np.sqrt(total)  # the manifest's statistics: Var(mean) + E[std^2]
    std_theirs = stored.astype(np.float64).std(axis=axes, ddof=1)  # over the stored samples
    return {
        "fp16_mean_max_abs_error": float(np.abs(mean16 - mean).max()),
        "fp16_mean_relative_rms_error": relative_rms(mean16 - mean, mean),
        "fp16_std_max_abs_error": float(np.abs(std16 - std).max()),
        "fp16_std_relative_rms_error": relative_rms(std16 - std, std),
        "posterior_std_mean": float(std.mean()),
        "noise_share_of_variance_median": float(np.median(noise / total)),
        "noise_share_of_variance_max": float((noise / total).max()),
        "epoch_sample_minus_stored_relative_rms": relative_rms(epoch - stored, stored - stored.mean(axis=axes,
                                                                                                   keepdims=True)),
        "channel_std_relative_difference_max": float(np.abs(std_theirs / std_ours - 1).max()),
    }


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--images", type=int, default=8, help="number of random images to encode")
    p.add_argument("--resolution", type=int, default=256, help="image side (VA-VAE: 256, 16 x 16 latents)")
    p.add_argument("--vae", default=None, help="a tokenizer preprocessing.encode --vae accepts (default: VA-VAE "
                                               "f16d32's architecture with random weights)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images, the random weights and the draws")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if args.images < 2 or args.resolution < 16 or args.resolution % 16:
        p.error("--images must be at least 2 and --resolution a multiple of 16")

    import torch  # after parsing: --help answers at once

    from latent_codecs.autoencoder import load_vae
    from latent_codecs.vavae import build_vavae
    from preprocessing.encode import encode_batch

    torch.manual_seed(args.seed)
    vae = (load_vae(args.vae) if args.vae else build_vavae()).eval().requires_grad_(False)
    images = smooth_images(args.images, args.resolution, args.seed)
    moments = [encode_batch(vae, images[i:i + 4], False, torch.float32) for i in range(0, len(images), 4)]
    mean, std = (np.concatenate([m[k] for m in moments]) for k in (0, 1))
    figures = {"tokenizer": args.vae or "VA-VAE f16d32 architecture, random weights", "images": args.images,
               "latent_shape": list(mean.shape[1:]), **measure(mean, std, args.seed)}
    for key, value in figures.items():
        print(f"{key}: {value}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
