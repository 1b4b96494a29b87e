"""A peer's command trains the peer: REPA's or SRA's own flags without `--align` switch on that method, and the
settings that peer's code fixes and ours defaults differently follow the peer (no flips; SRA's objective, weight,
fp32 teacher and resolution-dependent schedule). Each such choice is a log line and a value in args.json; on a resume
the run's recorded value wins over today's default, and a key an old run lacks means what that run did.

Torch-free: `resolve` runs while the command line is parsed, `settle` once the dataset and the checkpoint are open.
"""

from __future__ import annotations

import argparse

# SRA's own spellings (its train.py at commit 1723f85); ours (--sra-*) configure SRA without switching it on.
SRA_SPELLINGS = ("--block-out-s", "--block-out-t", "--t-max", "--loss-type")
# SRA's --loss-type values -> ours (--sra-loss); "cos" is SRA's own cosine, over the token axis (alignment/sra.py).
SRA_LOSS_TYPES = {"sml1": "smooth_l1", "l2": "l2", "l1": "l1", "cos": "cos"}
SRA_OBJECTIVES = ("smooth_l1", "l1", "l2", "cosine", "cos")
TEACHER_PRECISIONS = ("fp32", "autocast")
# Settings whose default depends on the command (a peer's), the dataset (its resolution) or, on a resume, the run.
SETTLED = ("flip", "sra_loss", "sra_coeff", "sra_decay_after", "sra_decay_epochs", "sra_teacher_precision")
# What a run whose arguments lack the key did (the behaviour before the key existed).
OLD_RUN = {"flip": True, "sra_teacher_precision": "autocast"}
# Namespace entries that describe the command line, not the run: never in args.json.
PARSE_ONLY = ("notes", "defaulted", "peer_command", "sra_spellings")
PAPER_NOTE = ("SRA's paper, and VAE-REPA's Table 3 (its SRA row), used smooth-L1 with the decaying weight: "
              "--loss-type sml1, or --align sra, whose default is the paper's")


class SraSpelling(argparse.Action):
    """The SRA flags that have SRA's own spelling beside ours: stores the value (SRA's --loss-type names as ours,
    SRA_LOSS_TYPES) and records in `sra_spellings` which of SRA's spellings the command used. argparse hands an
    abbreviation (--loss-typ) over under its full name, so it counts too."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, SRA_LOSS_TYPES[values] if option_string == "--loss-type" else values)
        if option_string in SRA_SPELLINGS:
            namespace.sra_spellings = sorted({*getattr(namespace, "sra_spellings", []), option_string})


def sra_schedule(resolution: int | None) -> tuple[int, int]:
    """(decay after epoch, epochs per tenfold decay) of SRA's smooth-L1 weight, as SRA's train.py picks them: 99 and
    800 at 512 px, 149 and 1000 at 256 px (SRA takes only these two); any other or unknown resolution gets 256's."""
    return (99, 800) if resolution == 512 else (149, 1000)


def sra_flags_given(args: argparse.Namespace) -> list[str]:
    """SRA's own spellings the command line used (recorded by SraSpelling while parsing)."""
    return list(getattr(args, "sra_spellings", []))


def resolve(args: argparse.Namespace, peer: list[str]) -> list[str]:
    """Fill in the SETTLED settings the command line left unset (None), for a command recognised as `peer`'s (e.g.
    ["sra"]; [] for ours); records which were filled in `args.defaulted`. Returns notes for the log."""
    notes, defaulted = [], []
    args.peer_command = peer

    def fill(key: str, value) -> None:
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)
            defaulted.append(key)

    fill("flip", not peer)
    if peer and "flip" in defaulted:
        notes.append(f"horizontal flips off, as {' and '.join(p.upper() for p in peer)}'s code trains (--flip: on)")
    fill("sra_loss", "cos" if "sra" in peer else "smooth_l1")
    if "sra" in peer and "sra_loss" in defaulted:
        notes.append("no --loss-type: SRA's cosine loss over the token axis with constant weight 0.5, as SRA's "
                     f"train.py trains without it (--loss-type cos); {PAPER_NOTE}")
    cos = args.sra_loss == "cos"
    fill("sra_coeff", 0.5 if cos else 0.2)  # SRA's train.py: 0.5 for cos, else 2 x 0.1 decaying
    fill("sra_decay_after", sra_schedule(None)[0])  # the resolution's, once the dataset is open (settle)
    fill("sra_decay_epochs", 0 if cos else sra_schedule(None)[1])
    fill("sra_teacher_precision", "fp32")  # SRA's EMA teacher never runs under autocast
    args.defaulted = defaulted
    return notes


def settle(args: argparse.Namespace, saved: dict | None, resolution: int | None, world: int) -> list[str]:
    """The SETTLED settings the command line left to their defaults, once the run's data and checkpoint are known: on a
    resume the run's own values (`saved`, a checkpoint's arguments; OLD_RUN where it lacks one), else SRA's schedule
    for the dataset's resolution. Updates `args`; returns notes for the log (SRA's batch meaning among them)."""
    notes = []
    defaulted = getattr(args, "defaulted", [])
    if saved is not None:
        for key in defaulted:
            value = saved.get(key, OLD_RUN.get(key))
            if value is not None and value != getattr(args, key):
                notes.append(f"--{key.replace('_', '-')} {value!r}: the run's own setting (today's default for this "
                             f"command is {getattr(args, key)!r})")
                setattr(args, key, value)
    elif "sra" in args.align and args.sra_decay_epochs > 0:
        after, epochs = sra_schedule(resolution)
        if "sra_decay_after" in defaulted:
            args.sra_decay_after = after
        if "sra_decay_epochs" in defaulted:
            args.sra_decay_epochs = epochs
        notes.append(f"SRA's weight schedule at {resolution or 'an unknown'} px: {args.sra_coeff} until epoch "
                     f"{args.sra_decay_after}, then x0.1 per {args.sra_decay_epochs} epochs (SRA's train.py: 149 / "
                     "1000 at 256 px, 99 / 800 at 512 px)")
    if "sra" in getattr(args, "peer_command", []):
        notes.append(sra_batch_line(args.batch_size, args.gradient_accumulation_steps, world))
    return notes


def sra_batch_line(batch_size: int, accumulation: int, world: int) -> str:
    per_step = batch_size * accumulation
    theirs = batch_size * world * accumulation
    return (f"SRA's command: --batch-size {batch_size} is the global batch here (REPA's meaning): {per_step} images "
            f"per optimizer step, {batch_size // world} on each of {world} processes. SRA's train.py reads "
            f"--batch-size per process: it would train {theirs} images per step on these {world} processes. SRA's "
            f"README setting (32 per GPU on 8 GPUs, 256 in all) is --batch-size 256 here")
