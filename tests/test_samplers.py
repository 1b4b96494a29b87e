"""Samplers against a closed form: Gaussian data has an exact velocity field under both paths."""

import copy
import math

import pytest
import torch
from helpers_generate import randomize

from loss import interpolant
from samplers import (
    euler_maruyama_sampler,
    euler_sampler,
    matmul_weights_copy,
    sampling_model,
    score_from_velocity,
)

MU, S = 0.7, 0.5  # data x ~ N(MU, S^2) in every coordinate


class GaussianVelocity:
    """Exact E[v | x_t] for x ~ N(MU, S^2), eps ~ N(0, 1), x_t = alpha x + sigma eps (float64)."""

    num_classes = 10

    def __init__(self, path_type="linear"):
        self.path_type = path_type
        self.batch_sizes = []
        self.times = []

    def __call__(self, x_t, t, y):
        self.batch_sizes.append(x_t.shape[0])
        self.times.append(float(t[0]))
        x_t, t = x_t.double(), t.double().view(-1, 1, 1, 1)
        alpha, sigma, d_alpha, d_sigma = interpolant(t, self.path_type)
        var = alpha**2 * S**2 + sigma**2
        resid = x_t - alpha * MU
        e_x = MU + alpha * S**2 / var * resid
        e_eps = sigma / var * resid
        return (d_alpha * e_x + d_sigma * e_eps).to(x_t.dtype), {}


N = 40000  # scalar samples; tolerance below is derived from it
MEAN_TOL = 5 * S / math.sqrt(N)  # 5 standard errors of the mean
STD_TOL = 5 * S / math.sqrt(2 * N)  # 5 standard errors of the standard deviation


