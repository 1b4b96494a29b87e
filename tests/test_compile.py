"""torch.compile as train.py uses it (the default on CUDA): the model's training forward, heads included, is one graph
without a break, and the training steps after the first reuse it. Traced on the CPU with dynamo's eager backend (no
code generation), so this runs in seconds anywhere; tests/test_gpu.py compares compiled and eager steps on CUDA."""

import copy

import pytest
import torch
import torch._dynamo as dynamo

from alignment import build_methods, model_from_args
from loss import LossConfig, training_loss

pytestmark = pytest.mark.usefixtures("one_thread")
# A tiny SiT on SD-VAE-shaped latents (4 x 8 x 8) and a tiny LightningDiT on VA-VAE-shaped ones (32 x 4 x 4).
MODELS = {"SiT-S/2": [4, 8, 8], "LightningDiT-B/1": [32, 4, 4]}


def tiny(name: str, align: list[str]):
    run_args = dict(model=name, depth=3, hidden_size=32, num_heads=2, num_classes=10, latent_shape=MODELS[name],
                    align=align, vae_repa_depth=2, sra_student_depth=2, sra_teacher_depth=3)
    return model_from_args(run_args).train(), build_methods(run_args)


@pytest.mark.parametrize("align", [[], ["vae-repa"]], ids=["none", "vae-repa"])
@pytest.mark.parametrize("name", list(MODELS))
def test_training_forward_is_one_graph_without_breaks(name, align):
    model, methods = tiny(name, align)
    x, t, y = torch.randn(2, *MODELS[name]), torch.rand(2), torch.randint(0, 10, (2,))
    dynamo.reset()
    explained = dynamo.explain(model)(x, t, y, return_heads=bool(methods))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), [r.reason for r in explained.break_reasons]

    # As the loop runs it: the compiled model inside training_loss under autocast, forward and backward, twice.
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    dynamo.reset()
    net = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: a break would raise here
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = training_loss(net, x, y, LossConfig(), model.null_class, methods, epoch=0)
        out["total"].backward()
        assert torch.isfinite(out["total"])
    assert len(graphs) == 1  # the second step reused the first step's graph: no recompilation
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("vae_projector."))
    dynamo.reset()


# ----------------------------------------------------------------------------------------------
# The blocks a method runs besides the student: SRA's EMA teacher, REPA's DINOv2


def counter(graphs: list):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def test_the_sra_teachers_blocks_compile_apart_and_the_ema_stays_what_it_was():
    """--compile compiles the EMA's blocks up to SRA's teacher block in place, counted apart from the student's: the
    teacher's tokens equal the eager EMA's, the EMA update and its state-dict keys (the checkpoint's `ema`) are
    unchanged, and the copies the evaluation makes (deepcopy, samplers.matmul_weights_copy) run eagerly on their own
    weights, never through the training EMA's compiled blocks."""
    from samplers import matmul_weights_copy
    from training.loop import update_ema

    model, methods = tiny("SiT-S/2", ["sra"])
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # as training/setup.py builds it
    eager_model, eager_ema = copy.deepcopy(model), copy.deepcopy(ema)
    x, y = torch.randn(2, *MODELS["SiT-S/2"]), torch.randint(0, 10, (2,))
    student, teacher = [], []
    dynamo.reset()
    model.compile_blocks(backend=counter(student))
    assert methods[0].compile_blocks(ema, backend=counter(teacher)) == 3  # sra_teacher_depth
    losses = {}
    for name, (net, avg) in {"compiled": (model, ema), "eager": (eager_model, eager_ema)}.items():
        torch.manual_seed(0)
        for _ in range(2):
            out = training_loss(net, x, y, LossConfig(), net.null_class, methods, epoch=0, teacher=avg)
            out["total"].backward()
            update_ema(avg, net, 0.5)
        losses[name] = out["sra_loss"]
    assert 1 <= len(teacher) <= 3 and 1 <= len(student) <= len(model.blocks) + len(model.head_taps)
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-6, atol=1e-6)
    assert list(ema.state_dict()) == list(eager_ema.state_dict())
    for key, p in eager_ema.state_dict().items():
        torch.testing.assert_close(ema.state_dict()[key], p, rtol=1e-6, atol=1e-6, msg=key)
    with torch.no_grad():
        t = torch.rand(3)
        x3, y3 = torch.randn(3, *MODELS["SiT-S/2"]), torch.randint(0, 10, (3,))
        torch.testing.assert_close(ema.forward_tokens(x3, t, y3, 3), eager_ema.forward_tokens(x3, t, y3, 3),
                                   rtol=1e-6, atol=1e-6)
        count = len(teacher)
        for copy_of in (copy.deepcopy, matmul_weights_copy):
            twin = copy_of(ema)
            for p in (*twin.parameters(), *twin.buffers()):
                p.zero_()
            with torch.autocast("cpu", dtype=torch.bfloat16):  # matmul_weights_copy's bf16 weights need it
                assert torch.count_nonzero(twin.forward_tokens(x3, t, y3, 3)) == 0  # its own (zeroed) weights
            assert torch.count_nonzero(ema.forward_tokens(x3, t, y3, 3)) > 0  # the training EMA's are intact
        assert len(teacher) == count  # the copies compiled nothing: they are eager
    dynamo.reset()


def test_repas_dinov2_blocks_compile_apart_and_give_the_eager_features():
    """REPA's encoder: every DINOv2 block compiled in place (a timm DINOv2 architecture with random weights, 2 blocks),
    counted apart from the student's; the features equal the eager encoder's."""
    import timm

    from alignment.repa import Repa
    from models.encoders import FrozenEncoder

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=0, depth=2)
    repa = Repa("dinov2-vit-s", depth=1)
    repa.encoders, repa.autocast_dtype = [FrozenEncoder(vit, 256)], None
    eager = copy.deepcopy(repa.encoders[0])
    graphs = []
    dynamo.reset()
    assert repa.compile_blocks(None, backend=counter(graphs)) == 2
    images = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    feats = repa.encode(images)[0]
    assert 1 <= len(graphs) <= 2
    assert feats.shape == (2, 256, 384)
    torch.testing.assert_close(feats, eager(images), rtol=1e-5, atol=1e-5)
    assert list(repa.encoders[0].state_dict()) == list(eager.state_dict())
    dynamo.reset()
