"""Tests for dataset.py: posterior sampling, flips, determinism, the sampler, REPA's layout, damaged data."""

import json
import os
import shlex

import numpy as np
import pytest
import torch
from helpers_data import write_latent_dataset, write_repa_layout
from torch.utils.data import DataLoader

from dataset import DatasetError, LatentDataset, ResumableDistributedSampler

N, SHAPE = 10, (2, 3, 3)


def moments(seed=0, n=N):
    rng = np.random.default_rng(seed)
    mean = rng.normal(0, 3, (n, *SHAPE)).astype(np.float32)
    std = rng.uniform(0.2, 1.5, (n, *SHAPE)).astype(np.float32)
    labels = rng.integers(0, 4, n)
    return mean, std, labels


@pytest.fixture
def flip_ds_dir(tmp_path):
    """Flipped copies with std 0, so that a flipped item is recognisable: x equals target exactly."""
    mean, std, labels = moments()
    flip_mean = -mean
    return write_latent_dataset(tmp_path / "flip", mean, std, labels, flip_mean, np.zeros_like(std),
                                shard_size=4, scale=0.3, shift=0.5, num_classes=4)


def test_items_and_posterior_statistics(tmp_path):
    mean, std, labels = moments()
    scale, shift = 0.3, 0.5
    ds = LatentDataset(write_latent_dataset(tmp_path / "d", mean, std, labels, scale=scale, shift=shift,
                                            num_classes=4))
    assert len(ds) == N and ds.latent_shape == SHAPE and ds.num_classes == 4
    assert (ds.scale, ds.shift, ds.vae) == (scale, shift, "test-vae")
    epochs = 2000
    for i in (0, 5, 9):  # shard 0, 1 and 2 (4 + 4 + 2 images)
        xs = []
        for e in range(epochs):
            ds.set_epoch(e)
            item = ds[i]
            xs.append(item["x"].numpy())
        assert item["x"].dtype == torch.float32 and item["y"].dtype == torch.int64 and item["index"] == i
        assert item["y"].item() == labels[i] and item["y"].shape == ()
        np.testing.assert_allclose(item["target"].numpy(), scale * (mean[i] + shift), rtol=1e-6)
        xs = np.stack(xs)
        sem = scale * std[i] / np.sqrt(epochs)  # standard error of the empirical mean
        assert np.all(np.abs(xs.mean(0) - scale * (mean[i] + shift)) < 5 * sem)
        np.testing.assert_allclose(xs.std(0), scale * std[i], rtol=0.12)


def test_flip_probability_and_consistency(flip_ds_dir):
    mean, _, _ = moments()
    ds = LatentDataset(flip_ds_dir)
    flips = 0
    for e in range(200):
        ds.set_epoch(e)
        for i in range(N):
            item = ds[i]
            flipped = np.allclose(item["target"].numpy(), 0.3 * (-mean[i] + 0.5))
            assert flipped or np.allclose(item["target"].numpy(), 0.3 * (mean[i] + 0.5))
            assert torch.equal(item["x"], item["target"]) == flipped  # std 0 only on the flipped copy
            flips += flipped
    assert abs(flips / (200 * N) - 0.5) < 0.05  # 2000 coin flips: 4.5 standard deviations
    no_flip = LatentDataset(flip_ds_dir, use_flip=False)
    assert all(np.allclose(no_flip[i]["target"].numpy(), 0.3 * (mean[i] + 0.5)) for i in range(N))


def test_randomness_is_a_function_of_seed_epoch_index(flip_ds_dir):
    a, b = LatentDataset(flip_ds_dir, seed=3), LatentDataset(flip_ds_dir, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert all(torch.equal(a[i]["x"], b[i]["x"]) for i in range(N))
    assert torch.equal(a[7]["x"], a[7]["x"])
    first = torch.stack([a[i]["x"] for i in range(N)])
    a.set_epoch(3)
    assert not torch.equal(first, torch.stack([a[i]["x"] for i in range(N)]))
    other_seed = LatentDataset(flip_ds_dir, seed=4)
    other_seed.set_epoch(2)
    assert not torch.equal(first, torch.stack([other_seed[i]["x"] for i in range(N)]))
    in_memory = LatentDataset(flip_ds_dir, seed=3, in_memory=True)
    in_memory.set_epoch(2)
    assert torch.equal(first, torch.stack([in_memory[i]["x"] for i in range(N)]))


def test_dataloader_workers_and_persistent_workers_see_the_epoch(flip_ds_dir):
    ds = LatentDataset(flip_ds_dir, seed=1)
    expected = {}
    for e in (0, 1):
        ds.set_epoch(e)
        expected[e] = torch.stack([ds[i]["x"] for i in range(N)])
    loader = DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True)
    for e in (0, 1):
        ds.set_epoch(e)
        batches = list(loader)
        assert torch.equal(torch.cat([b["x"] for b in batches]), expected[e])
        assert torch.cat([b["index"] for b in batches]).tolist() == list(range(N))
        assert batches[0]["y"].dtype == torch.int64 and batches[0]["target"].shape == (4, *SHAPE)


def test_sampler_order_is_deterministic_and_shuffled():
    s = ResumableDistributedSampler(100, seed=0)
    order = list(s)
    assert sorted(order) == list(range(100)) and order != list(range(100))
    assert order == list(ResumableDistributedSampler(100, seed=0))
    assert order != list(ResumableDistributedSampler(100, seed=1))
    s.set_epoch(1)
    assert sorted(s) == list(range(100)) and list(s) != order
    assert list(ResumableDistributedSampler(10, shuffle=False)) == list(range(10))


