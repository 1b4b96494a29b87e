"""The experiment tracker of a run (--report-to wandb | tensorboard): its project, the settings it is given with their
types, and a resumed run continuing the same wandb run."""

from __future__ import annotations

import argparse
import logging
import os
import uuid
from pathlib import Path

from integrity import write_text
from training import run_settings

logger = logging.getLogger("train")

DEFAULT_TRACKER_PROJECT = "vae-repa"  # every run's project before --tracker-project-name


def tracker_project(args: argparse.Namespace, recorded: str | None = None) -> str:
    """--tracker-project-name; else the project a resumed run recorded (`recorded`); else, for wandb, $WANDB_PROJECT
    (wandb.init's project argument would override it); else vae-repa."""
    if getattr(args, "tracker_project_name", None):
        return args.tracker_project_name
    if recorded:
        return recorded
    if args.report_to == "wandb" and os.environ.get("WANDB_PROJECT"):
        return os.environ["WANDB_PROJECT"]
    return DEFAULT_TRACKER_PROJECT


def tracker_config(run_args: dict, report_to: str) -> dict:
    """A run's settings as its tracker stores them, with their types: numbers, bools, strings and None as they are (runs
    can then be filtered and sorted by them); for wandb, lists and dicts as such (TensorBoard's hparams take neither:
    there, as text); anything else as text."""

    def typed(value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if report_to == "wandb" and isinstance(value, dict):
            return {str(k): typed(v) for k, v in value.items()}
        if report_to == "wandb" and isinstance(value, (list, tuple)):
            return [typed(v) for v in value]
        return str(list(value) if isinstance(value, tuple) else value)

    return {k: typed(v) for k, v in run_args.items()}


def init_trackers(accelerator, args: argparse.Namespace, run_args: dict, run_dir: Path) -> None:
    if args.report_to == "none":
        return
    init_kwargs = {}
    if args.report_to == "wandb":
        id_file = run_dir / "wandb_id.txt"
        if accelerator.is_main_process and not id_file.exists():
            write_text(id_file, uuid.uuid4().hex[:12])  # a resumed run continues the same wandb run
        accelerator.wait_for_everyone()
        init_kwargs["wandb"] = {"id": id_file.read_text().strip(), "resume": "allow", "name": args.exp_name,
                                "dir": str(run_dir)}
    project = tracker_project(args)
    logger.info("%s: project %s", args.report_to, project)
    accelerator.init_trackers(project, config=tracker_config(run_args, args.report_to), init_kwargs=init_kwargs)


def settle_project(args: argparse.Namespace, run_args: dict, checkpoint: dict | None, run_dir: Path) -> None:
    """The tracker project, in args and run_args (args.json, checkpoints), recorded also by a leg without a tracker: a
    resume stays in the run's project whatever its environment ($WANDB_PROJECT)."""
    recorded = run_settings.recorded_value("tracker_project_name", checkpoint, run_dir if args.resume else None)
    args.tracker_project_name = run_args["tracker_project_name"] = (
        tracker_project(args, recorded) if args.report_to != "none" else args.tracker_project_name or recorded)
