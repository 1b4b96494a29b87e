"""Training objective: exact-velocity model, alignment formulas, gradient routing, ablation switches."""

import math

import pytest
import torch

from alignment.vae_repa import VaeRepa
from loss import LossConfig, alignment_loss, interpolant, sample_time, training_loss
from models import build_model, patchify


def tiny(**kw):
    cfg = dict(input_size=8, depth=4, hidden_size=32, num_heads=4, num_classes=10, encoder_depth=2)
    cfg.update(kw)
    return build_model("SiT-S/2", **cfg)


class ExactVelocity(torch.nn.Module):
    """Knows the batch's clean data and noise, so returns the true velocity of the path."""

    def __init__(self, x, noise, path_type):
        super().__init__()
        self.x, self.noise, self.path_type = x, noise, path_type

    def forward(self, x_t, t, y, return_heads=None):
        _, _, d_alpha, d_sigma = (a.view(-1, 1, 1, 1) for a in interpolant(t, self.path_type))
        return d_alpha * self.x + d_sigma * self.noise, {}


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_exact_velocity_has_zero_denoising_loss(path_type):
    x = torch.randn(6, 4, 8, 8)
    gen = torch.Generator().manual_seed(3)
    sample_time(6, "uniform", path_type, "cpu", gen)  # advance as training_loss does, to get its noise
    noise = torch.randn(x.shape, generator=gen)
    model = ExactVelocity(x, noise, path_type)
    cfg = LossConfig(path_type=path_type)
    out = training_loss(model, x, torch.zeros(6, dtype=torch.long), cfg, 10, generator=torch.Generator().manual_seed(3))
    assert out["denoise"].item() == pytest.approx(0.0, abs=1e-10)
    # A wrong velocity (zero) costs the mean squared velocity.
    out0 = training_loss(lambda *a, **k: (torch.zeros_like(x), {}), x, torch.zeros(6, dtype=torch.long), cfg, 10,
                         generator=torch.Generator().manual_seed(3))
    assert out0["denoise"] > 0.1


def test_interpolant_derivatives_and_endpoints():
    t = torch.linspace(0.01, 0.99, 7, dtype=torch.float64, requires_grad=True)
    for path in ("linear", "cosine"):
        alpha, sigma, d_alpha, d_sigma = interpolant(t, path)
        ga = torch.autograd.grad(alpha.sum(), t, retain_graph=True)[0]
        gs = torch.autograd.grad(sigma.sum(), t)[0]
        torch.testing.assert_close(ga, d_alpha.detach() * torch.ones_like(t))
        torch.testing.assert_close(gs, d_sigma.detach() * torch.ones_like(t))
        ends = interpolant(torch.tensor([0.0, 1.0]), path)
        torch.testing.assert_close(ends[0], torch.tensor([1.0, 0.0]), atol=1e-7, rtol=0)  # t=0 data
        torch.testing.assert_close(ends[1], torch.tensor([0.0, 1.0]), atol=1e-7, rtol=0)  # t=1 noise


def test_smooth_l1_equals_the_formula():
    beta = 0.05
    pred = torch.tensor([[[0.0, 0.02, -0.03, 0.5], [1.0, -0.2, 0.049, 0.051]]])
    target = torch.zeros_like(pred)
    expected = []
    for d in pred.flatten().tolist():
        expected.append(0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta)
    value = alignment_loss(pred, target, "smooth_l1", beta)
    assert value.shape == (1,)
    assert value.item() == pytest.approx(sum(expected) / len(expected), rel=1e-6)


def test_other_objectives_equal_their_formulas():
    pred = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    target = torch.tensor([[[0.0, 4.0], [0.0, 2.0]]])
    assert alignment_loss(pred, target, "l1").item() == pytest.approx((3 + 0 + 1 + 2) / 4)
    assert alignment_loss(pred, target, "l2").item() == pytest.approx((9 + 0 + 1 + 4) / 4)
    cos0 = 16 / (5 * 4)  # cos between (3, 4) and (0, 4)
    assert alignment_loss(pred, target, "cosine").item() == pytest.approx(((1 - cos0) + (1 - 0)) / 2)