def noise(seed=0):
    return torch.randn(N // 4, 4, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
@pytest.mark.parametrize("heun, steps", [(False, 100), (True, 20)])
def test_ode_maps_noise_to_the_data_distribution(path_type, heun, steps):
    model = GaussianVelocity(path_type)
    y = torch.zeros(N // 4, dtype=torch.long)
    x = euler_sampler(model, noise(), y, num_steps=steps, heun=heun, path_type=path_type)
    assert x.dtype == torch.float64
    assert abs(x.mean().item() - MU) < MEAN_TOL
    assert abs(x.std().item() - S) < STD_TOL
    assert len(model.batch_sizes) == (2 * steps - 1 if heun else steps)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_sde_maps_noise_to_the_data_distribution(path_type):
    model = GaussianVelocity(path_type)
    y = torch.zeros(N // 4, dtype=torch.long)
    x = euler_maruyama_sampler(model, noise(), y, num_steps=250, path_type=path_type,
                               generator=torch.Generator().manual_seed(1))
    assert abs(x.mean().item() - MU) < MEAN_TOL
    assert abs(x.std().item() - S) < STD_TOL
    # REPA's grid: 250 points from 1 to 0.04, then a deterministic step to 0 from the last one.
    assert len(model.times) == 250
    assert model.times[0] == 1.0 and model.times[-1] == pytest.approx(0.04)


def test_sde_is_reproducible_with_a_generator_and_stochastic_otherwise():
    model = GaussianVelocity()
    z, y = noise()[:64], torch.zeros(64, dtype=torch.long)
    a = euler_maruyama_sampler(model, z, y, 20, generator=torch.Generator().manual_seed(5))
    b = euler_maruyama_sampler(model, z, y, 20, generator=torch.Generator().manual_seed(5))
    c = euler_maruyama_sampler(model, z, y, 20, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_score_from_velocity_matches_gaussian_score():
    for path in ("linear", "cosine"):
        model = GaussianVelocity(path)
        t = torch.full((5,), 0.3, dtype=torch.float64)
        x = torch.randn(5, 4, 1, 1, dtype=torch.float64)
        alpha, sigma, _, _ = interpolant(t.view(-1, 1, 1, 1), path)
        exact = -(x - alpha * MU) / (alpha**2 * S**2 + sigma**2)  # marginal x_t ~ N(alpha MU, var)
        torch.testing.assert_close(score_from_velocity(model(x, t, None)[0], x, t, path), exact)


class LabelVelocity:
    """Velocity = label value, so guidance arithmetic is visible; records batch sizes and times."""

    num_classes = 10

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((float(t[0]), x.shape[0], y.tolist()))
        return y.to(x.dtype).view(-1, 1, 1, 1).expand_as(x).clone(), {}


@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
def test_guidance_doubles_the_batch_only_inside_the_interval(sampler):
    model = LabelVelocity()
    y = torch.tensor([2, 3])
    sampler(model, torch.zeros(2, 4, 1, 1), y, num_steps=10, cfg_scale=1.5, guidance_low=0.2, guidance_high=0.7)
    for t, batch, labels in model.calls:
        inside = 0.2 <= t <= 0.7
        assert batch == (4 if inside else 2), t
        if inside:
            assert labels == [2, 3, 10, 10]  # the null class comes from the model (num_classes)
    assert any(b == 4 for _, b, _ in model.calls) and any(b == 2 for _, b, _ in model.calls)


def test_guided_velocity_is_uncond_plus_scale_times_difference():
    model = LabelVelocity()
    y = torch.tensor([2, 3])
    # One Euler step from t=1 to 0 with guidance everywhere: x = 0 - (uncond + s (cond - uncond)).
    x = euler_sampler(model, torch.zeros(2, 1, 1, 1), y, num_steps=1, cfg_scale=4.0)
    expected = -(10 + 4.0 * (y.double() - 10))
    torch.testing.assert_close(x.flatten(), expected)
    # No guidance: x = -cond.
    x = euler_sampler(model, torch.zeros(2, 1, 1, 1), y, num_steps=1, cfg_scale=1.0)
    torch.testing.assert_close(x.flatten(), -y.double())


def test_explicit_null_class_and_unwrapping():
    model = LabelVelocity()
    euler_sampler(model, torch.zeros(1, 1, 1, 1), torch.tensor([1]), 1, cfg_scale=2.0, null_class=7)
    assert model.calls[0][2] == [1, 7]

    class Wrapper:  # DDP-like wrapper exposing the model as .module
        def __init__(self, module):
            self.module = module

        def __call__(self, *a, **k):
            return self.module(*a, **k)

    euler_sampler(Wrapper(model), torch.zeros(1, 1, 1, 1), torch.tensor([1]), 1, cfg_scale=2.0)
    assert model.calls[-1][2] == [1, 10]


def test_heun_corrector_keeps_the_guidance_decision_of_t_cur():
    model = LabelVelocity()
    euler_sampler(model, torch.zeros(1, 1, 1, 1), torch.tensor([1]), num_steps=4, heun=True, cfg_scale=2.0,
                  guidance_low=0.0, guidance_high=0.8)
    # grid 1, .75, .5, .25, 0: step 1 (t_cur = 1) is unguided, its corrector at t=.75 is unguided too.
    assert [(t, b) for t, b, _ in model.calls[:2]] == [(1.0, 1), (0.75, 1)]
    assert [(t, b) for t, b, _ in model.calls[2:4]] == [(0.75, 2), (0.5, 2)]


def test_time_shift_grid_is_lightningdits_in_our_time_and_still_samples_the_data():
    """LightningDiT's grid: s uniform in [0, 1] (s = 1 data), shifted s' = a s / (1 + (a - 1) s); ours runs t = 1 - s'
    from noise to data. --time-shift 1/a gives the same times, and the ODE still reaches N(MU, S^2)."""
    a, steps = 0.3, 50
    s = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    theirs = 1 - a * s / (1 + (a - 1) * s)
    model = GaussianVelocity("linear")
    y = torch.zeros(N // 4, dtype=torch.long)
    x = euler_sampler(model, noise(), y, num_steps=steps, time_shift=1 / a)
    assert torch.allclose(torch.tensor(model.times, dtype=torch.float64), theirs[:-1], atol=1e-6)
    assert model.times[1] > 1 - 1 / steps  # more of the grid near the noise than the uniform grid
    assert abs(x.mean().item() - MU) < MEAN_TOL
    # the shifted grid is coarse near the data, where Euler's error in the spread is largest; Heun removes it
    x = euler_sampler(GaussianVelocity("linear"), noise(), y, num_steps=steps, heun=True, time_shift=1 / a)
    assert abs(x.mean().item() - MU) < MEAN_TOL and abs(x.std().item() - S) < STD_TOL


class Bf16GaussianVelocity(GaussianVelocity):
    """The closed form seen through a bf16 network: its input and its output rounded to bf16 (what bf16 weights and
    activations do at a model's boundary); the time is taken as the sampler passes it."""

    def __call__(self, x_t, t, y):
        self.dtypes = [*getattr(self, "dtypes", []), (x_t.dtype, t.dtype)]
        v, _ = super().__call__(x_t.to(torch.bfloat16).double(), t, y)
        return v.to(torch.bfloat16), {}


@pytest.mark.parametrize("sampler", ["sde", "ode"])
def test_bf16_model_rounding_does_not_accumulate_over_the_steps(sampler):
    """The sampler's share of bf16 error: with float32 latents (generate.py's) and a model whose input and output are
    rounded to bf16 (the rounding inside a bf16 network is the model's own, bounded against fp32 by the forward tests
    of test_generate.py, test_gpu.py and benchmark_sample.py), each sample ends within one bf16 unit of roundoff
    (2^-9) of the largest sample of the float64 run with the same noise, after 250 SDE / 100 ODE steps: the
    integration does not accumulate the rounding, and the samples keep the data's distribution. The times reach the
    model in float32: in bf16 neighbouring grid times would merge."""
    y = torch.zeros(N // 4, dtype=torch.long)
    z = noise().float()
    runs = []
    for model, latents in ((GaussianVelocity(), z.double()), (Bf16GaussianVelocity(), z)):
        if sampler == "sde":
            x = euler_maruyama_sampler(model, latents, y, num_steps=250, generator=torch.Generator().manual_seed(1))
        else:
            x = euler_sampler(model, latents, y, num_steps=100)
        runs.append(x)
    exact, rounded = runs
    error = (exact - rounded).abs()
    assert 0 < error.max() < 2**-9 * exact.abs().max()
    assert abs(rounded.mean().item() - MU) < MEAN_TOL and abs(rounded.std().item() - S) < STD_TOL
    assert set(model.dtypes) == {(torch.float32, torch.float32)}
    assert len(set(model.times)) == len(model.times)


@pytest.mark.parametrize("name, kwargs", [
    ("SiT-S/2", dict(depth=2, hidden_size=32, num_heads=4, input_size=8, qk_norm=True, vae_head_layers=0)),
    ("LightningDiT-B/1", dict(depth=2, hidden_size=32, num_heads=4, input_size=4, in_channels=8, qk_norm=True)),
])
def test_bf16_matmul_weights_give_the_outputs_of_fp32_weights_under_autocast(name, kwargs):
    """samplers.sampling_model stores Linear / Conv weights in bf16 once; under bf16 autocast (which rounds them at
    every call) no output bit may change: one forward, then a guided SDE run through the sampler."""
    from models import build_model

    torch.manual_seed(0)
    fp32 = randomize(build_model(name, num_classes=10, **kwargs), seed=0, std=0.05).eval()
    fast = sampling_model(copy.deepcopy(fp32), "bf16")
    cast = {n for n, p in fast.named_parameters() if p.dtype == torch.bfloat16}
    assert cast and all(n.endswith(("weight", "bias")) for n in cast)
    assert all(p.dtype == torch.float32 for n, p in fast.named_parameters() if "norm" in n or "embedding" in n)
    c, side = fp32.in_channels, kwargs["input_size"]
    x, t, y = torch.randn(6, c, side, side), torch.rand(6), torch.randint(0, 10, (6,))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fp32(x, t, y=y)[0], fast(x, t, y=y)[0])
        outs = [euler_maruyama_sampler(m, x, y, num_steps=6, cfg_scale=1.8, guidance_high=0.7,
                                       generator=torch.Generator().manual_seed(3)) for m in (fp32, fast)]
    assert torch.equal(*outs)
    with torch.inference_mode():  # fp32 precision leaves the model as it is
        assert all(p.dtype == torch.float32 for p in sampling_model(copy.deepcopy(fp32), "fp32").parameters())
    # training's evaluation copies the EMA straight to bf16 matmul weights: the same tensors as deepcopy + cast
    direct, fp32_state = matmul_weights_copy(fp32).state_dict(), fp32.state_dict()
    assert all(p.dtype == torch.float32 for p in fp32.parameters())  # the original is left as it was
    for key, value in fast.state_dict().items():
        assert direct[key].dtype == value.dtype and torch.equal(direct[key], value), key
        assert direct[key].data_ptr() != fp32_state[key].data_ptr(), key  # a copy, sharing nothing


class ChannelVelocity:
    """Velocity of channel c = label * (c + 1) + x_c / 2: the conditional and unconditional outputs are known tensors,
    and each channel depends on its own channel of x only."""

    num_classes = 10

    def __call__(self, x, t, y):
        scale = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1, 1)
        return y.to(x.dtype).view(-1, 1, 1, 1) * scale + x / 2, {}


def test_guiding_the_first_channels_leaves_the_others_conditional():
    """LightningDiT's forward_with_cfg: channels < N get uncond + s (cond - uncond), the others the conditional output;
    outside the guidance interval every channel is conditional."""
    y, s, null = torch.tensor([2, 3]), 4.0, 10
    c = torch.arange(1, 6, dtype=torch.float64).view(1, 5, 1, 1)
    cond, uncond = y.double().view(-1, 1, 1, 1) * c, null * c
    # one Euler step from t = 1 to 0 from x = 0: x = -v(0, 1)
    x = euler_sampler(ChannelVelocity(), torch.zeros(2, 5, 1, 1), y, num_steps=1, cfg_scale=s, cfg_channels=3)
    expected = -torch.cat([uncond[:, :3] + s * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    # two steps, guidance only for t <= 0.7: the step at t = 1 is conditional, the one at t = 0.5 guided on 3
    x = euler_sampler(ChannelVelocity(), torch.zeros(2, 5, 1, 1), y, num_steps=2, cfg_scale=s, guidance_high=0.7,
                      cfg_channels=3)
    x_half = -0.5 * cond  # after the first step; v at t = 0.5 adds x_half / 2 on every channel
    v_half = torch.cat([uncond[:, :3] + s * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1) + x_half / 2
    torch.testing.assert_close(x, x_half - 0.5 * v_half, rtol=0, atol=1e-12)


def test_guided_channels_follow_the_guided_run_and_the_others_the_unguided_run_in_the_sde():
    """With a model whose channels are independent, guiding channels 0-1 gives channels 0-1 of the run that guides all
    and channels 2-3 of the run without guidance (same noise: one generator per sample, same seeds)."""
    z, y = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 4])

    def run(**kw):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return euler_maruyama_sampler(ChannelVelocity(), z, y, num_steps=6, guidance_high=0.8, generator=gens, **kw)

    two = run(cfg_scale=3.0, cfg_channels=2)
    torch.testing.assert_close(two[:, :2], run(cfg_scale=3.0)[:, :2], rtol=0, atol=0)
    torch.testing.assert_close(two[:, 2:], run(cfg_scale=1.0)[:, 2:], rtol=0, atol=0)


@pytest.mark.parametrize("shift, heun", [(1.0, False), (1 / 0.3, False), (1.0, True)])
def test_all_channels_is_the_guided_euler_ode_bit_for_bit(shift, heun):
    """cfg_channels None (--cfg-channels all), absent, or the model's channel count: the samples of REPA's formula,
    v = uncond + s (cond - uncond) in float64 on every channel, integrated by hand here, to the last bit."""
    from samplers import shift_times

    model, s = ChannelVelocity(), 1.8
    z = torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 5, 9])

    def v(x, t, guided):
        cond, uncond = model(x, None, y)[0], model(x, None, torch.full_like(y, 10))[0]
        return uncond + s * (cond - uncond) if guided else cond

    grid = shift_times(torch.linspace(1, 0, 6, dtype=torch.float64), shift).tolist()
    x = z
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        guided = 0.1 <= t <= 0.9
        d = v(x, t, guided)
        x_next = x + (t_next - t) * d
        if heun and i < len(grid) - 2:
            x_next = x + (t_next - t) * 0.5 * (d + v(x_next, t_next, guided))
        x = x_next
    kw = dict(num_steps=5, heun=heun, cfg_scale=s, guidance_low=0.1, guidance_high=0.9, time_shift=shift)
    for channels in ({}, {"cfg_channels": None}, {"cfg_channels": 4}):
        assert torch.equal(euler_sampler(model, z, y, **kw, **channels), x), channels
