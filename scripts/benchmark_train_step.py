"""One configuration of scripts/benchmark_train.py: its model, EMA, methods and optimizer set up as train.py sets
them up, its training step on synthetic latents (and images), and FLOP counts of that step."""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment import build_methods, model_from_args  # noqa: E402
from devices import ddp_options  # noqa: E402
from loss import LossConfig, training_loss  # noqa: E402
from models import model_config, model_family  # noqa: E402
from models.encoders import FrozenEncoder  # noqa: E402
from profiling import PhaseTimer  # noqa: E402
from training.loop import update_ema  # noqa: E402

SDPA_BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def latent_shape(name: str, args) -> list[int]:
    """SD-VAE latents (4 x side x side), or VA-VAE's of the same images (32 x side/2 x side/2) for patch-1 models."""
    if model_config(name)["patch_size"] == 1:
        return [32, args.latent_size // 2, args.latent_size // 2]
    return [4, args.latent_size, args.latent_size]


def loss_config(name: str) -> LossConfig:
    """Each family's own objective: LightningDiT's logit-normal time and velocity cosine term, SiT's defaults."""
    if model_family(name) == "LightningDiT":
        return LossConfig(weighting="logit-normal", cos_coeff=1.0)
    return LossConfig()


def config_args(name: str, align: str, args, sra_teacher_precision: str | None = None) -> dict:
    """The run arguments (as train.py records them) of one configuration; `sra_teacher_precision` (fp32 or autocast)
    for a set with SRA (None: train.py's default, fp32)."""
    names = [] if align == "none" else align.split(",")
    run_args = dict(model=name, depth=args.depth, hidden_size=args.hidden_size, num_heads=args.num_heads,
                    num_classes=1000, latent_shape=latent_shape(name, args), align=names,
                    enc_type=args.enc_type, enc_weights=args.enc_weights,
                    sra_teacher_precision=sra_teacher_precision or "fp32")
    if args.depth is not None:  # a shrunk model: keep every method's block inside it
        run_args.update(encoder_depth=min(8, args.depth), vae_repa_depth=min(2, args.depth),
                        sra_student_depth=min(4, args.depth), sra_teacher_depth=args.depth)
    return run_args


def build(name: str, align: str, args, device: torch.device, sra_teacher_precision: str | None = None):
    """Model, EMA and the methods, set up as train.py does (REPA's encoder random unless --enc-weights)."""
    run_args = config_args(name, align, args, sra_teacher_precision)
    torch.manual_seed(0)
    model = model_from_args(run_args).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    methods = build_methods(run_args)
    image_size = args.latent_size * 8
    for method in methods:
        if method.name == "repa" and args.enc_weights is None:
            import timm

            method.encoders = [FrozenEncoder(timm.create_model(spec.timm_name, pretrained=False, img_size=224,
                                                               num_classes=0), image_size).to(device)
                               for spec in method.specs]
            method.autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None
        else:
            method.setup(device, model, image_size, torch.bfloat16 if args.precision == "bf16" else None)
    return model, ema, methods


def count_flops(fn) -> int:
    """FLOPs of fn() by FlopCounterMode, with the math attention kernel (every backend counts the same)."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()


def fake_train_flops(name: str, align: str, args, batch: int = 2) -> float:
    """Forward + backward FLOPs per image of a configuration without REPA's encoder, counted on fake tensors (shapes
    only: no memory, no arithmetic), so full-size models count in seconds anywhere."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    run_args = config_args(name, align, args)
    methods = build_methods(run_args)
    if any("images" in m.needs for m in methods):
        raise ValueError("fake_train_flops: REPA's encoder is not built on fake tensors")
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model_from_args(run_args)
        inputs = {"epoch": 0}
        if any("teacher" in m.needs for m in methods):
            inputs["teacher"] = copy.deepcopy(model).requires_grad_(False).eval()
        x = torch.randn(batch, *latent_shape(name, args))
        y = torch.randint(0, 1000, (batch,))
        return count_flops(lambda: training_loss(model, x, y, loss_config(name), model.null_class, methods,
                                                 **inputs)["total"].backward()) / batch


class TrainStep:
    """`name` with the method set `align` at per-GPU batch `b`: what train.py does per optimizer step (autocast forward
    with the methods' terms, backward, clipping, fused AdamW on CUDA, EMA) on one fixed synthetic batch; SRA's teacher
    in `sra_teacher_precision` (train.py's --sra-teacher-precision; None: its default, fp32)."""

    def __init__(self, name: str, align: str, b: int, args, device: torch.device,
                 sra_teacher_precision: str | None = None):
        self.model, self.ema, self.methods = build(name, align, args, device, sra_teacher_precision)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0, fused=device.type == "cuda")
        self.net = self.model
        if args.compile and args.compile_unit == "block":  # as train.py: each block and head, before DDP
            torch._dynamo.config.optimize_ddp = False
            self.model.compile_blocks(mode=args.compile_mode)
        if args.ddp:  # as train.py wraps it, in a process group of one
            self.net = torch.nn.parallel.DistributedDataParallel(self.net, **ddp_options())
        if args.compile and args.compile_unit == "model":  # the whole model (as train.py did before)
            self.net = torch.compile(self.net, mode=args.compile_mode)
        self.config = loss_config(name)
        self.x = torch.randn(b, *latent_shape(name, args), device=device)
        self.y = torch.randint(0, 1000, (b,), device=device)
        needs = set().union(*(m.needs for m in self.methods))
        self.inputs = {"epoch": 0}
        if "images" in needs:
            self.inputs["images"] = torch.randint(0, 256, (b, 8 * args.latent_size, 8 * args.latent_size, 3),
                                                  device=device, dtype=torch.uint8)
        if "teacher" in needs:
            self.inputs["teacher"] = self.ema
        self.dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        self.autocast = args.precision == "bf16"
        self.backend = SDPA_BACKENDS[args.sdpa_backend]
        self.device = device

    def forward(self, module: torch.nn.Module | None = None) -> dict:
        """The loss terms of the batch through `module` (default: the model as trained, compiled or not)."""
        module = self.net if module is None else module
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast), \
                sdpa_kernel(self.backend) if self.backend is not None else contextlib.nullcontext():
            return training_loss(module, self.x, self.y, self.config, self.model.null_class, self.methods,
                                 **self.inputs)

    def __call__(self, timer: PhaseTimer | None = None) -> None:
        """One optimizer step, its phases marked on `timer` when given."""
        mark = timer.mark if timer is not None else (lambda name: None)
        if timer is not None:
            timer.start()
        out = self.forward()
        mark("forward")  # the model and the methods' loss terms
        out["total"].backward()  # the attention backward follows the kernel the forward chose
        mark("backward")
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        mark("clip")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        mark("optimizer")
        update_ema(self.ema, self.model, 0.9999)
        mark("ema")

    def flops_per_image(self) -> tuple[float, float]:
        """(forward FLOPs, forward + backward FLOPs) per image, counted on the uncompiled model."""
        b = len(self.x)
        forward_flops = count_flops(lambda: self.forward(self.model)) / b
        train_flops = count_flops(lambda: self.forward(self.model)["total"].backward()) / b
        self.model.zero_grad(set_to_none=True)
        return forward_flops, train_flops
