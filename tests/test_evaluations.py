"""Tests for evaluations/: Inception features, ADM's metric math, input streaming and the CLI (CPU, random weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from evaluations import check_adm_regression, evaluator, scoring
from evaluations import metrics as evaluator_metrics
from evaluations.data import EvaluationError, NpzImages, open_images
from evaluations.inception import InceptionFeatures, extract_features, write_random_weights
from evaluations.metrics import (
    FIDStatistics,
    compute_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    pairwise_sq_distances,
    precision_recall,
    strict_fp32,
)

REPO = Path(__file__).resolve().parents[1]


def random_images(n: int, seed: int, height: int = 24, width: int = 32, low: int = 0, high: int = 256) -> np.ndarray:
    """(n, height, width, 3) uint8 noise images with values in [low, high)."""
    return np.random.default_rng(seed).integers(low, high, (n, height, width, 3), dtype=np.uint8)


REF_IMAGES = random_images(5, seed=1, low=0, high=150)
SAMPLE_IMAGES = np.concatenate([REF_IMAGES[[4, 1]], random_images(2, seed=2, low=150, high=256)])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_random_weights(tmp_path_factory.mktemp("inception") / "random_inception.pth")


@pytest.fixture(scope="module")
def model(weights) -> InceptionFeatures:
    return InceptionFeatures(weights)


@pytest.fixture(scope="module")
def ref_feats(model):
    return extract_features(model, open_images(REF_IMAGES), batch_size=4, device="cpu", progress=False)


@pytest.fixture(scope="module")
def sample_feats(model):
    return extract_features(model, open_images(SAMPLE_IMAGES), batch_size=4, device="cpu", progress=False)


# ---------------------------------------------------------------- Inception features


def test_feature_shapes_and_spatial_features_are_nhwc_mixed_6d_branch1x1(model):
    images = random_images(2, seed=3, height=20, width=28)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    pool, spatial, logits = model(x)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)

    # Recompute Mixed_6d.branch1x1 by hand: TF1 resize, (x - 128) / 128, the layers up to Mixed_6c, then
    # conv -> batch norm (eval) -> ReLU of that branch.
    net = model.net
    with torch.no_grad():
        h = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        h = (h - 128) / 128
        for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"]:
            h = getattr(net, name)(h)
        branch = net.Mixed_6d.branch1x1
        bn = branch.bn
        act = F.relu(F.batch_norm(F.conv2d(h, branch.conv.weight), bn.running_mean, bn.running_var,
                                  bn.weight, bn.bias, training=False, eps=bn.eps)).numpy()
    assert act.shape == (2, 192, 17, 17)
    expected = np.empty((2, 2023), np.float32)
    for row in range(17):
        for col in range(17):
            for ch in range(7):
                expected[:, (row * 17 + col) * 7 + ch] = act[:, ch, row, col]
    np.testing.assert_allclose(spatial.numpy(), expected, rtol=1e-5, atol=1e-5)

    # IS logits are pool_3 times the softmax weights, without the bias (fc.bias is large in these weights).
    expected_logits = pool.double().numpy() @ net.fc.weight.double().numpy().T
    np.testing.assert_allclose(logits.numpy(), expected_logits, rtol=1e-4, atol=1e-3)


def test_npz_folder_and_array_give_the_same_features(model, tmp_path):
    images = random_images(2, seed=4, height=16, width=24)
    np.savez(tmp_path / "batch.npz", arr_0=images)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    feats = [
        extract_features(model, open_images(source, num_workers=0), batch_size=1, device="cpu", progress=False)
        for source in (images, tmp_path / "batch.npz", folder)
    ]
    for other in feats[1:]:
        for a, b in zip(feats[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- streaming inputs


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_is_streamed_in_batches(tmp_path, save):
    images = random_images(7, seed=5, height=5, width=6)
    save(tmp_path / "b.npz", arr_0=images, labels=np.arange(7))
    source = open_images(tmp_path / "b.npz")
    assert isinstance(source, NpzImages) and source._array is None and len(source) == 7
    batches = list(source.batches(3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)


def test_fortran_ordered_npz_falls_back_to_loading(tmp_path):
    images = np.asfortranarray(random_images(4, seed=6, height=5, width=6))
    np.savez(tmp_path / "f.npz", arr_0=images)
    np.testing.assert_array_equal(np.concatenate(list(open_images(tmp_path / "f.npz").batches(3))), images)


def test_folder_images_are_sorted_rgb_and_must_share_one_size(tmp_path):
    images = random_images(3, seed=8, height=6, width=5)
    for name, image in zip(["b.png", "a.png", "c.png"], images):
        Image.fromarray(image).save(tmp_path / name)
    Image.fromarray(images[0, :, :, 0]).save(tmp_path / "d_gray.png")  # grayscale -> RGB
    (tmp_path / "notes.txt").write_text("not an image")
    got = np.concatenate(list(open_images(tmp_path, num_workers=0).batches(3)))
    gray_as_rgb = np.repeat(images[0, :, :, :1], 3, axis=2)
    np.testing.assert_array_equal(got, np.stack([images[1], images[0], images[2], gray_as_rgb]))
    Image.fromarray(random_images(1, seed=9, height=7, width=5)[0]).save(tmp_path / "e_taller.png")
    with pytest.raises(EvaluationError, match="same size"):
        list(open_images(tmp_path, num_workers=0).batches(8))


# ---------------------------------------------------------------- metric math


def test_strict_fp32_turns_tf32_off_and_restores_the_flags():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with strict_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_statistics_of_hand_made_features():
    features = np.array([[1, 0], [-1, 0], [0, 2], [0, -2]], np.float32)
    mu, sigma = compute_statistics(features)
    np.testing.assert_allclose(mu, [0, 0])
    np.testing.assert_allclose(sigma, [[2 / 3, 0], [0, 8 / 3]])  # sums of squares over N - 1 = 3


def tr_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((S1 S2)^1/2) for symmetric PSD S1, S2 without sqrtm: S1 S2 is similar to the symmetric PSD matrix
    S1^1/2 S2 S1^1/2, whose eigenvalues eigh gives; the trace is the sum of their square roots."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None))))


def random_spd(rng: np.random.Generator, n: int, low: float = 0.2, high: float = 3.0) -> np.ndarray:
    """A symmetric positive definite matrix with eigenvalues in [low, high] (well conditioned: every SciPy gives
    the same square root to ~1e-13)."""
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * rng.uniform(low, high, n)) @ q.T


def test_fid_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    fid = frechet_distance(FIDStatistics(mu1, np.diag(s1)), FIDStatistics(mu2, np.diag(s2)))
    assert fid == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", [1, 2])
def test_fid_matches_eigh_trace_for_full_covariances(seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = random_spd(rng, 8), random_spd(rng, 8)
    assert not np.allclose(s1 @ s2, s2 @ s1)  # not simultaneously diagonalisable: a real test of the sqrt
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt_product(s1, s2)
    fid = frechet_distance(FIDStatistics(mu1, s1), FIDStatistics(mu2, s2))
    assert fid == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert frechet_distance(FIDStatistics(mu1, s1), FIDStatistics(mu1, s1)) == pytest.approx(0, abs=1e-9)


def test_fid_retries_with_eps_on_the_diagonal_when_sqrtm_is_not_finite(monkeypatch):
    # Force what SciPy may or may not do for a singular product (SciPy 1.18 returns inf/NaN where 1.17 did not,
    # and for some matrices the outcome hangs on the last bit of LAPACK's Schur form).
    rng = np.random.default_rng(3)
    s1, s2 = random_spd(rng, 5), random_spd(rng, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    eps = 0.05  # large, so that a result without the offset would be far off
    calls = []
    real_sqrtm = evaluator_metrics.linalg.sqrtm

    def sqrtm_nan_once(matrix):  # one argument only: SciPy 1.18 has no `disp`, and we must not pass it
        calls.append(matrix.copy())
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(evaluator_metrics.linalg, "sqrtm", sqrtm_nan_once)
    with pytest.warns(UserWarning, match="not finite"):
        fid = frechet_distance(FIDStatistics(mu1, s1), FIDStatistics(mu2, s2), eps=eps)
    offset = eps * np.eye(5)
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset), rtol=0, atol=1e-15)
    # ADM's formula: the offset enters the square root only, the traces are those of the given covariances.
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt_product(s1 + offset, s2 + offset)
    assert len(calls) == 2 and fid == pytest.approx(expected, rel=1e-9)
    unshifted = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt_product(s1, s2)
    assert abs(fid - unshifted) > 0.01


@pytest.mark.parametrize("imag, accepted", [(1e-4, True), (0.1, False)])
def test_fid_keeps_the_real_part_only_of_a_nearly_real_sqrtm(monkeypatch, imag, accepted):
    s1, s2 = np.diag([1.0, 4.0]), np.diag([1.0, 1.0])
    monkeypatch.setattr(evaluator_metrics.linalg, "sqrtm", lambda m: np.diag([1.0, 2.0]) + 1j * imag * np.eye(2))
    stats1, stats2 = FIDStatistics(np.zeros(2), s1), FIDStatistics(np.zeros(2), s2)
    if accepted:
        assert frechet_distance(stats1, stats2) == pytest.approx(5 + 2 - 2 * 3, abs=1e-12)
    else:
        with pytest.raises(ValueError, match="imaginary"):
            frechet_distance(stats1, stats2)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_fid_of_a_singular_product_is_exact_or_the_announced_eps_retry():
    # Diagonal covariances with zeros: S1 S2 has several exactly-zero eigenvalues. SciPy <= 1.17 takes its square
    # root; SciPy 1.18 may return inf/NaN, and then the eps retry must run, say so, and give its own closed form.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    s1[:2] = 0
    s2[1:3] = 0
    eps = 1e-6
    base = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2)
    exact = base - 2 * np.sum(np.sqrt(s1 * s2))
    retried = base - 2 * np.sum(np.sqrt((s1 + eps) * (s2 + eps)))
    assert abs(exact - retried) > 1e-4  # the two outcomes are told apart
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fid = frechet_distance(FIDStatistics(mu1, np.diag(s1)), FIDStatistics(mu2, np.diag(s2)), eps=eps)
    warned = any("not finite" in str(w.message) for w in caught)
    assert fid == pytest.approx(retried if warned else exact, rel=1e-9, abs=1e-9)


def test_fid_rejects_statistics_of_different_sizes():
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(FIDStatistics(np.zeros(3), np.eye(3)), FIDStatistics(np.zeros(2), np.eye(2)))


def test_inception_score_on_hand_made_logits():
    assert inception_score(np.zeros((10, 8)))[0] == pytest.approx(1.0, abs=1e-6)  # uniform: KL = 0
    confident = 60.0 * np.eye(8)[np.arange(40) % 5]  # 5 classes, equally often, all certain
    assert inception_score(confident)[0] == pytest.approx(5.0, rel=1e-4)
    # Contiguous splits: the first holds 2 classes (score 2), the second 4 (score 4) -> mean 3, std 1.
    two_then_four = 60.0 * np.eye(8)[np.r_[np.arange(8) % 2, np.arange(8) % 4]]
    mean, std = inception_score(two_then_four, split_size=8)
    assert (mean, std) == (pytest.approx(3.0, rel=1e-4), pytest.approx(1.0, rel=1e-4))
    # A shorter last split is scored on its own (ADM does the same): splits of 8, 8 and 4 images.
    mean, _ = inception_score(np.r_[two_then_four, 60.0 * np.eye(8)[[0, 1, 2, 3]]], split_size=8)
    assert mean == pytest.approx((2 + 4 + 4) / 3, rel=1e-4)


def test_squared_distances_are_float16_unless_that_overflows():
    zero = torch.zeros(1, 2)
    # 45.25^2 = 2047.5625, which float16 rounds to 2048.
    assert pairwise_sq_distances(torch.tensor([[45.25, 0.0]]), zero).item() == 2048.0
    # 300^2 overflows float16 (max 65504): the block is recomputed in float32.
    assert pairwise_sq_distances(torch.tensor([[300.0, 0.0]]), zero).item() == 90000.0


def _line(xs: list[float], scale: float = 1.0) -> np.ndarray:
    return np.array([[x * scale, 0.0] for x in xs], np.float32)


REF_LINE = [0, 1, 2, 3, 4]
SAMPLE_LINE = [-4, -3, 2, 7, 8, 20]


def test_manifold_radii_are_the_third_neighbour_distance():
    # Squared distances from 0 to the others: 1, 4, 9, 16 -> 3rd neighbour at 9; from 2: 1, 1, 4, 4 -> 4.
    radii = manifold_radii(torch.from_numpy(_line(REF_LINE)))
    np.testing.assert_array_equal(radii.numpy(), [9, 4, 4, 4, 9])


@pytest.mark.parametrize("block", [10000, 2])
@pytest.mark.parametrize("scale", [1.0, 100.0])  # 100: float16 overflows, float32 path, same answer
def test_precision_recall_counted_by_hand(block, scale):
    ref, sample = _line(REF_LINE, scale), _line(SAMPLE_LINE, scale)
    # Reference radii (squared) 9, 4, 4, 4, 9. Samples inside: -3 (9 from 0, <= 9), 2, and 7 (9 from 4);
    # outside: -4 (16 > 9), 8 (16 > 9 from 4, 25 > 4 from 3), 20 -> precision 3/6.
    # Sample radii: -4: 121, -3: 100, 2: 36, 7: 100, 8: 121, 20: 324; sample 2 alone covers [-4, 8], so every
    # reference point is inside -> recall 1.
    precision, recall = precision_recall(ref, sample, block=block)
    assert (precision, recall) == (0.5, 1.0)
    # Swapping the roles swaps the answers.
    assert precision_recall(sample, ref, block=block) == (1.0, 0.5)


# ---------------------------------------------------------------- evaluate() and the CLI


def test_reference_images_give_statistics_and_save_ref_writes_adm_format(weights, ref_feats, sample_feats, tmp_path,
                                                                         monkeypatch):
    # scipy's sqrtm of 2048x2048 matrices takes many seconds on a small CPU: record what FID is given instead
    # (frechet_distance itself is tested above, and end to end below).
    calls = []
    monkeypatch.setattr(scoring, "frechet_distance", lambda s1, s2: calls.append((s1, s2)) or float(len(calls)))
    np.savez(tmp_path / "ref_images.npz", arr_0=REF_IMAGES)
    result = scoring.evaluate(tmp_path / "ref_images.npz", SAMPLE_IMAGES, inception_weights=weights, device="cpu",
                                batch_size=4, ref_pr_images=4, save_ref=tmp_path / "ref_adm.npz", verbose=False)
    (fid_sample, fid_ref), (sfid_sample, sfid_ref) = calls
    for stats, feats in [(fid_sample, sample_feats.pool), (sfid_sample, sample_feats.spatial),
                         (fid_ref, ref_feats.pool), (sfid_ref, ref_feats.spatial)]:  # all 5 reference images
        np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-4, atol=1e-6)
    keep = [0, 1, 2, 3]  # 4 of the 5 reference images, evenly spaced, for precision and recall
    expected = precision_recall(ref_feats.pool[keep], sample_feats.pool)
    assert (result["precision"], result["recall"]) == pytest.approx(expected, abs=1e-12)
    assert result["inception_score"] == pytest.approx(inception_score(sample_feats.logits)[0], rel=1e-5)
    assert (result["ref_stats"], result["num_ref_images"], result["num_ref_pr_images"]) == ("computed", 5, 4)

    with np.load(tmp_path / "ref_adm.npz") as saved:
        np.testing.assert_array_equal(saved["arr_0"], REF_IMAGES[keep])
        for key, value in zip(["mu", "sigma", "mu_s", "sigma_s"], [*fid_ref, *sfid_ref]):
            np.testing.assert_array_equal(saved[key], value)
    pool_stats, spatial_stats = scoring.read_reference_stats(tmp_path / "ref_adm.npz")
    np.testing.assert_array_equal(pool_stats.mu, fid_ref.mu)
    np.testing.assert_array_equal(spatial_stats.sigma, sfid_ref.sigma)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("VAE_REPA_INCEPTION_WEIGHTS", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_cli_end_to_end_with_an_adm_reference(weights, ref_feats, sample_feats, tmp_path, capsys, monkeypatch):
    # An ADM-format reference whose stored statistics differ from those of its images: zero covariances (so
    # S1 S2 = 0, its square root is 0 and FID = |mu1 - mu2|^2 + tr S1 exactly) and shifted means.
    stored_mu, stored_mu_s = ref_feats.pool.mean(0) + 0.5, ref_feats.spatial.mean(0) - 0.25
    np.savez(tmp_path / "ref.npz", arr_0=REF_IMAGES, mu=stored_mu, sigma=np.zeros((2048, 2048)),
             mu_s=stored_mu_s, sigma_s=np.zeros((2023, 2023)))
    np.savez(tmp_path / "samples.npz", arr_0=SAMPLE_IMAGES)
    # The square root of the zero matrix is given here, not asked of SciPy: SciPy 1.18 returns inf/NaN for it (the
    # eps retry is tested above), and a 2048 x 2048 sqrtm takes 10 s or more on a small CPU. The stub checks what
    # it is given, so the statistics still flow through frechet_distance as in a real run.
    roots = []

    def sqrtm_of_zero(matrix):
        assert matrix.shape in ((2048, 2048), (2023, 2023)) and not np.any(matrix)
        roots.append(matrix.shape[0])
        return np.zeros_like(matrix)

    monkeypatch.setattr(evaluator_metrics.linalg, "sqrtm", sqrtm_of_zero)
    monkeypatch.delenv("VAE_REPA_INCEPTION_WEIGHTS", raising=False)
    args = [str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), "--inception-weights", str(weights),
            "--device", "cpu", "--batch-size", "4"]
    assert evaluator.main(args) == 0
    stdout = capsys.readouterr().out
    for label in ["Inception Score:", "FID:", "sFID:", "Precision:", "Recall:"]:
        assert label in stdout
    assert sorted(roots) == [2023, 2048]

    out = tmp_path / "samples.metrics.json"  # the default: next to the samples
    record = json.loads(out.read_text())

    def fid_to_stored(feats: np.ndarray, mu: np.ndarray) -> float:
        diff = feats.astype(np.float64).mean(0) - mu
        return diff @ diff + np.var(feats.astype(np.float64), axis=0, ddof=1).sum()

    expected = {
        "inception_score": inception_score(sample_feats.logits)[0],
        "fid": fid_to_stored(sample_feats.pool, stored_mu),
        "sfid": fid_to_stored(sample_feats.spatial, stored_mu_s),
        **dict(zip(["precision", "recall"], precision_recall(ref_feats.pool, sample_feats.pool))),
    }
    assert 0 < expected["precision"] < 1  # two samples are copies of reference images, two are not
    for name, value in expected.items():
        assert record[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert (record["ref_stats"], record["num_samples"], record["num_ref_pr_images"]) == ("stored", 4, 5)

    # An existing output is never overwritten silently: the rerun fails at once and leaves the file alone.
    before = out.read_text()
    assert evaluator.main(args) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == before


@pytest.mark.parametrize("form", [["evaluations/evaluator.py"], ["-m", "evaluations.evaluator"]])
def test_help_runs_as_a_file_or_module_without_gpu_or_weights(form):
    proc = _run_cli(*form, "--help")
    assert proc.returncode == 0 and "--inception-weights" in proc.stdout and "--save-ref" in proc.stdout


def _main_error(capsys, *argv: str) -> str:
    assert evaluator.main([*argv, "--quiet"]) == 2
    return capsys.readouterr().err


def test_bad_inputs_give_a_clear_error(tmp_path, capsys, weights):
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=SAMPLE_IMAGES)
    assert "not found" in _main_error(capsys, str(good), str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "float.npz", arr_0=SAMPLE_IMAGES.astype(np.float32))
    assert "uint8" in _main_error(capsys, str(good), str(tmp_path / "float.npz"))
    np.savez(tmp_path / "gray.npz", arr_0=SAMPLE_IMAGES[..., 0])
    assert "(N, H, W, 3)" in _main_error(capsys, str(good), str(tmp_path / "gray.npz"))
    np.savez(tmp_path / "nokey.npz", images=SAMPLE_IMAGES)
    assert "no 'arr_0'" in _main_error(capsys, str(good), str(tmp_path / "nokey.npz"))
    (tmp_path / "notzip.npz").write_bytes(b"not a zip file")
    assert "not a valid .npz" in _main_error(capsys, str(good), str(tmp_path / "notzip.npz"))
    np.savez(tmp_path / "half.npz", mu=np.zeros(2048), arr_0=REF_IMAGES)
    assert "lacks" in _main_error(capsys, str(tmp_path / "half.npz"), str(good))
    err = _main_error(capsys, str(good), str(good), "--inception-weights", str(tmp_path / "none.pth"),
                      "--out", str(tmp_path / "m.json"))
    assert "Inception weights not found" in err and "weights-inception-2015-12-05-6726825d.pth" in err
    assert not (tmp_path / "m.json").exists()


def test_missing_weights_offline_says_where_to_get_them(tmp_path, capsys, monkeypatch):
    np.savez(tmp_path / "good.npz", arr_0=SAMPLE_IMAGES)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))
    monkeypatch.delenv("VAE_REPA_INCEPTION_WEIGHTS", raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("evaluations.inception.load_state_dict_from_url", offline)
    good = str(tmp_path / "good.npz")
    err = _main_error(capsys, good, good, "--device", "cpu")
    assert "could not download" in err and "https://github.com/toshas/torch-fidelity/releases" in err
    assert "--inception-weights" in err and "VAE_REPA_INCEPTION_WEIGHTS" in err


def test_weights_from_environment_variable(weights, monkeypatch):
    monkeypatch.setenv("VAE_REPA_INCEPTION_WEIGHTS", str(weights))
    assert InceptionFeatures().weights == str(weights)
    monkeypatch.setenv("VAE_REPA_INCEPTION_WEIGHTS", str(weights) + ".missing")
    with pytest.raises(EvaluationError, match="not found"):
        InceptionFeatures()


@pytest.mark.parametrize("fid_error", [0.0, 0.05])
def test_adm_regression_check_compares_with_the_published_figure(tmp_path, monkeypatch, capsys, fid_error):
    np.savez(tmp_path / "ref.npz", arr_0=REF_IMAGES, mu=np.zeros(2048), sigma=np.eye(2048),
             mu_s=np.full(2023, 0.1), sigma_s=np.eye(2023))
    np.savez(tmp_path / "samples.npz", arr_0=SAMPLE_IMAGES)
    published = check_adm_regression.ADM_PUBLISHED
    monkeypatch.setattr(scoring, "evaluate", lambda *a, **k: {
        **published, "fid": published["fid"] + fid_error, "device": "cpu"})
    code = check_adm_regression.main([str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz")])
    assert code == (0 if fid_error == 0 else 1)
    assert ("PASS" if fid_error == 0 else "FAIL") in capsys.readouterr().out
    code = check_adm_regression.main([str(tmp_path / "missing.npz"), str(tmp_path / "samples.npz")])
    assert code == 2 and "VIRTUAL_imagenet256_labeled.npz" in capsys.readouterr().err
