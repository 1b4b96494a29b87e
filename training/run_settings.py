"""A resumed run's settings: which may change (MAY_CHANGE) and which are refused, and args.json, the record of a run's
settings with the history of their changes."""

from __future__ import annotations

import datetime
import json
import logging
import shlex
from pathlib import Path

from alignment import ARCH_KEYS
from cli import UsageError
from integrity import atomic_write

logger = logging.getLogger("train")

# Settings a resumed run may change: how long it runs, what it logs, writes and keeps, where its files are, and how
# it uses its hardware (the number of processes: --batch-size is split over them, so the global batch stays). The change
# is recorded in args.json ("history") and the log. Any other difference from the checkpoint's settings (batch size
# and accumulation steps, whose product is the global batch, seed, learning rate, optimizer, objective, alignment,
# data...) is refused.
MAY_CHANGE = ("max_train_steps", "epochs", "resolution", "fused_attn", "resume_step", "logging_steps",
              "checkpointing_steps", "keep_last", "keep_every", "sample_every", "sample_grid_size",
              "sample_grid_steps", "eval_every", "num_workers", "in_memory", "report_to", "resume",
              "trust_checkpoint", "output_dir", "exp_name", "data_dir", "enc_weights", "compile", "device",
              "allow_tf32", "deterministic", "world_size", "verify_data", "ddp_bucket_cap_mb", "ddp_static_graph",
              "ddp_comm", "tracker_project_name",
              # what the --eval-every evaluations sample and score (each metrics.jsonl row records its own protocol)
              "eval_ref", "eval_samples", "eval_mode", "eval_num_steps", "eval_heun", "eval_cfg_scale",
              "eval_cfg_channels", "eval_guidance_low", "eval_guidance_high", "eval_seed", "eval_label_sampling",
              "eval_pixel_rounding", "eval_batch_size", "inception_weights")


def plain(value):
    """A value as JSON gives it back (tuples as lists), for comparing settings with args.json's."""
    return json.loads(json.dumps(value))


def setting_differences(saved: dict, now: dict) -> tuple[dict[str, list], list[str]]:
    """({name: [saved value, this run's value]} of the settings that may change (MAY_CHANGE, or a setting `saved`
    did not record), ["--flag: checkpoint X, now Y" for every other difference]); architecture keys are skipped."""
    changed, refused = {}, []
    for key in sorted(now):
        if key in ARCH_KEYS or (key in saved and plain(saved[key]) == plain(now[key])):
            continue
        old = saved.get(key)
        if key in MAY_CHANGE or key not in saved:
            changed[key] = [old, plain(now[key])]
        else:
            refused.append(f"--{key.replace('_', '-')}: checkpoint {old!r}, now {now[key]!r}")
    return changed, refused


def compare_settings(saved: dict, now: dict, source: Path) -> dict[str, list]:
    """{name: [checkpoint's value, this run's value]} of the settings that may change (MAY_CHANGE, or a setting the
    checkpoint did not record); UsageError listing every other difference."""
    changed, refused = setting_differences(saved, now)
    if refused:
        raise UsageError(f"resuming from {source} with other settings than it was trained with:\n  "
                         + "\n  ".join(refused) + "\nUse the checkpoint's values, or start a new run (--exp-name); "
                         "settings that may change on resume: the number of processes, " + ", ".join(
                             f"--{k.replace('_', '-')}" for k in MAY_CHANGE if k != "world_size"))
    return changed


def recorded_value(key: str, checkpoint: dict | None, run_dir: Path | None):
    """What a resumed run recorded for `key`: its checkpoint's, or without one (`--resume latest` after an attempt
    that died before its first checkpoint) its args.json's when `run_dir` is given and the file reads; else None."""
    if checkpoint is not None:
        return checkpoint["args"].get(key)
    try:
        saved = json.loads((run_dir / "args.json").read_text()) if run_dir is not None else None
    except (OSError, ValueError):
        return None
    return saved.get(key) if isinstance(saved, dict) else None


def read_args_json(path: Path) -> dict:
    """A run's args.json as a dict; UsageError naming it when it is not a JSON object with a list as its history
    (resuming rewrites it, and its history would be lost)."""
    try:
        old = json.loads(path.read_text())
        problem = None if isinstance(old, dict) else f"a JSON {type(old).__name__}, not an object"
        if problem is None and not isinstance(old.get("history", []), list):
            problem = "its 'history' is not a list"
    except (OSError, ValueError) as e:
        problem = " ".join(str(e).split())
    if problem is not None:
        move = shlex.join(["mv", str(path), f"{path}.bad"])
        raise UsageError(f"{path}: expected the run's settings as a JSON object ({problem}). The checkpoint holds "
                         f"them, and a resume rewrites this file: move it away (`{move}`) and run the same command "
                         "again")
    return old


def record_args(run_dir: Path, run_args: dict, changed: dict, step: int) -> None:
    """Write args.json: this run's settings; on a resume that changed some, the new values and a history entry."""
    path = run_dir / "args.json"
    record = dict(run_args)
    if path.is_file():
        old = read_args_json(path)
        if not changed and {k: v for k, v in old.items() if k != "history"} == plain(run_args):
            return
        record["history"] = old.get("history", [])
    if changed:
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        record.setdefault("history", []).append({"step": step, "time": when, "changed": changed})
        for key, (old_value, new_value) in changed.items():
            logger.info("resume: %s changed from %r to %r (recorded in args.json)", key, old_value, new_value)
    with atomic_write(path, "w") as f:
        f.write(json.dumps(record, indent=2))
