"""profiling.py: the phase timers against known durations, the kinds of kernels and operators, and a CPU profile's
sums; on CUDA, a profile of known work."""

import subprocess
import time

import pytest
import torch

import profiling


@pytest.mark.parametrize("name, kind", [
    # CUDA kernels, as an H100 trace names them (eager and torch.compile)
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<72, 128, 64, 4> >(Flash_fwd_params)", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "attention"),
    ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matmul"),
    ("triton_tem_fused_addmm_0", "matmul"),
    ("triton_per_fused_native_layer_norm_native_layer_norm_backward_12", "norm"),
    ("triton_poi_fused__to_copy_add_mul_3", "fused (compiled)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void at::native::multi_tensor_apply_kernel<TensorListMetadata<2>, LerpFunctor<float>, float>", "foreach"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda(at::TensorIterator&)>",
     "copy"),
    ("Memcpy HtoD (Pageable -> Device)", "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float> > >",
     "reduction"),
    # CPU operators: whole names, so a view is not an exponential and a normal draw not a norm
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::exp", "elementwise"), ("aten::gelu_backward",
                                                                                     "elementwise"),
    ("aten::add_", "elementwise"), ("aten::expand", "other"), ("aten::normal_", "other"), ("aten::view", "other"),
    ("aten::native_layer_norm", "norm"), ("aten::linalg_vector_norm", "reduction"), ("aten::_to_copy", "copy"),
    ("aten::_foreach_lerp_", "foreach"), ("aten::_fused_adamw_", "optimizer"),
])
def test_kinds_of_work(name, kind):
    assert profiling.category(name) == kind


def test_phase_timer_measures_known_durations():
    """Phases that sleep 10 and 40 ms: each median is at least its sleep, and not far above it."""
    timer = profiling.PhaseTimer(torch.device("cpu"))
    for _ in range(3):
        timer.start()
        time.sleep(0.01)
        timer.mark("short")
        time.sleep(0.04)
        timer.mark("long")
    medians = timer.medians_ms()
    assert list(medians) == ["short", "long"]
    assert 10 <= medians["short"] < 10 + 200 and 40 <= medians["long"] < 40 + 200


def test_summary_sums_by_kind_per_step():
    times = {"aten::mm": (3000.0, 6), "aten::addmm": (1000.0, 2), "aten::add_": (500.0, 10), "aten::view": (100.0, 4)}
    s = profiling.summarize(times, steps=2, wall_ms=5.0, top=2)
    assert s["by_kind_ms"] == {"matmul": 2.0, "elementwise": 0.25, "other": 0.05}
    assert s["busy_ms_per_step"] == pytest.approx(2.3) and s["busy_fraction"] == pytest.approx(2.3 / 5)
    assert [t["name"] for t in s["top"]] == ["aten::mm", "aten::addmm"]
    assert s["top"][0]["ms_per_step"] == 1.5 and s["top"][0]["calls_per_step"] == 3
    # a given busy time (the kernels' union) and a step time measured without the profiler
    s = profiling.summarize(times, steps=2, wall_ms=5.0, busy_us=4000.0, step_ms=4.0)
    assert s["busy_ms_per_step"] == 2.0 and s["busy_fraction"] == 0.5 and s["wall_ms_per_step"] == 5.0


def test_union_of_intervals():
    """Overlapping kernels (several streams) count once; gaps do not count."""
    assert profiling.union_length([]) == 0
    assert profiling.union_length([(5, 7), (0, 2), (1, 3), (6, 6.5), (10, 11)]) == 3 + 2 + 1


def test_cpu_profile_of_matrix_products():
    """Four products of 256 x 256 matrices a step: the profile counts 4 aten::mm calls a step, and matrix products
    take most of the operator time, which fits in the wall time."""
    a = torch.randn(256, 256)

    def step():
        b = a
        for _ in range(4):
            b = a @ b
        return b

    s = profiling.profile_steps(step, steps=3, device=torch.device("cpu"))
    mm = next(t for t in s["top"] if t["name"] == "aten::mm")
    assert mm["calls_per_step"] == 4 and mm["kind"] == "matmul"
    assert s["by_kind_ms"]["matmul"] > 0.5 * s["busy_ms_per_step"]
    assert 0 < s["busy_ms_per_step"] <= s["wall_ms_per_step"]


@pytest.mark.gpu
def test_cuda_profile_of_known_work(record_property):
    """On CUDA the profile sums the kernels: 4 bf16 products of 4096^2 matrices and a GELU a step. The products are
    4 x 2 x 4096^3 FLOPs: their kernel time must be at least that at 5 PFLOP/s (above any current GPU's dense bf16
    peak), the matmul kernels at least 4 calls a step (cuBLAS may add a reduction kernel), and the GPU's busy time
    (the union of the kernels' intervals) fits in the wall time."""
    device = torch.device("cuda")
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)

    def step():
        b = a
        for _ in range(4):
            b = a @ b
        torch.nn.functional.gelu(b)

    step()
    s = profiling.profile_steps(step, steps=5, device=device)
    record_property("gpu measurement", f"profile of 4 bf16 4096^3 products + GELU per step: {s['by_kind_ms']}, "
                                       f"busy {s['busy_fraction']:.2f}")
    assert s["by_kind_ms"]["matmul"] >= 4 * 2 * 4096**3 / 5e15 * 1000
    assert sum(t["calls_per_step"] for t in s["top"] if t["kind"] == "matmul") >= 4
    assert s["by_kind_ms"].get("elementwise", 0) > 0
    assert 0 < s["busy_ms_per_step"] <= s["wall_ms_per_step"]
    assert s["busy_ms_per_step"] <= sum(s["by_kind_ms"].values()) + 1e-6
    timer = profiling.PhaseTimer(device)
    for _ in range(3):
        timer.start()
        step()
        timer.mark("step")
    assert timer.medians_ms()["step"] >= s["by_kind_ms"]["matmul"] * 0.9


def test_git_commit_names_the_commit_and_an_uncommitted_tree(tmp_path, monkeypatch):
    """The commit git itself reports, with the remark once a tracked file differs from it; "unknown" outside git."""
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout.strip()

    monkeypatch.setattr(profiling, "REPOSITORY", tmp_path)
    assert profiling.git_commit() == "unknown"
    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-q", "-m", "first")
    sha = git("rev-parse", "HEAD")
    assert len(sha) == 40 and profiling.git_commit() == sha
    (tmp_path / "f.txt").write_text("b")
    assert profiling.git_commit() == sha + " (uncommitted changes)"
