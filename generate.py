"""Sample images from a SiT checkpoint (ours or REPA's) on one or many processes: a PNG folder and an ADM-format .npz.

    torchrun --nproc_per_node 8 generate.py --ckpt runs/vae-repa-xl --cfg-scale 1.8 --guidance-high 0.7

Sample i depends only on (--global-seed, i): its label, initial noise and SDE noise come from generators seeded
by that pair, so the images do not depend on the number of processes or the batch size, and a killed run
resumes where it stopped (PNGs that exist are kept). Layout, for --sample-dir samples:

    samples/<name>/000000.png ...   one PNG per sample, written atomically
    samples/<name>/config.json      the sampling configuration; a different one in the same folder is an error
    samples/<name>.npz              arr_0: uint8 (N, H, W, 3), what ADM's evaluator reads
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import cli
from cli import CFG_CHANNELS_HELP, MODEL_NAMES, PATH_TYPES, PIXEL_ROUNDINGS, TRUST_FLAG, TRUST_HELP, cfg_channels
from latent_data.format import REPA_DEFAULTS  # torch-free


def build_parser() -> argparse.ArgumentParser:
    """The command line (no torch import: `--help` and usage errors answer at once)."""
    p = cli.parser(__doc__)
    _checkpoint_flags(p)
    _sampler_flags(p)
    _sample_flags(p)
    _hardware_flags(p)
    _repa_flags(p)
    return p


def _checkpoint_flags(p: argparse.ArgumentParser) -> None:
    """The checkpoint flags."""
    g = p.add_argument_group("checkpoint")
    g.add_argument("--ckpt", required=True,
                   help="checkpoint file (ours, REPA's, or a .safetensors export of EMA weights), or a run directory: "
                        "then the highest step in checkpoints/")
    g.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)
    g.add_argument("--no-ema", action="store_true", help="sample from the online weights instead of the EMA weights")
    g.add_argument("--model", choices=MODEL_NAMES, default=None, metavar="NAME",
                   help=f"REPA's and LightningDiT's checkpoints only: architecture, one of {', '.join(MODEL_NAMES)}; "
                        f"LightningDiT-* reads LightningDiT's released checkpoints (with --vae, --latent-stats) "
                        f"(default: the checkpoint's args, else SiT-XL/2)")
    g.add_argument("--resolution", type=int, default=None,
                   help="REPA-format checkpoints only: image side in pixels; latent side = resolution // 8 "
                        "(default: the checkpoint's args, else 256)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="REPA-format checkpoints only: number of classes (default: the checkpoint's args, else 1000)")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="REPA-format checkpoints only: the model uses qk-norm "
                        "(default: the checkpoint's args, else off)")
    g.add_argument("--encoder-depth", type=int, default=None,
                   help="REPA's flag: the block of REPA's projectors. Sampling does not run them, so it only is "
                        "checked against the checkpoint (a note when they disagree)")
    g.add_argument("--projector-embed-dims", default=None,
                   help="REPA's flag: its projectors' widths, comma-separated (e.g. 768); checked against the "
                        "checkpoint's projector weights like --encoder-depth")
    g.add_argument("--vae", default=None,
                   help=f"VAE id on the Hugging Face hub or local folder; 'ema' / 'mse' mean stabilityai/sd-vae-ft-*; "
                        f"or an LDM-format file (VA-VAE's vavae-imagenet256-f16d32-dinov2.pt) "
                        f"(default: the checkpoint's args, else {REPA_DEFAULTS['vae']})")
    g.add_argument("--latent-stats", default=None,
                   help="LightningDiT's released checkpoints only: its latents_stats.pt (channel-wise mean and std) "
                        "(default: latents_stats.pt or *latents-stats.pt beside the --vae weights)")


def _sampler_flags(p: argparse.ArgumentParser) -> None:
    """The sampler flags."""
    g = p.add_argument_group("sampler")
    g.add_argument("--mode", choices=("sde", "ode"), default="sde",
                   help="sde: REPA's Euler-Maruyama sampler; ode: Euler (or Heun) probability-flow ODE")
    g.add_argument("--num-steps", type=int, default=250, help="number of sampler steps")
    g.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False,
                   help="ODE only: Heun's second-order corrector")
    g.add_argument("--time-shift", type=float, default=1.0,
                   help="ODE only: timestep shift of the grid, t' = s t / (1 + (s - 1) t) (1: uniform; > 1: more "
                        "steps near the noise). LightningDiT's timestep_shift a is 1/a here (its 0.3: 1/0.3 = "
                        "3.3333333333333335; 3.33 is another grid)")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1: no guidance)")
    g.add_argument("--cfg-channels", type=cfg_channels, default="all", metavar="all|N", help=CFG_CHANNELS_HELP)
    g.add_argument("--guidance-low", "--guidance_low", type=float, default=0.0,
                   help="guidance applies at times t >= this (t = 1 is noise)")
    g.add_argument("--guidance-high", "--guidance_high", type=float, default=1.0,
                   help="guidance applies at times t <= this (paper, guided XL: 0.7)")
    g.add_argument("--path-type", choices=PATH_TYPES, default=None,
                   help="interpolant the model was trained with (default: the checkpoint's args, else linear)")


def _sample_flags(p: argparse.ArgumentParser) -> None:
    """The samples flags."""
    g = p.add_argument_group("samples")
    g.add_argument("--num-fid-samples", type=int, default=50_000, help="number of images")
    g.add_argument("--label-sampling", choices=("balanced", "random"), default="random",
                   help="random: a uniform class drawn from (global seed, i), the protocol of REPA and the paper; "
                        "balanced: sample i has class i %% num_classes (50 per class for 50K samples; this lowers "
                        "FID a little, so do not compare it with random-label figures)")
    g.add_argument("--global-seed", type=int, default=0, help="seed; sample i depends only on (seed, i)")
    g.add_argument("--per-proc-batch-size", type=int, default=64, help="images per batch on each process")
    g.add_argument("--pixel-rounding", choices=PIXEL_ROUNDINGS, default="repa",
                   help="decoder output x in [-1, 1] -> 8-bit pixels: repa = floor(127.5 x + 127.5) (REPA's "
                        "generate.py, the paper's protocol); dit = floor(127.5 x + 128) (DiT's and SiT's). FID and "
                        "the other metrics see these bytes: compare figures made with the same rounding")
    g.add_argument("--sample-dir", default="samples",
                   help="parent folder; samples go to <sample-dir>/<name derived from checkpoint and settings>")


def _hardware_flags(p: argparse.ArgumentParser) -> None:
    """The hardware flags."""
    g = p.add_argument_group("hardware")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="SiT forward precision (bf16 autocast, with the matmul weights stored in bf16 once, which "
                        "gives the same outputs; or fp32). Integration is float64 and VAE decoding fp32 either way; "
                        "auto: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model: two graphs, the guided and the unguided batch, compiled when "
                        "first met (a last partial batch is filled up to the full size). "
                        "Samples change only within the precision's rounding, as with another batch size, so it is "
                        "not part of the folder name (default: on with CUDA, off on the CPU)")
    g.add_argument("--device", default=None,
                   help="cuda or cpu (default: cuda when available); under torchrun each process takes cuda:LOCAL_RANK")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=False,
                   help="REPA's flag: TF32 matmuls on CUDA (faster, less precise; on in REPA by default, off here so "
                        "that fp32 sampling is fp32). Recorded in the folder name and config.json")


def _repa_flags(p: argparse.ArgumentParser) -> None:
    """The REPA's other flags flags."""
    g = p.add_argument_group("REPA's other flags")
    g.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=None,
                   help="accepted: attention always runs as F.scaled_dot_product_attention here, the same sums, so it "
                        "changes nothing (a note says so)")
    g.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=False,
                   help="REPA's conversion of its pre-release checkpoints: not supported (refused with a message)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for flag in ("--num-fid-samples", "--per-proc-batch-size", "--num-steps"):
        if getattr(args, flag[2:].replace("-", "_")) < 1:
            p.error(f"{flag} must be positive, got {getattr(args, flag[2:].replace('-', '_'))}")
    if args.legacy:
        p.error("--legacy converts REPA's pre-release checkpoint layout, which this generate.py does not read; load "
                "the file with REPA's utils.load_legacy_checkpoints, save its state dict as {'ema': ...}, and pass "
                "that file (without --legacy)")
    if args.global_seed < 0:
        p.error("--global-seed must be non-negative")
    if args.cfg_scale < 1.0:
        p.error(f"--cfg-scale must be >= 1 (1 means no guidance), got {args.cfg_scale}")
    if not 0.0 <= args.guidance_low <= args.guidance_high <= 1.0:
        p.error("need 0 <= --guidance-low <= --guidance-high <= 1")
    if not args.time_shift > 0 or args.time_shift != 1 and args.mode != "ode":
        p.error(f"--time-shift {args.time_shift}: must be positive, and applies to --mode ode only")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        p.error(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.num_classes is not None and args.num_classes < 1:
        p.error("--num-classes must be positive")
    if args.device is not None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
            p.error(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    return args


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before torch is imported (main parses again: cheap)

import torch
from tqdm import tqdm

import samplers
from cli import UsageError
from devices import barrier, end_processes, init_processes, on_rank0, resolve_compile, together
from latent_codecs.autoencoder import load_vae
from sampling.batch import SamplingSettings, sample_batch
from sampling.checkpoint import load_model, resolve_checkpoint, verify_checkpoint
from sampling.folder import (
    folder_name,
    merge_npz_parts,
    npz_count,
    part_path,
    prepare_folder,
    sampling_config,
    write_npz,
    write_npz_part,
)
from sampling.images import save_png


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world = 0, 1
    try:
        rank, world, device = init_processes(args.device)
        return _generate(args, rank, world, device)
    except (UsageError, OSError) as e:
        prefix = f"[rank {rank}] " if world > 1 else ""
        cli.print_error(f"{prefix}generate.py: error: {e}")
        return 2
    finally:
        end_processes()


def _precision(args: argparse.Namespace, device: torch.device, log) -> str:
    """--precision resolved for the device, with "-tf32" when REPA's --tf32 changes the images (it is in the name)."""
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if args.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # REPA's --tf32
        precision += "-tf32"  # in the folder name and config.json: the images differ
    elif args.tf32:
        log("note: --tf32 changes nothing on the CPU")
    if args.fused_attn is not None:
        log(f"note: --{'' if args.fused_attn else 'no-'}fused-attn changes nothing here: attention always runs as "
            "F.scaled_dot_product_attention")
    return precision


def _load(args: argparse.Namespace, rank: int, world: int, log) -> tuple[Path, torch.nn.Module, dict, torch.nn.Module]:
    """The checkpoint's path, its backbone, what sampling needs to know of its run, and the VAE, checked together."""
    ckpt = resolve_checkpoint(args.ckpt)
    on_rank0(lambda: verify_checkpoint(ckpt), rank, world)  # the whole file hashed once, the other ranks wait
    model, info = load_model(args, ckpt, verify=False)
    for note in info["notes"]:
        log(f"note: {note}")
    vae = on_rank0(lambda: load_vae(info["vae"]), rank, world, then_others=True)  # rank 0 downloads it once
    info["image_size"] = info["arch"]["latent_shape"][1] * 2 ** (len(vae.config.block_out_channels) - 1)
    if vae.config.latent_channels != info["arch"]["latent_shape"][0]:
        raise UsageError(f"--vae {info['vae']}: {vae.config.latent_channels} latent channels, the model "
                         f"expects {info['arch']['latent_shape'][0]}")
    cli.check_cfg_channels("--cfg-channels", args.cfg_channels, info["arch"]["latent_shape"][0])
    if info["format"] == "vae-repa" and args.resolution not in (None, info["image_size"]):
        raise UsageError(f"--resolution {args.resolution} contradicts checkpoint {ckpt}, whose images are "
                         f"{info['image_size']} px; drop the flag (it is only for REPA-format checkpoints)")
    return ckpt, model, info, vae


def _sample(net: torch.nn.Module, vae: torch.nn.Module, mine: list[int], args: argparse.Namespace, info: dict,
            device: torch.device, precision: str, folder: Path, compiled: bool, bar: tqdm, world: int) -> None:
    """Sample this rank's indices batch by batch into `folder`; PNG encoding overlaps the next batch."""
    settings = SamplingSettings.from_args(args)
    batch = args.per_proc_batch_size
    saves: list[Future] = []
    with ThreadPoolExecutor(4) as pool:
        for b in range(0, len(mine), batch):
            indices = mine[b:b + batch]
            # compiled: a last partial batch after full ones is filled up with copies of its last sample, so that it
            # runs their graphs instead of compiling two more (each sample depends only on its own index)
            fill = batch - len(indices) if compiled and b > 0 else 0
            padded = indices + indices[-1:] * fill
            images = sample_batch(net, vae, padded, settings, info, device, precision)[:len(indices)]
            for future in saves:
                future.result()
            saves = [pool.submit(save_png, image, folder / f"{i:06d}.png") for i, image in zip(indices, images)]
            bar.update(min(len(indices) * world, bar.total - bar.n))  # rank 0 extrapolates to all ranks
        for future in saves:
            future.result()


def _generate(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    precision = _precision(args, device, log)
    ckpt, model, info, vae = _load(args, rank, world, log)
    name = folder_name(args, ckpt, info, info["image_size"], precision)
    folder = Path(args.sample_dir) / name
    npz_path = Path(args.sample_dir) / f"{name}.npz"
    config = on_rank0(lambda: sampling_config(args, info, model, vae, precision), rank, world)
    sources = {"ckpt": str(ckpt.resolve()), "vae": info["vae"]}
    pending = on_rank0(lambda: prepare_folder(folder, npz_path, args.num_fid_samples, config, sources), rank, world)
    mine = pending[rank::world]  # every world-th missing index: the images do not depend on the split
    compiled = resolve_compile(args.compile, device)
    net = samplers.sampling_model(model.to(device), precision, compiled)  # after the weights' digest
    vae.to(device)
    log(f"Sampling {len(pending)} of {args.num_fid_samples} images ({args.num_fid_samples - len(pending)} already "
        f"there) from {ckpt} ({info['arch']['model']}, {'online' if args.no_ema else 'EMA'} weights) on {world} "
        f"process(es), {precision}{', compiled' if compiled else ''}, into {folder}")

    start = time.time()
    with tqdm(total=len(pending), unit="img", desc="sampling", disable=rank != 0, dynamic_ncols=True) as bar:
        _sample(net, vae, mine, args, info, device, precision, folder, compiled, bar, world)
    elapsed = time.time() - start
    barrier(world)

    def finish() -> tuple[int, ...] | None:
        """Rank 0: the .npz's shape once it holds every sample (written here by a single process), or None."""
        missing = [i for i in range(args.num_fid_samples) if not (folder / f"{i:06d}.png").is_file()]
        if missing:
            raise UsageError(f"{len(missing)} samples missing in {folder} (first: {missing[0]:06d}.png)")
        if npz_count(npz_path) == args.num_fid_samples and not pending:
            return (args.num_fid_samples, info["image_size"], info["image_size"], 3)
        return write_npz(folder, args.num_fid_samples, npz_path) if world == 1 else None

    shape = on_rank0(finish, rank, world)
    if shape is None:  # several processes: each reads its share of the PNGs, rank 0 joins the shares in order
        log(f"Reading the PNGs into {npz_path} on {world} processes")
        try:
            together(lambda: write_npz_part(folder, args.num_fid_samples, rank, world), world)
            shape = on_rank0(lambda: merge_npz_parts(folder, args.num_fid_samples, world, npz_path), rank, world)
        except Exception:
            part_path(folder, rank, world).unlink(missing_ok=True)  # the PNGs stay; no share is left behind
            raise
    rate = len(pending) / elapsed if elapsed > 0 else 0.0
    log(f"Done: {len(pending)} new images in {elapsed:.1f}s ({rate:.2f} img/s on {world} process(es)); "
        f"{args.num_fid_samples} PNGs in {folder}; {npz_path} holds arr_0 {tuple(shape)} uint8")
    # Leave together: a rank that tears its process group down while another is still in the last broadcast can
    # abort it (seen with gloo: "terminate called without an active exception").
    barrier(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
