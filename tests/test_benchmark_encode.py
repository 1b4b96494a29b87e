"""scripts/benchmark_encode.py --loader-ranks on a tiny CPU run (every image read once across the ranks, the JSON and
its table in docs/benchmarks.md), and encode's default count of decoding workers per rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_scripts import load_script

import cli
from preprocessing import encode

pytestmark = pytest.mark.usefixtures("one_thread")


def test_loader_ranks_read_every_image_once_and_render(tmp_path):
    out = tmp_path / "results" / "encode_loader.json"
    argv = ["--loader-ranks", "1", "2", "--images", "25", "--resolution", "32", "--jpeg-size", "64x48",
            "--batch-size", "4", "--num-workers", "1", "--out", str(out)]
    assert load_script("benchmark_encode").main(argv) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["command"] == "python scripts/benchmark_encode.py " + " ".join(argv)
    assert "vae_encode_images_per_s" not in run  # the VAE and CLI parts are skipped
    one, two = run["loader_scaling"]
    assert (one["ranks"], two["ranks"]) == (1, 2) and one["workers_per_rank"] == two["workers_per_rank"] == 1
    assert one["per_rank_images"] == [25] and two["per_rank_images"] == [12, 13]
    for row in (one, two):  # the ranks' shares partition the images: each read exactly once, none unreadable
        assert row["images"] == 25 and row["each_image_read_once"] and row["unreadable"] == 0
        assert row["images_per_s"] == pytest.approx(25 / row["seconds"])
    assert one["efficiency"] == 1.0
    assert two["efficiency"] == pytest.approx(two["images_per_s"] / (2 * one["images_per_s"]))

    doc = tmp_path / "doc.md"
    assert load_script("benchmarks_doc").main(["--results-dir", str(out.parent), "--out", str(doc)]) == 0
    rows = [line for line in doc.read_text().splitlines() if "encode_loader.json" in line]
    assert len(rows) == 2 and "| 1.00 |" in rows[0] and f"`{run['command']}`" in rows[1]
    assert "## Encoding: data loading across ranks" in doc.read_text()


def test_efficiency_needs_a_one_rank_row(tmp_path):
    out = tmp_path / "encode_loader.json"
    argv = ["--loader-ranks", "2", "--images", "6", "--resolution", "32", "--jpeg-size", "64x48", "--batch-size",
            "4", "--num-workers", "0", "--out", str(out)]
    assert load_script("benchmark_encode").main(argv) == 0
    (row,) = json.loads(out.read_text())["runs"][0]["loader_scaling"]
    assert row["efficiency"] is None and row["per_rank_images"] == [3, 3] and row["workers_per_rank"] == 0


@pytest.mark.parametrize("cores,ranks,workers", [(16, 8, 1), (16, 1, 15), (16, 4, 3), (2, 1, 1), (2, 2, 1),
                                                 (64, 1, 16), (1, 1, 1)])
def test_default_num_workers(monkeypatch, cores, ranks, workers):
    """Usable CPU cores / ranks on the machine - 1, at least 1, at most 16."""
    monkeypatch.setattr(cli, "usable_cpus", lambda: cores)
    assert encode.default_num_workers(ranks) == workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    assert encode.default_num_workers() == workers
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert encode.default_num_workers() == encode.default_num_workers(1)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_usable_cpus_is_the_process_affinity_not_the_machine_s_cores():
    """A process pinned to one core (as a SLURM job's share pins it) has 1 usable CPU, whatever os.cpu_count() says;
    where the system has no affinity, os.cpu_count()."""
    code = "import os, cli; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); print(cli.usable_cpus())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "1"


def test_usable_cpus_without_affinity(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert cli.usable_cpus() == 6
