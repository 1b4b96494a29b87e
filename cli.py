"""What every command line shares, importable without torch: one help style, and the choices its flags offer.

Entry points build their parser from this module only, parse, and import torch afterwards, so that `--help` and
usage errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from models.registry import MODEL_NAMES  # noqa: F401  (the registry of every backbone family is torch-free too)

# The choices of flags that several commands offer. The modules that implement them import these names from here.
PATH_TYPES = ("linear", "cosine")
# "lognormal" is REPA's: sigma = exp(N(0, 1)); "lognormal-edm" is EDM's sigma = exp(N(-1.2, 1.2^2));
# "logit-normal" is LightningDiT's (and SD3's): t = sigmoid(N(0, 1)).
WEIGHTINGS = ("uniform", "lognormal", "lognormal-edm", "logit-normal")
ALIGN_OBJECTIVES = ("smooth_l1", "l1", "l2", "cosine")
VAE_REPA_TARGETS = ("latent", "mean")
# SRA's published blocks (student, teacher): SiT-XL/2 8 -> 20 (its README), 4 -> 8 its code's default (B);
# L is not published: XL's setting is used for it.
SRA_DEFAULT_BLOCKS = {"S": (4, 8), "B": (4, 8), "L": (8, 20), "XL": (8, 20)}

# How decoder output x in [-1, 1] becomes 8-bit pixels (the metrics are computed on these bytes).
# "repa": uint8(clamp(255 (x + 1) / 2)) = floor(127.5 x + 127.5), REPA's generate.py and so the paper's protocol;
# "dit": uint8(clamp(127.5 x + 128)), DiT's and SiT's sample_ddp.py: about half of all pixels one level brighter.
PIXEL_ROUNDINGS = ("repa", "dit")

# Classifier-free guidance on all latent channels (REPA's sampler) or on the first N only: LightningDiT's
# forward_with_cfg guides 3 (kept from DiT), the others take the conditional output.
CFG_CHANNELS_HELP = ("latent channels classifier-free guidance applies to: all (REPA's sampler), or N: only channels "
                     "0..N-1 are guided and the others take the conditional output (LightningDiT's forward_with_cfg "
                     "guides 3, as DiT did). Changes nothing without guidance")


def cfg_channels(text: str) -> str | int:
    """The value of a --cfg-channels flag: "all" or a positive channel count."""
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected all or a positive number of channels, got {text!r}")
    return value


def check_cfg_channels(flag: str, value: str | int, channels: int) -> None:
    """UsageError when `flag`'s `value` (cfg_channels) names more channels than the model's latents have."""
    if value != "all" and value > channels:
        raise UsageError(f"{flag} {value}: the model has {channels} latent channels")


def cfg_channels_in_effect(cfg_scale: float, value: str | int, channels: int) -> str | int:
    """The guided channels as they act: "all" without guidance, or when N covers every latent channel (the same
    images); what sample folders and evaluation rows record."""
    return "all" if cfg_scale <= 1 or value == "all" or value >= channels else value


TRUST_FLAG = "--trust-checkpoint"
TRUST_HELP = ("also open a checkpoint that holds Python objects other than tensors and plain values (refused by "
              "default). Reading such an object RUNS CODE FROM THE FILE, as the person who made it chose: pass this "
              "only for a file whose origin you trust")


class UsageError(ValueError):
    """A problem with the command line or the files it names: every entry point prints it as one line (no
    traceback) and exits with status 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The one help style: the description keeps its line breaks, and every option ends with its default.

    Nothing is appended where it would say nothing or repeat the help: required options and positionals, switches
    that take no value (`store_true`, `store_const`), a default of None (the help says what happens then), and help
    that already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = (action.help or "").removesuffix(" (default: %(default)s)")  # added by Python 3.10's BooleanOptional
        if (action.default is None or action.default is argparse.SUPPRESS or action.required
                or not action.option_strings or "default" in text.lower()):
            return text
        if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
            return text  # a switch: its help says what passing it does
        if isinstance(action, argparse.BooleanOptionalAction):
            on, off = _bool_flags(action)
            return f"{text} (default: {on if action.default else off})"
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"


def _bool_flags(action: argparse.Action) -> tuple[str, str]:
    """(--flag, --no-flag) of a BooleanOptionalAction."""
    off = next(s for s in action.option_strings if s.startswith("--no-"))
    on = next(s for s in action.option_strings if s.startswith("--") and not s.startswith("--no-"))
    return on, off


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage error comes after a short usage line, not after the usage of every flag (60 lines
    for train.py)."""

    def error(self, message: str):
        usage = self.format_usage()
        if usage.count("\n") > 3:
            usage = f"usage: {self.prog} [options] ...   ({self.prog} --help lists every flag and its default)\n"
        self.exit(2, f"{usage}{self.prog}: error: {message}\n")


def parser(description: str | None, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser in the shared help style."""
    return _Parser(description=description, formatter_class=HelpFormatter, **kwargs)


def usable_cpus() -> int:
    """The CPU cores this process may run on: its affinity where the system tells it (a SLURM or container job's
    share, not the whole node's os.cpu_count()), for the defaults of worker-count flags."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity on this system (macOS, Windows)
        return os.cpu_count() or 1


def print_error(line: str) -> None:
    """`line` to stderr in one write with its newline, flushed: the processes of one launch share a stderr, and
    print's separate write of the newline let their lines run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
