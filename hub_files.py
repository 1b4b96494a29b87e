"""Files from the Hugging Face hub: the command that downloads one ahead of time (the one the installed huggingface_hub
provides), the one place such downloads go (`pretrained/<repository name>`), and failing at once when the hub cannot be
reached, where huggingface_hub would retry for a minute or more."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shlex
import threading
from collections.abc import Iterator

LOCAL_ROOT = "pretrained"  # hf download ... --local-dir pretrained/<name>; the flag names that folder or a file in it
PROBE_ENV = "VAE_REPA_HUB_TIMEOUT"  # seconds the hub has to answer before only the local cache is read
_reachable: dict[str, bool] = {}


def probe_seconds() -> float:
    try:
        return float(os.environ.get(PROBE_ENV, "3"))
    except ValueError:
        return 3.0


def download_command() -> str:
    """The download command of the installed huggingface_hub: `hf` (from 0.34 on; 1.0 removed `huggingface-cli`), else
    `huggingface-cli`."""
    try:
        scripts = {e.name for e in importlib.metadata.distribution("huggingface_hub").entry_points
                   if e.group == "console_scripts"}
    except importlib.metadata.PackageNotFoundError:
        scripts = set()
    return "huggingface-cli" if "huggingface-cli" in scripts and "hf" not in scripts else "hf"


def local_dir(repo_id: str) -> str:
    """Where a download of `repo_id` goes: pretrained/<name>."""
    return f"{LOCAL_ROOT}/{repo_id.rstrip('/').split('/')[-1]}"


def download_advice(repo_id: str, flag: str, files: tuple[str, ...] = (), pass_file: str | None = None) -> str:
    """How to bring `repo_id` (only `files` of it, if given) to a machine without network, and the flag that then
    names it: the folder, or `pass_file` inside it."""
    command, folder = download_command(), local_dir(repo_id)
    fetch = shlex.join([command, "download", repo_id, *files, "--local-dir", folder])
    target = f"{folder}/{pass_file}" if pass_file else folder
    cache = shlex.join([command, "download", repo_id, *files])
    return (f"Download it where there is network with `{fetch}`, copy {folder}/ here and pass {flag} "
            f"{shlex.quote(target)} (or fill the Hugging Face cache with `{cache}` and run with HF_HUB_OFFLINE=1)")


def hub_reachable(endpoint: str | None = None, timeout: float | None = None) -> bool:
    """Whether the hub answers one HEAD request within `timeout` seconds (huggingface_hub's own session: its proxy
    settings and HF_ENDPOINT apply). A stalled name lookup counts as no answer. Asked once per endpoint and process."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    endpoint = endpoint or constants.ENDPOINT
    timeout = probe_seconds() if timeout is None else timeout
    if endpoint not in _reachable:
        answers: list[bool] = []

        def probe() -> None:
            try:
                answers.append(get_session().head(endpoint, timeout=timeout).status_code < 500)
            except Exception:  # noqa: BLE001 - refused, timed out, no route, no name: all mean unreachable
                answers.append(False)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout + 1)
        _reachable[endpoint] = bool(answers and answers[0])
    return _reachable[endpoint]


@contextlib.contextmanager
def hub_or_cache() -> Iterator[str]:
    """Around a download from the hub: when the hub answers, nothing changes; when it does not, huggingface_hub works
    offline inside (files in its cache load, a missing one fails at once). Yields a sentence for an error message
    saying which happened ('' when the hub answered)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        yield "HF_HUB_OFFLINE is set, so only the Hugging Face cache was read. "
        return
    if hub_reachable():
        yield ""
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield (f"{constants.ENDPOINT} did not answer within {probe_seconds():g} s ({PROBE_ENV} sets the wait), so "
               "only the Hugging Face cache was read. ")
    finally:
        constants.HF_HUB_OFFLINE = False