@pytest.mark.parametrize("n, world, drop_last", [(100, 4, True), (103, 4, True), (103, 4, False), (5, 3, False)])
def test_sampler_ranks_are_disjoint_and_cover(n, world, drop_last):
    orders = []
    for r in range(world):
        s = ResumableDistributedSampler(n, num_replicas=world, rank=r, seed=7, drop_last=drop_last)
        s.set_epoch(2)
        orders.append(list(s))
        assert len(s) == len(orders[-1])
    assert len({len(o) for o in orders}) == 1  # every rank takes the same number of steps
    flat = [i for o in orders for i in o]
    if drop_last:
        assert len(set(flat)) == len(flat) == n - n % world
    else:
        assert set(flat) == set(range(n)) and len(flat) == world * -(-n // world)


def test_sampler_resume_mid_epoch_gives_the_tail():
    full = ResumableDistributedSampler(50, num_replicas=2, rank=1, seed=3)
    full.set_epoch(4)
    order = list(full)
    resumed = ResumableDistributedSampler(50, num_replicas=2, rank=1, seed=3)
    resumed.set_epoch(4)
    resumed.set_start(9)
    assert list(resumed) == order[9:] and len(resumed) == len(order) - 9
    resumed.set_epoch(4)  # same epoch again: the start position stays
    assert len(resumed) == len(order) - 9
    resumed.set_epoch(5)  # next epoch starts at the beginning
    assert len(resumed) == len(order)
    with pytest.raises(ValueError):
        resumed.set_start(len(order) + 1)


def test_repa_layout(tmp_path):
    mean, std, labels = moments(n=6)
    root = write_repa_layout(tmp_path / "repa", mean, std, labels)
    for path in (root, root / "vae-sd"):
        ds = LatentDataset(path)
        assert len(ds) == 6 and ds.latent_shape == SHAPE and ds.num_classes == labels.max() + 1
        assert (ds.vae, ds.scale, ds.shift) == ("stabilityai/sd-vae-ft-ema", 0.18215, 0.0)
        for i in range(6):
            item = ds[i]
            assert item["y"].item() == labels[i]
            np.testing.assert_allclose(item["target"].numpy(), 0.18215 * mean[i], rtol=1e-6)
    ds.set_epoch(1)
    eps = (ds[2]["x"].numpy() / 0.18215 - mean[2]) / std[2]  # a posterior sample: eps ~ N(0, 1), 18 values
    assert 0.3 < eps.std() < 2
    ram = LatentDataset(root, in_memory=True)
    ram.set_epoch(1)
    assert torch.equal(ram[2]["x"], ds[2]["x"])
    (root / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": [["00000/img-mean-std-00000000.npy", 1]]}))
    with pytest.raises(DatasetError, match="no label for .*img-mean-std-00000001.npy"):
        LatentDataset(root)


def test_errors_name_the_damaged_file(tmp_path):
    mean, std, labels = moments()
    d = write_latent_dataset(tmp_path / "d", mean, std, labels, num_classes=4)
    manifest = json.loads((d / "manifest.json").read_text())

    shard = d / "mean-00001.npy"
    good = shard.read_bytes()
    os.truncate(shard, len(good) - 7)
    with pytest.raises(DatasetError, match="mean-00001.npy.*truncated"):
        LatentDataset(d)
    shard.write_bytes(good)

    def broken(**changes):
        (d / "manifest.json").write_text(json.dumps({**manifest, **changes}))
        with pytest.raises(DatasetError) as info:
            LatentDataset(d)
        return str(info.value)

    shards = [dict(s) for s in manifest["shards"]]
    shards[2]["count"] = 3
    assert "num_images" in broken(shards=shards)  # counts no longer add up to num_images
    shards[1]["count"] = 3
    assert "mean-00001.npy" in broken(shards=shards)  # the total is right, shards 1 and 2 are not
    assert "mean-00000.npy" in broken(latent_shape=[2, 3, 4])
    assert "mean-00000.npy" in broken(dtype="float16")
    assert "labels.npy" in broken(num_classes=2)  # labels out of range
    assert "complete" in broken(complete=False)
    without_scale = {k: v for k, v in manifest.items() if k != "scale"}
    (d / "manifest.json").write_text(json.dumps(without_scale))
    with pytest.raises(DatasetError, match="'scale' is missing"):
        LatentDataset(d)
    (d / "manifest.json").write_text(json.dumps(manifest))
    assert len(LatentDataset(d)) == N
    with pytest.raises(DatasetError, match="no manifest.json"):
        LatentDataset(tmp_path)


def test_the_repair_command_quotes_what_the_manifest_says(tmp_path):
    """The command printed for a damaged shard is pasted into a shell: a manifest made by someone else whose source
    holds shell text must reach preprocessing as one argument, and run nothing."""
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    root = write_latent_dataset(tmp_path / "my data", mean, np.full_like(mean, 0.1), np.zeros(4, np.int64),
                                shard_size=2, num_classes=1)
    manifest = json.loads((root / "manifest.json").read_text())
    hostile = "/data/x; touch /tmp/pwned $(id)"
    manifest["source"] = hostile
    (root / "manifest.json").write_text(json.dumps(manifest))
    command = LatentDataset(root).repair_command()
    argv = shlex.split(command[command.index("`") + 1:command.rindex("`")])  # what a shell would pass
    assert argv[:3] == ["python", "-m", "preprocessing.encode"]
    assert argv[argv.index("--source") + 1] == hostile and argv[argv.index("--dest") + 1] == str(root)