def test_alignment_loss_is_fp32_under_autocast():
    pred = torch.randn(2, 4, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = alignment_loss(pred, torch.zeros(2, 4, 16), "smooth_l1")
    assert value.dtype == torch.float32
    ref = alignment_loss(pred.float(), torch.zeros(2, 4, 16), "smooth_l1")
    torch.testing.assert_close(value, ref)


def test_alignment_is_vectorised_over_the_batch():
    pred, target = torch.randn(5, 16, 16), torch.randn(5, 16, 16)
    batched = alignment_loss(pred, target)
    for i in range(5):
        torch.testing.assert_close(batched[i], alignment_loss(pred[i:i + 1], target[i:i + 1])[0])


def test_alignment_target_is_the_patchified_clean_latent():
    # With a head that outputs exactly patchify(target), the alignment loss is zero.
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(4, 4, 8, 8)
    mean = torch.randn(4, 4, 8, 8)
    for target_kind, clean in (("latent", x), ("mean", mean)):
        method = [VaeRepa(2, target=target_kind)]
        model.vae_projector.forward = lambda h, clean=clean: patchify(clean, 2)
        out = training_loss(model, x, torch.arange(4), LossConfig(), 10, method, posterior_mean=mean)
        assert out["vae_repa_loss"].item() == pytest.approx(0.0, abs=1e-12)
        wrong = mean if target_kind == "latent" else x
        model.vae_projector.forward = lambda h, wrong=wrong: patchify(wrong, 2)
        out = training_loss(model, x, torch.arange(4), LossConfig(), 10, method, posterior_mean=mean)
        assert out["vae_repa_loss"].item() > 0.1


def test_total_is_denoise_plus_lambda_align():
    model = tiny()
    x = torch.randn(4, 4, 8, 8)
    out = training_loss(model, x, torch.arange(4), LossConfig(), 10, [VaeRepa(2, coeff=0.5)],
                        generator=torch.Generator().manual_seed(1))
    assert out["total"].item() == pytest.approx(out["denoise"].item() + 0.5 * out["vae_repa_loss"].item(), rel=1e-6)


def test_alignment_gradient_reaches_head_and_early_blocks_only():
    model = tiny(depth=4, encoder_depth=2)
    # Give later blocks and the output layer non-zero weights so that their gradients would show.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.zero_grad()
    x = torch.randn(4, 4, 8, 8)
    # Backpropagate the alignment term alone: training_loss with a zero-weight velocity term is not
    # available, so rebuild the term from its parts.
    t = torch.rand(4)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * torch.randn_like(x)
    _, heads = model(x_t, t, torch.arange(4), return_heads=True)
    alignment_loss(heads["vae"], patchify(x, 2)).mean().backward()
    for name, p in model.named_parameters():
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        if name.startswith(("vae_projector", "blocks.0.", "blocks.1.", "x_embedder", "t_embedder", "y_embedder")):
            assert has_grad, name
        elif name.startswith(("blocks.2.", "blocks.3.", "final_layer")):
            assert not has_grad, name


def test_vanilla_does_not_run_the_head():
    model = tiny()
    calls = []
    model.vae_projector.register_forward_hook(lambda *a: calls.append(1))
    out = training_loss(model, torch.randn(2, 4, 8, 8), torch.arange(2), LossConfig(), 10)
    assert not calls and set(out) == {"total", "denoise"}
    training_loss(model, torch.randn(2, 4, 8, 8), torch.arange(2), LossConfig(), 10, [VaeRepa(2)])
    assert calls == [1]


def test_alignment_time_range_masks_samples():
    model = tiny()
    x = torch.randn(64, 4, 8, 8)
    y = torch.zeros(64, dtype=torch.long)
    # Reproduce training_loss's draws (cfg_prob=0 draws nothing for labels): t, then the noise.
    gen = torch.Generator().manual_seed(0)
    t = sample_time(64, generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    per_sample = alignment_loss(model(x_t, t, y, return_heads=True)[1]["vae"], patchify(x, 2))
    for low, high in ((0.0, 1.0), (0.0, 0.5), (0.5, 1.0)):
        out = training_loss(model, x, y, LossConfig(cfg_prob=0), 10, [VaeRepa(2, t_range=(low, high))],
                            generator=torch.Generator().manual_seed(0))
        inside = ((t >= low) & (t <= high)).float()
        assert 0 < inside.sum()
        assert out["vae_repa_loss"].item() == pytest.approx((per_sample * inside).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="time range"):
        VaeRepa(2, t_range=(0.6, 0.5))


def test_uniform_time_sampling():
    n = 50000
    u = sample_time(n, "uniform", generator=torch.Generator().manual_seed(0))
    assert u.min() >= 0 and u.max() <= 1 and abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("weighting, mean, std", [("lognormal", 0.0, 1.0), ("lognormal-edm", -1.2, 1.2)])
def test_lognormal_time_quantiles(path, weighting, mean, std):
    """REPA's `lognormal`: sigma = exp(N(0, 1)), t = sigma / (1 + sigma) (linear) or 2/pi atan(sigma) (cosine);
    EDM's: log sigma ~ N(-1.2, 1.2^2). Empirical quantiles of t against those of the formula."""
    n = 200_000
    t = sample_time(n, weighting, path, generator=torch.Generator().manual_seed(0)).double()
    probs = torch.tensor([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99], dtype=torch.float64)
    sigma = torch.exp(mean + std * torch.distributions.Normal(0.0, 1.0).icdf(probs).double())
    expected = sigma / (1 + sigma) if path == "linear" else 2 / math.pi * torch.atan(sigma)
    # t is a monotone function of a normal draw, so its quantiles are the formula applied to the normal's
    assert torch.allclose(torch.quantile(t, probs), expected, atol=4e-3)


def test_logit_normal_time_quantiles():
    """LightningDiT's use_lognorm: t = sigmoid(n), n ~ N(0, 1); the same law on either path."""
    n = 200_000
    probs = torch.tensor([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99], dtype=torch.float64)
    expected = 1 / (1 + torch.exp(-torch.distributions.Normal(0.0, 1.0).icdf(probs).double()))
    for path in ("linear", "cosine"):
        t = sample_time(n, "logit-normal", path, generator=torch.Generator().manual_seed(1)).double()
        assert torch.allclose(torch.quantile(t, probs), expected, atol=4e-3)


def test_cosine_velocity_term_equals_its_formula():
    """cos_loss = mean over batch and positions of 1 - <v_pred, v> / (|v_pred| |v|), the norms over channels."""
    x = torch.randn(3, 4, 5, 5)
    pred = torch.randn(3, 4, 5, 5)
    y = torch.zeros(3, dtype=torch.long)
    cfg = LossConfig(cos_coeff=0.5)
    out = training_loss(lambda *a, **k: (pred, {}), x, y, cfg, 10, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    t = sample_time(3, "uniform", "linear", "cpu", gen)
    noise = torch.randn(x.shape, generator=gen)
    v = noise - x  # the linear path's velocity
    dot, norms = (pred * v).sum(1), pred.norm(dim=1) * v.norm(dim=1)
    cos = (1 - dot / norms).mean()
    mse = ((pred - v) ** 2).mean()
    assert t.shape == (3,)
    assert out["cos_loss"].item() == pytest.approx(cos.item(), rel=1e-5)
    assert out["total"].item() == pytest.approx(mse.item() + 0.5 * cos.item(), rel=1e-5)
    assert LossConfig(cos_coeff=0.5).terms() == ["total", "denoise", "cos_loss"]
    assert "cos_loss" not in training_loss(lambda *a, **k: (pred, {}), x, y, LossConfig(), 10)
    with pytest.raises(ValueError, match="cos_coeff"):
        LossConfig(cos_coeff=-1.0)


def test_config_rejects_unknown_choices():
    for bad in (dict(path_type="vp"), dict(weighting="edm"), dict(weighting="lognormal_edm"), dict(cfg_prob=1.0)):
        with pytest.raises(ValueError):
            LossConfig(**bad)
    for bad in (dict(objective="kl"), dict(target="x"), dict(head_layers=0)):
        with pytest.raises(ValueError):
            VaeRepa(2, **bad)


def test_alignment_on_without_head_is_an_error():
    model = tiny(vae_head_layers=0)
    with pytest.raises(RuntimeError, match="no vae-repa head"):
        training_loss(model, torch.randn(2, 4, 8, 8), torch.arange(2), LossConfig(), 10, [VaeRepa(2)])
