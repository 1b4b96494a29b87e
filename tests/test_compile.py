"""torch.compile as train.py uses it (the default on CUDA): the model's training forward, heads included, is one graph
without a break, and the training steps after the first reuse it. Traced on the CPU with dynamo's eager backend (no
code generation), so this runs in seconds anywhere; tests/test_gpu.py compares compiled and eager steps on CUDA."""

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
