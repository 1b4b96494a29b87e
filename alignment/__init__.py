"""Alignment methods behind one interface (base.AlignmentMethod): VAE-REPA, REPA and SRA, alone or combined.

`add_arguments` declares every method's flags, `resolve_args` turns a command line into the set of methods
(REPA's flags keep REPA's meaning), and `build_methods` rebuilds the methods from a run's saved arguments. The flags'
defaults are written once, in `DEFAULTS` and `method_defaults`: the parser, `resolve_args` and `build_methods` (for
the keys an older run's arguments lack) all take them from there.
Importing this package does not import torch (the command lines declare their flags first); the methods'
modules are imported when they are used.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import TYPE_CHECKING

from alignment import peers
from cli import ALIGN_OBJECTIVES, SRA_DEFAULT_BLOCKS, VAE_REPA_TARGETS
from models.registry import model_config, model_size  # torch-free

if TYPE_CHECKING:
    import torch

    from alignment.base import AlignmentMethod, StepInputs
    from models.heads import HeadSpec

METHOD_NAMES = ("vae-repa", "repa", "sra")  # also the order in which terms are logged and names joined
REPA_FLAGS = ("enc_type", "encoder_depth", "proj_coeff", "projector_embed_dims")
# Old spellings of VAE-REPA's flags: they keep working for one release, with a deprecation line.
DEPRECATED = {"--align-loss": "--vae-repa-loss", "--align-beta": "--vae-repa-beta",
              "--align-t-range": "--vae-repa-t-range", "--align-target": "--vae-repa-target",
              "--head-layers": "--vae-repa-head-layers", "--head-width": "--vae-repa-head-width"}

# Every method flag's default that does not depend on the model, which is also what a run whose arguments lack the key
# did. REPA's flags stay None on the parser (so that giving one can be told apart, see resolve_args), and so do SRA's
# settings that depend on the command, the dataset or the run (peers.SETTLED: a new run's values come from there).
DEFAULTS = {
    "enc_type": "dinov2-vit-b", "encoder_depth": 8, "proj_coeff": 0.5, "enc_weights": None, "enc_source": "timm",
    "vae_repa_coeff": 1.0, "vae_repa_loss": "smooth_l1", "vae_repa_beta": 0.05, "vae_repa_t_range": (0.0, 1.0),
    "vae_repa_target": "latent", "vae_repa_head_layers": 5, "vae_repa_head_width": None,
    "sra_t_max": 0.2, "sra_coeff": 0.2, "sra_decay_after": 149, "sra_decay_epochs": 1000, "sra_loss": "smooth_l1",
    "sra_beta": 0.05, "sra_teacher_precision": "autocast",
}
# Keys that build_methods has always read with `or`: in a run's arguments 0 or "" also means the default.
EMPTY_MEANS_DEFAULT = ("enc_type", "encoder_depth", "vae_repa_depth", "sra_student_depth", "sra_teacher_depth")

__all__ = ["AlignmentMethod", "StepInputs", "METHOD_NAMES", "DEFAULTS", "add_arguments", "resolve_args", "peers",
           "method_defaults", "build_methods", "head_specs", "upgrade_run_args", "ARCH_KEYS", "model_from_args"]


def __getattr__(name: str):  # `alignment.AlignmentMethod` etc., imported on first use
    if name in ("AlignmentMethod", "StepInputs"):
        return getattr(importlib.import_module("alignment.base"), name)
    raise AttributeError(f"module 'alignment' has no attribute {name!r}")


def method_defaults(model: str) -> dict:
    """Every method flag's default for `model`: DEFAULTS and the blocks that depend on its size (VAE-REPA's, as the
    paper: 2 for S and B, 8 for L and XL; SRA's student and teacher blocks, SRA_DEFAULT_BLOCKS)."""
    student, teacher = SRA_DEFAULT_BLOCKS[model_size(model)]
    return {**DEFAULTS, "vae_repa_depth": model_config(model)["encoder_depth"], "sra_student_depth": student,
            "sra_teacher_depth": teacher}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    g = p.add_argument_group("alignment methods")
    g.add_argument("--align", nargs="?", const="vae-repa", default=None, metavar="METHODS",
                   help="comma-separated set of vae-repa, repa, sra (e.g. repa,vae-repa), or none for vanilla SiT. "
                        "Default: vae-repa, or repa alone when one of REPA's flags (--enc-type, --encoder-depth, "
                        "--proj-coeff, --projector-embed-dims) is given, as REPA's own train.py would train")
    g.add_argument("--no-align", dest="align", action="store_const", const="none",
                   help="vanilla SiT: the same as --align none (no head is built, nothing extra is computed)")

    g = p.add_argument_group("REPA (REPA's flags, REPA's meaning)")
    g.add_argument("--enc-type", default=None,
                   help="external encoder(s), comma-separated: dinov2-vit-{s,b,l,g} or dinov2reg-vit-{s,b,l,g} "
                        f"(default: {d['enc_type']}, as REPA)")
    g.add_argument("--encoder-depth", type=int, default=None,
                   help=f"REPA's projector reads the tokens after this block (default: {d['encoder_depth']}, as REPA)")
    g.add_argument("--proj-coeff", type=float, default=None,
                   help=f"weight of REPA's projection loss (default: {d['proj_coeff']})")
    g.add_argument("--projector-embed-dims", default=None,
                   help="REPA's encoder widths, comma-separated (e.g. 768); checked against --enc-type "
                        "(default: taken from --enc-type)")
    g.add_argument("--enc-weights", default=None,
                   help="local weights file(s) of the encoder(s), comma-separated (timm's model.safetensors, or a "
                        ".pt/.pth of tensors only, e.g. DINOv2's own; read without running code from them); "
                        "default: the Hugging Face hub cache, downloaded once")
    g.add_argument("--enc-source", choices=("timm", "hub"), default=d["enc_source"],
                   help="timm: timm's DINOv2 and its safetensors weights; hub: torch.hub's facebookresearch/dinov2 "
                        "(REPA's path), which downloads and runs that repository's code")

    g = p.add_argument_group("VAE-REPA")
    g.add_argument("--vae-repa-depth", type=int, default=None,
                   help="align the tokens after this block (default: 2 for S and B, 8 for L and XL, as the paper)")
    g.add_argument("--vae-repa-coeff", type=float, default=d["vae_repa_coeff"],
                   help="lambda, the alignment loss weight (Eq. 8); 0 turns VAE-REPA off")
    g.add_argument("--vae-repa-loss", "--align-loss", dest="vae_repa_loss", choices=ALIGN_OBJECTIVES,
                   default=d["vae_repa_loss"], help="alignment objective")
    g.add_argument("--vae-repa-beta", "--align-beta", dest="vae_repa_beta", type=float,
                   default=d["vae_repa_beta"], help="smooth-L1 threshold beta")
    g.add_argument("--vae-repa-t-range", "--align-t-range", dest="vae_repa_t_range", type=float, nargs=2,
                   default=d["vae_repa_t_range"], metavar=("LOW", "HIGH"),
                   help="align only samples with t in [LOW, HIGH] (t = 1 is noise)")
    g.add_argument("--vae-repa-target", "--align-target", dest="vae_repa_target", choices=VAE_REPA_TARGETS,
                   default=d["vae_repa_target"],
                   help="'latent': the clean latent being noised; 'mean': the VAE posterior mean")
    g.add_argument("--vae-repa-head-layers", "--head-layers", dest="vae_repa_head_layers", type=int,
                   default=d["vae_repa_head_layers"], help="Linear layers in the VAE-REPA head")
    g.add_argument("--vae-repa-head-width", "--head-width", dest="vae_repa_head_width", type=int, default=None,
                   help="VAE-REPA head width (default: 2 x hidden size)")

    g = p.add_argument_group("SRA (SRA's flag names are accepted too; SRA's own switch SRA on without --align)")
    g.add_argument("--sra-student-depth", "--block-out-s", dest="sra_student_depth", type=int, default=None,
                   action=peers.SraSpelling,
                   help="student block whose tokens go through SRA's head (default: 4 for S and B, 8 for L and XL)")
    g.add_argument("--sra-teacher-depth", "--block-out-t", dest="sra_teacher_depth", type=int, default=None,
                   action=peers.SraSpelling,
                   help="EMA teacher block aligned to (default: 8 for S and B, 20 for L and XL)")
    g.add_argument("--sra-t-max", "--t-max", dest="sra_t_max", type=float, default=d["sra_t_max"],
                   action=peers.SraSpelling,
                   help="teacher time = student time - U[0, 1) x this (a cleaner input)")
    g.add_argument("--sra-loss", choices=peers.SRA_OBJECTIVES, default=None,
                   help="SRA's objective: smooth_l1 (SRA's paper), l1, l2, cosine (1 - cos per token, averaged), or "
                        "cos (SRA's --loss-type cos: 1 - cos over the token axis, averaged over features). Default: "
                        "smooth_l1; cos for a command recognised as SRA's (its flags, no --align), as SRA's train.py")
    g.add_argument("--loss-type", dest="sra_loss", choices=tuple(peers.SRA_LOSS_TYPES), action=peers.SraSpelling,
                   default=None,
                   help="SRA's flag, SRA's names: sml1 = --sra-loss smooth_l1, l1, l2, cos = --sra-loss cos")
    g.add_argument("--sra-coeff", type=float, default=None,
                   help="weight of SRA's loss; 0 turns SRA off. Default: as SRA's train.py, 0.2 (2 x 0.1) for "
                        "smooth-L1, l1, l2, and 0.5 for cos")
    g.add_argument("--sra-decay-after", type=int, default=None,
                   help="epoch after which SRA's weight decays (default: as SRA's train.py, 149 at 256 px, 99 at "
                        "512 px; the dataset's resolution decides)")
    g.add_argument("--sra-decay-epochs", type=int, default=None,
                   help="the weight shrinks tenfold every this many epochs after that; 0: constant (default: as SRA's "
                        "train.py, 1000 at 256 px, 800 at 512 px, 0 for cos)")
    g.add_argument("--sra-beta", type=float, default=d["sra_beta"], help="smooth-L1 threshold beta of SRA's loss")
    g.add_argument("--sra-teacher-precision", choices=peers.TEACHER_PRECISIONS, default=None,
                   help="precision of the EMA teacher's forward: fp32, as SRA's code (its EMA model never runs under "
                        "autocast), or autocast (--mixed-precision, as runs before this flag). Default: fp32; a run "
                        "whose args.json lacks it resumes with autocast")


