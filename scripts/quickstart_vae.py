"""The quickstart's tiny VAE: a diffusers AutoencoderKL, so every later stage loads it with `--vae PATH` like SD-VAE;
made, trained, and used to encode and reconstruct the images and measure the latents' scale and shift."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from quickstart_images import to_tensor, to_uint8
from quickstart_progress import eta_text
from tqdm.auto import tqdm


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
