"""Export a train.py checkpoint for sharing: EMA weights as .safetensors, or REPA's checkpoint layout.

    python scripts/export.py --ckpt runs/SiT-XL-2-vae-repa                         # -> .../0400000.safetensors
    python scripts/export.py --ckpt runs/SiT-XL-2-vae-repa/checkpoints/0400000.pt --format repa

safetensors: the EMA weights (heads included), and the run's arguments as JSON in the metadata ("args"), which is
all `generate.py --ckpt FILE.safetensors` needs. The format holds tensors only, so opening it runs nothing.
repa: REPA's layout {"model", "ema", "opt", "args", "steps"}, read by REPA's scripts (`ckpt["ema"]`) and by
generate.py. Weights keep the names REPA's SiT has (backbone, REPA projectors); our VAE-REPA and SRA heads are left out.
The optimizer state is renumbered in the order of REPA's parameters (its frozen position embedding first, its
projectors before the final layer), so that REPA's `--resume-step` loads it; a run without REPA's projectors has no
state REPA's model could take (REPA's SiT always has them), and its export holds no "opt".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402
from cli import TRUST_FLAG, TRUST_HELP  # noqa: E402

FORMATS = ("safetensors", "repa")
REPA_DROP = ("vae_projector.", "ap_head.")  # heads REPA's SiT has no names for (VAE-REPA, SRA): left out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser(__doc__)
    p.add_argument("--ckpt", required=True,
                   help="a train.py checkpoint (NNNNNNN.pt), or a run directory: then its highest step")
    p.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="safetensors: EMA weights + run arguments in the metadata (for sharing); repa: REPA's "
                        "checkpoint layout")
    p.add_argument("--out", default=None,
                   help="output file (default: beside the checkpoint, <step>.safetensors or <step>-repa.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (without it: refuse)")
    p.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before torch is imported

from checkpoints import CHECKPOINT_FORMAT, atomic_save, list_checkpoints, load_checkpoint, write_safetensors  # noqa: E402
from cli import UsageError  # noqa: E402
from models.registry import model_config  # noqa: E402


def resolve(path: Path) -> Path:
    if path.is_dir():
        steps = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if not steps:
            raise UsageError(f"--ckpt {path}: a directory without step checkpoints (checkpoints/NNNNNNN.pt)")
        return steps[max(steps)]
    if not path.is_file():
        raise UsageError(f"--ckpt {path}: no such file or directory")
    return path


def repa_layout(checkpoint: dict) -> dict:
    """REPA's checkpoint dict. `args` is a dict of plain values, not REPA's Namespace: REPA's scripts never read it,
    and a dict opens with torch.load(weights_only=True), the default since torch 2.6 (a Namespace does not)."""
    args = dict(checkpoint["args"])
    channels, side, _ = args["latent_shape"]
    if channels != 4:
        raise UsageError(f"--format repa: REPA's layout describes SD-VAE latents (4 channels), this run has "
                         f"{channels}; use --format safetensors")
    if not args["model"].startswith("SiT-"):
        raise UsageError(f"--format repa: REPA's layout holds a SiT, this run trained {args['model']}; use --format "
                         "safetensors")
    registry = model_config(args["model"])
    custom = [k for k in ("depth", "hidden_size", "num_heads") if args.get(k) not in (None, registry[k])]
    if custom:
        raise UsageError(f"--format repa: REPA's layout names registry models only, this run overrides {custom}; "
                         "use --format safetensors")
    args.setdefault("resolution", side * 8)

    def weights(state: dict) -> dict:
        return {k: v for k, v in state.items() if not k.startswith(REPA_DROP)}

    layout = {"model": weights(checkpoint["model"]), "ema": weights(checkpoint["ema"]), "args": args,
              "steps": int(checkpoint["step"])}
    opt = repa_optimizer_state(checkpoint["opt"], args)
    if opt is not None:
        layout["opt"] = opt
    return layout


def repa_optimizer_state(opt: dict, run_args: dict) -> dict | None:
    """Our AdamW state renumbered for REPA's SiT: REPA's AdamW takes model.parameters(), whose order is the frozen
    `pos_embed` (a parameter of the root module, so first; no state, it never has a gradient), the embedders, the
    blocks, the projectors, then the final layer; our VAE-REPA and SRA heads have no place there. None when the run has
    no REPA projectors (REPA's model, built by its train.py, always has them)."""
    import torch

    from alignment import model_from_args

    with torch.device("meta"):  # the parameters' names and order, without memory
        names = [name for name, _ in model_from_args(run_args).named_parameters()]
    projectors = [n for n in names if n.startswith("projectors.")]
    if not projectors:
        return None
    groups = opt.get("param_groups", [])
    if len(groups) != 1 or len(groups[0]["params"]) != len(names):
        raise UsageError(f"--format repa: the checkpoint's optimizer state does not describe the run's model "
                         f"({len(names)} parameter tensors in one group)")
    group = groups[0]
    backbone = [n for n in names if not n.startswith(REPA_DROP + ("projectors.",))]
    final = next(i for i, n in enumerate(backbone) if n.startswith("final_layer."))
    repa_names = ["pos_embed", *backbone[:final], *projectors, *backbone[final:]]
    ours = {name: group["params"][i] for i, name in enumerate(names)}
    state = {j: opt["state"][ours[name]] for j, name in enumerate(repa_names) if ours.get(name) in opt["state"]}
    # REPA's AdamW(model.parameters(), lr, betas, weight_decay, eps): fused and foreach left to torch
    return {"state": state, "param_groups": [{**group, "fused": None, "foreach": None,
                                              "params": list(range(len(repa_names)))}]}


def export(args: argparse.Namespace) -> tuple[Path, bool]:
    """Write the export; returns its path and whether it holds an optimizer state."""
    ckpt = resolve(Path(args.ckpt))
    suffix = ".safetensors" if args.format == "safetensors" else "-repa.pt"
    out = Path(args.out) if args.out else ckpt.with_name(ckpt.stem + suffix)
    if (out.suffix == ".safetensors") != (args.format == "safetensors"):  # the loaders go by the suffix
        raise UsageError(f"--out {out}: a --format {args.format} file is read by its name, which must "
                         + ("end in .safetensors" if args.format == "safetensors" else "not end in .safetensors "
                            "(e.g. .pt)"))
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} exists; pass --overwrite to replace it")
    if out.resolve() == ckpt.resolve():
        raise UsageError(f"--out {out} is the checkpoint itself")
    if not out.resolve().parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
    try:
        checkpoint = load_checkpoint(ckpt, trust=args.trust_checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--ckpt: {e}") from e
    needed = {"format", "model", "ema", "opt", "step", "args"}
    if checkpoint.get("format") != CHECKPOINT_FORMAT or not needed <= set(checkpoint):
        raise UsageError(f"--ckpt {ckpt}: not a train.py checkpoint (it lacks {sorted(needed - set(checkpoint))})")
    if args.format == "safetensors":
        try:
            json.dumps(checkpoint["args"])  # fail here, before writing, if the arguments are not JSON
        except (TypeError, ValueError) as e:
            raise UsageError(f"--ckpt {ckpt}: its arguments cannot be written as JSON ({e})") from e
    try:
        if args.format == "safetensors":
            write_safetensors(checkpoint["ema"], checkpoint["args"], checkpoint["step"], out)
        else:
            layout = repa_layout(checkpoint)
            atomic_save(layout, out)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write it ({e.strerror or e})") from e
    return out, args.format == "repa" and "opt" in layout


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out, has_opt = export(args)
    except UsageError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format})")
    if args.format == "repa" and not has_opt:
        print("no optimizer state in it: the run has no REPA projectors, which REPA's model always has, so REPA's "
              "--resume-step could not continue it (its EMA weights sample with REPA's generate.py and ours)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
