"""Downloads from the Hugging Face hub without network: the failure comes within seconds (not after huggingface_hub's
minute of retries), names the download command that the installed huggingface_hub provides and one destination, and
files already in the cache still load."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers_data import make_tiny_vae

import hub_files

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process (huggingface_hub reads HF_ENDPOINT and its cache folder at import): the loaders imported first,
# then each load timed alone.
LOADS = """import json, sys, time
from latent_codecs.autoencoder import load_vae
from models.encoders import load_dinov2, parse_enc_type
import diffusers, timm  # noqa: F401  (imported before the clock starts: their import is not the failure's time)
out = {}
for name, load in [("vae", lambda: load_vae("stabilityai/sd-vae-ft-ema")),
                   ("encoder", lambda: load_dinov2(parse_enc_type("dinov2-vit-s")[0], 256)),
                   ("cached", lambda: load_vae("someone/tiny-vae"))]:
    start = time.perf_counter()
    try:
        load()
        out[name] = [time.perf_counter() - start, "loaded"]
    except Exception as e:
        out[name] = [time.perf_counter() - start, str(e)]
print(json.dumps(out))
"""


@pytest.fixture
def silent_hub():
    """A hub address that accepts connections and never answers: what a firewall that drops traffic looks like to
    huggingface_hub (each request waits for its timeout), on a networked machine too."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def cache_repo(cache: Path, repo_id: str, make) -> None:
    """`repo_id` in huggingface_hub's cache layout (refs/main -> snapshots/<commit>/files), as a download leaves it."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    make(repo / "snapshots" / commit)


def test_download_command_is_the_installed_one():
    command = hub_files.download_command()
    found = Path(sys.executable).parent / command
    assert found.is_file(), f"{command} is not in {found.parent}"
    proc = subprocess.run([str(found), "download", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--local-dir" in proc.stdout


def test_without_network_loads_fail_in_seconds_and_say_what_to_run(tmp_path, silent_hub):
    cache_repo(tmp_path / "hub", "someone/tiny-vae", make_tiny_vae)
    env = {**os.environ, "HF_ENDPOINT": silent_hub, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path),
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("VAE_REPA_HUB_TIMEOUT", None)
    proc = subprocess.run([sys.executable, "-c", LOADS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    # without the fail-fast, each failure takes 47-74 s here (huggingface_hub's retries, each waiting 10 s)
    assert out["vae"][0] < 10 and out["encoder"][0] < 10, out
    command = hub_files.download_command()
    vae, encoder = out["vae"][1], out["encoder"][1]
    assert (f"`{command} download stabilityai/sd-vae-ft-ema --local-dir pretrained/sd-vae-ft-ema`" in vae
            and "--vae pretrained/sd-vae-ft-ema " in vae and "did not answer within 3 s" in vae), vae
    assert (f"`{command} download timm/vit_small_patch14_dinov2.lvd142m model.safetensors --local-dir "
            "pretrained/vit_small_patch14_dinov2.lvd142m`" in encoder and "--enc-weights "
            "pretrained/vit_small_patch14_dinov2.lvd142m/model.safetensors" in encoder), encoder
    assert all("HF_HUB_OFFLINE=1" in message for message in (vae, encoder))
    assert out["cached"][1] == "loaded"  # what the cache holds loads offline, as huggingface_hub's offline mode does


class _Answering(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 - http.server's name
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_hub_that_answers_is_used_and_one_that_does_not_is_given_up_quickly(silent_hub, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answering)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(hub_files, "_reachable", {})
    try:
        assert hub_files.hub_reachable(f"http://127.0.0.1:{server.server_address[1]}", timeout=5)  # any answer
    finally:
        server.shutdown()
    start = time.perf_counter()
    assert not hub_files.hub_reachable(silent_hub, timeout=1)
    assert time.perf_counter() - start < 3