def _deprecation_notes(argv: list[str]) -> list[str]:
    used = {a.split("=")[0] for a in argv if a.split("=")[0] in DEPRECATED}
    return [f"{old} is deprecated and will be removed in the next release: use {DEPRECATED[old]}"
            for old in sorted(used)]


def resolve_args(args: argparse.Namespace, argv: list[str] | None, error) -> list[str]:
    """Fill in the method set and the per-size defaults in place; returns lines for the log.

    `error(message)` reports a bad combination (argparse's `parser.error`)."""
    argv = sys.argv[1:] if argv is None else argv
    notes = _deprecation_notes(argv)
    repa_flags = [f"--{k.replace('_', '-')}" for k in REPA_FLAGS if getattr(args, k) is not None]
    sra_flags = peers.sra_flags_given(args)
    peer = []  # the peers whose own flags, without --align, name the methods (their code's settings follow)
    if args.align is None:
        peer = [name for name, flags in (("repa", repa_flags), ("sra", sra_flags)) if flags]
        args.align = ",".join(peer) or "vae-repa"
        if peer:
            alone = f"{peer[0].upper()} alone, as {peer[0].upper()}'s train.py would" if len(peer) == 1 else \
                "REPA and SRA, as their flags ask"
            notes.append(f"{', '.join(repa_flags + sra_flags)} without --align: training {alone}; pass --align "
                         f"{args.align},vae-repa to add VAE-REPA")
    names = [] if args.align.strip() == "none" else [n.strip() for n in args.align.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown or not names and args.align.strip() != "none":
        error(f"--align {args.align}: expected a comma-separated set of {', '.join(METHOD_NAMES)}, or none")
    if repa_flags and "repa" not in names:
        error(f"{', '.join(repa_flags)} configure REPA, which --align {args.align} does not include")
    if sra_flags and "sra" not in names:
        error(f"{', '.join(sra_flags)} configure SRA, which --align {args.align} does not include")
    notes += peers.resolve(args, peer)

    from alignment.repa import Repa

    for key, value in method_defaults(args.model).items():  # None: not given (an empty --enc-type neither)
        if getattr(args, key) is None or (key == "enc_type" and not args.enc_type):
            setattr(args, key, value)
    if "repa" in names:
        try:
            z_dims = Repa(args.enc_type).z_dims
        except ValueError as e:
            error(str(e))
        if args.projector_embed_dims is not None:
            given = [int(d) for d in str(args.projector_embed_dims).split(",")]
            if given != z_dims:
                error(f"--projector-embed-dims {args.projector_embed_dims} disagrees with --enc-type "
                      f"{args.enc_type}, whose widths are {','.join(map(str, z_dims))}")
        args.projector_embed_dims = ",".join(map(str, z_dims))
    for name, coeff in (("vae-repa", args.vae_repa_coeff), ("repa", args.proj_coeff), ("sra", args.sra_coeff)):
        if name in names and coeff == 0:
            names.remove(name)  # an unused head would also break DDP
            notes.append(f"{name}: weight 0, so it is off (no head is built)")
    args.align = [n for n in METHOD_NAMES if n in names]
    return notes


def upgrade_run_args(run_args: dict) -> dict:
    """Run arguments of checkpoints written before the method set existed (`align` a bool, VAE-REPA's depth in
    `encoder_depth`, its weight in `proj_coeff`, `align_*` / `head_*` names) in today's names."""
    if not isinstance(run_args.get("align", True), bool):
        return run_args
    new = dict(run_args)
    new["align"] = ["vae-repa"] if run_args.get("align", True) and run_args.get("proj_coeff", 1.0) != 0 else []
    renames = {"encoder_depth": "vae_repa_depth", "proj_coeff": "vae_repa_coeff", "align_loss": "vae_repa_loss",
               "align_beta": "vae_repa_beta", "align_t_range": "vae_repa_t_range", "align_target": "vae_repa_target",
               "head_layers": "vae_repa_head_layers", "head_width": "vae_repa_head_width"}
    for old, name in renames.items():
        if old in new:
            new[name] = new.pop(old)
    return new


def with_defaults(run_args: dict) -> dict:
    """A run's arguments (args.json, a checkpoint's `args`) in today's names, with every method key that an older
    run lacks set to its default for the run's model (method_defaults)."""
    a = dict(upgrade_run_args(run_args))
    for key, value in method_defaults(a["model"]).items():
        if key not in a or (key in EMPTY_MEANS_DEFAULT and not a[key]):
            a[key] = value
    return a


def build_methods(run_args: dict) -> list[AlignmentMethod]:
    """The methods a run's arguments (args.json, a checkpoint's `args`) switch on, in METHOD_NAMES order."""
    from alignment.repa import Repa
    from alignment.sra import Sra
    from alignment.vae_repa import VaeRepa

    a = with_defaults(run_args)
    methods: list[AlignmentMethod] = []
    for name in a["align"]:
        if name == "vae-repa":
            methods.append(VaeRepa(a["vae_repa_depth"], a["vae_repa_coeff"], a["vae_repa_loss"], a["vae_repa_beta"],
                                   tuple(a["vae_repa_t_range"]), a["vae_repa_target"], a["vae_repa_head_layers"],
                                   a["vae_repa_head_width"]))
        elif name == "repa":
            methods.append(Repa(a["enc_type"], a["encoder_depth"], a["proj_coeff"], enc_weights=a["enc_weights"],
                                enc_source=a["enc_source"]))
        elif name == "sra":
            methods.append(Sra(a["sra_student_depth"], a["sra_teacher_depth"], a["sra_t_max"], a["sra_coeff"],
                               a["sra_decay_after"], a["sra_decay_epochs"], a["sra_loss"], a["sra_beta"],
                               a["sra_teacher_precision"]))
        else:
            raise ValueError(f"unknown alignment method {name!r} in the run's arguments")
    return methods


def head_specs(methods: list[AlignmentMethod], hidden_size: int, patch_size: int, channels: int,
               depth: int) -> list[HeadSpec]:
    return [spec for m in methods for spec in m.head_specs(hidden_size, patch_size, channels, depth)]


# Run arguments that determine the architecture (backbone and alignment heads); saved in every checkpoint.
ARCH_KEYS = ("model", "depth", "hidden_size", "num_heads", "qk_norm", "num_classes", "latent_shape", "align",
             "vae_repa_depth", "vae_repa_head_layers", "vae_repa_head_width", "enc_type", "encoder_depth",
             "sra_student_depth", "sra_teacher_depth")


def model_from_args(args: dict, with_heads: bool = True) -> torch.nn.Module:
    """Build the backbone (SiT or LightningDiT) a run describes (keys of ARCH_KEYS), with the heads of its
    alignment methods; `with_heads=False` builds the backbone only."""
    from models import build_model

    channels, size, _ = args["latent_shape"]
    config = model_config(args["model"])
    config.update({k: args[k] for k in ("depth", "hidden_size") if args.get(k) is not None})
    heads = []
    if with_heads:
        heads = head_specs(build_methods(args), config["hidden_size"], config["patch_size"], channels,
                           config["depth"])
    return build_model(
        args["model"],
        input_size=size,
        in_channels=channels,
        num_classes=args["num_classes"],
        depth=args.get("depth"),
        hidden_size=args.get("hidden_size"),
        num_heads=args.get("num_heads"),
        qk_norm=args.get("qk_norm", False),
        vae_head_layers=0,
        heads=heads,
    )
