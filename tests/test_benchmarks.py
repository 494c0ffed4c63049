"""The benchmark's naive reference computes the library model's function; the benchmark runs.

The throughput ratios in ``benchmarks/throughput.py`` only mean something if the fast library
model and the plain per-step ``NaiveAlignDraw`` compute the same thing: same loss terms, same
gradients for every parameter, same samples, on the same weights and noise.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aligndraw import allocator, gemm, openblas
from aligndraw.config import ModelConfig, preset
from aligndraw.model import AlignDraw

from conftest import (
    needs_avx2,
    needs_onednn,
    needs_openblas,
    needs_step_kernels,
    random_batch,
    tiny_config,
    torch_threads,
)

ROOT = Path(__file__).resolve().parents[1]
# whether keep_freed_memory also installs the block cache here (it builds where it can)
CACHES_BLOCKS = allocator.block_cache_missing() is None
# ``benchmarks`` lives at the repository root, which ``pytest`` (unlike ``python -m pytest``)
# does not put on sys.path by itself.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.accumulate import weight_shapes  # noqa: E402
from benchmarks.flops import flops_per_image  # noqa: E402
from benchmarks.machine import KERNEL_ENV  # noqa: E402
from benchmarks.naive_reference import (  # noqa: E402
    NaiveAlignDraw,
    load_from_library,
    parameter_map,
    perturb_parameters_,
)

CONFIGS = {
    "tiny-c1": tiny_config(),
    "tiny-c3": tiny_config(channels=3),
    "tiny-noalign": tiny_config(model="noalign"),
    "60x60": tiny_config(height=60, width=60, read_n=8, write_n=8, canvas_init=-10.0),
    # every product's weight ≥ 64 on both sides: in fp32 they run through oneDNN (aligndraw.gemm)
    "wide": tiny_config(lang_hidden=32, align_dim=64, enc_hidden=64, dec_hidden=64, z_dim=64),
}
# Relative, per tensor. fp32 sums in a different order in the fused library model; gradients
# that are sums of cancelling terms (e.g. the alignment bias b, which α is nearly invariant to)
# lose a few more digits than the loss. A real mismatch is off by O(1).
TOL = {torch.float32: 1e-3, torch.float64: 1e-10}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine every parallel op would wait
    for a descheduled thread (seconds per test instead of milliseconds)."""
    with torch_threads(1):
        yield


def twin_models(config: ModelConfig, dtype: torch.dtype, seed: int = 0):
    """A library model with perturbed weights and a naive model holding the same weights."""
    torch.manual_seed(seed)
    lib = AlignDraw(config)
    perturb_parameters_(lib, torch.Generator().manual_seed(seed + 1))
    naive = load_from_library(NaiveAlignDraw(config), lib)
    return lib.to(dtype), naive.to(dtype)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    err = float((actual - expected).detach().norm())
    scale = float(expected.detach().norm())
    assert err <= rtol * scale + 1e-30, f"{what}: |Δ| = {err:.3e}, |ref| = {scale:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_gradients_match_library(name: str, dtype: torch.dtype) -> None:
    config = CONFIGS[name]
    lib, naive = twin_models(config, dtype)
    images, tokens, lengths = random_batch(config, batch=5, max_len=6, seed=3)
    images = images.to(dtype)
    noise = torch.randn(5, config.steps, config.z_dim, generator=torch.Generator().manual_seed(7),
                        dtype=dtype)
    out_lib = lib(images, tokens, lengths, noise=noise)
    out_naive = naive(images, tokens, lengths, noise=noise)
    rtol = TOL[dtype]
    for field in ("loss", "nll", "kl", "kl_steps"):
        assert_rel_close(getattr(out_lib, field), getattr(out_naive, field), rtol, field)
    out_lib.loss.backward()
    out_naive.loss.backward()
    lib_params = dict(lib.named_parameters())
    for naive_name, lib_name in parameter_map(naive).items():
        g_naive = dict(naive.named_parameters())[naive_name].grad
        g_lib = lib_params[lib_name].grad
        assert g_lib is not None and g_naive is not None, lib_name
        assert_rel_close(g_lib, g_naive, rtol, f"grad {lib_name}")


def test_perturbed_weights_give_every_parameter_a_gradient() -> None:
    """The check above is only meaningful if no path's gradient is rounding noise."""
    config = CONFIGS["tiny-c1"]
    lib, _ = twin_models(config, torch.float64)
    images, tokens, lengths = random_batch(config, batch=5, max_len=6, seed=3)
    lib(images.double(), tokens, lengths, generator=torch.Generator().manual_seed(0)).loss.backward()
    for name, p in lib.named_parameters():
        if name != "encoder.embedding.weight":  # row 0 is padding; the rest are checked below
            assert float(p.grad.abs().max()) > 1e-6, name
    assert float(lib.encoder.embedding.weight.grad[1:].abs().max()) > 1e-6


@pytest.mark.parametrize("name", ["tiny-c1", "tiny-c3", "60x60", "wide"])
def test_samples_match_library(name: str) -> None:
    config = CONFIGS[name]
    lib, naive = twin_models(config, torch.float64)
    _, tokens, lengths = random_batch(config, batch=5, max_len=6, seed=4)
    noise = torch.randn(5, config.steps, config.z_dim, generator=torch.Generator().manual_seed(8),
                        dtype=torch.float64)
    s_lib, s_naive = lib.sample(tokens, lengths, noise=noise), naive.sample(tokens, lengths, noise=noise)
    for field in ("images", "canvases", "alignments", "write_windows"):
        torch.testing.assert_close(getattr(s_lib, field), getattr(s_naive, field), rtol=1e-10, atol=1e-12)


def test_same_generator_same_noise() -> None:
    """Both models draw ε the same way, so one seed gives one loss."""
    config = CONFIGS["tiny-c1"]
    lib, naive = twin_models(config, torch.float64)
    images, tokens, lengths = random_batch(config, batch=4, seed=5)
    a = lib(images.double(), tokens, lengths, generator=torch.Generator().manual_seed(3)).loss
    b = naive(images.double(), tokens, lengths, generator=torch.Generator().manual_seed(3)).loss
    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


def test_load_from_library_rejects_other_shapes() -> None:
    lib = AlignDraw(tiny_config())
    with pytest.raises(ValueError, match="shape"):
        load_from_library(NaiveAlignDraw(tiny_config(enc_hidden=12)), lib)
    with pytest.raises(ValueError, match="without a naive counterpart"):
        load_from_library(NaiveAlignDraw(tiny_config(model="noalign")), lib)


def test_flop_counts_match_the_issue_estimate() -> None:
    """The issue quotes ≈ 0.43 GFLOP per training image and ≈ 0.08 per sampled image (MNIST)."""
    cfg = preset("mnist-captions").model
    flops = flops_per_image(cfg, caption_len=12, batch=100)
    assert 0.38e9 < flops["train"] < 0.52e9
    assert 0.06e9 < flops["sample"] < 0.11e9
    assert flops["train"] == pytest.approx(3 * flops["forward"])
    # Input gates: a 23-word table shared by 100 images beats 12 words per image; with a
    # vocabulary larger than the batch's words they are computed per word.
    input_gates = 2 * 12 * 2 * cfg.embed_dim * 4 * cfg.lang_hidden  # per image, per word
    big = flops_per_image(cfg, caption_len=12, batch=1)  # 23 > 12 words: per word
    assert big["sample"] - flops["sample"] == pytest.approx(input_gates - input_gates * 23 / 12 / 100)


def run_benchmark(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``benchmarks/SCRIPT ARGS`` as a real process, with ``env`` added to this one's environment."""
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | (env or {}))


def run_throughput(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``benchmarks/throughput.py --smoke ARGS`` as a real process, with ``env`` added to its environment."""
    return run_benchmark("throughput.py", "--smoke", *args, env=env)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# every kernel variable blank (as if unset), whatever the environment the tests run in
NO_KERNEL_ENV = {k: "" for k in KERNEL_ENV}


def test_throughput_smoke_prints_json_last() -> None:
    proc = run_throughput(env=NO_KERNEL_ENV)
    report = last_json(proc)
    for key in ("preset", "batch", "threads", "busy", "other_processes_cores", "peak_gflops",
                "flops_per_image", "check", "results", "ratios"):
        assert key in report, key
    assert report["check"]["equal"] is True
    assert set(report["targets"]) == {"library_fp32"}  # no compiled variant in this run
    assert report["targets"]["library_fp32"]["fp32_equal"] is True
    assert set(report["results"]) == {"library_fp32", "naive_fp32"}
    for phase in ("train", "sample"):
        stats = report["results"]["library_fp32"][phase]
        assert stats["images_per_s"] > 0 and 0 < stats["share_of_peak"]
    ratio = report["ratios"]["library_fp32/naive_fp32"]
    assert set(ratio) >= {"train", "sample"}
    for phase in ("train", "sample"):  # an interval around the paired ratio, or none for few rounds
        interval = ratio[f"{phase}_paired_ci95"]
        assert interval is None or interval[0] <= ratio[f"{phase}_paired"] <= interval[1]
    # one block (2 rounds): the blocks' ratio, with no interval, and a line that names none
    assert ratio["train_balanced"] > 0 and ratio["train_balanced_ci95"] is None
    blocks = next(x for x in proc.stdout.splitlines() if x.startswith("by blocks of two rounds"))
    assert "interval" not in blocks and "library_fp32/naive_fp32: train " in blocks
    # no kernel variable set: none reported, and the table names the kernels the JSON does
    assert report["kernel_env"] == {} and "kernels chosen by the environment" not in proc.stdout
    assert f"PyTorch's kernels: {report['aten_cpu_capability']}  " in proc.stdout


def test_kernel_environment_names_the_variables_that_choose_kernels() -> None:
    from benchmarks.machine import kernel_environment

    environ = {"ATEN_CPU_CAPABILITY": "avx2", "OPENBLAS_CORETYPE": "Haswell",
               "MKL_ENABLE_INSTRUCTIONS": " ", "OMP_NUM_THREADS": "2", "HOME": "/root"}
    assert kernel_environment(environ) == {"ATEN_CPU_CAPABILITY": "avx2", "OPENBLAS_CORETYPE": "Haswell"}
    assert kernel_environment({}) == {}


@needs_avx2
def test_throughput_reports_kernels_limited_by_the_environment() -> None:
    """An AVX2 proxy: PyTorch's kernels and MKL's limited to AVX2; the run says so and stays equal."""
    env = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ALIGNDRAW_CPU_GEMM": "aten",
           "ALIGNDRAW_CPU_BMM": "aten"}
    proc = run_throughput("--threads", "1", env=NO_KERNEL_ENV | env)
    report = last_json(proc)
    assert report["kernel_env"] == env
    assert report["aten_cpu_capability"] == "AVX2" and report["gemm_backend"] == "aten"
    assert report["batched_backend"] == "aten"
    assert report["check"]["equal"] is True
    lines = proc.stdout.splitlines()
    line = next(x for x in lines if x.startswith("kernels chosen by the environment: "))
    assert all(f"{k}={v}" in line for k, v in env.items())
    assert any("PyTorch's kernels: AVX2" in x and "(batched: aten)" in x for x in lines)


@needs_openblas
@needs_avx2
def test_throughput_names_openblas_kernels() -> None:
    env = {"ALIGNDRAW_CPU_GEMM": "aten", "ALIGNDRAW_CPU_BMM": "openblas", "OPENBLAS_CORETYPE": "Haswell"}
    proc = run_throughput("--threads", "1", env=NO_KERNEL_ENV | env)
    report = last_json(proc)
    assert report["batched_backend"] == "openblas" and report["openblas_core"] == "Haswell"
    header = "(batched: openblas)  OpenBLAS's kernels: Haswell"
    assert any(header in x for x in proc.stdout.splitlines())
    assert report["check"]["equal"] is True


def test_bf16_peak_is_measured_for_bf16_runs_and_native_bf16_only() -> None:
    from benchmarks.throughput import wants_bf16_peak

    cpu = torch.device("cpu")
    assert wants_bf16_peak(["fp32", "bf16"], cpu) and wants_bf16_peak(["bf16"], cpu)
    assert wants_bf16_peak(["fp32"], cpu) is gemm.cpu_bf16_native()
    assert wants_bf16_peak(["fp32"], torch.device("cuda"))


@needs_onednn
def test_throughput_gemm_baseline_and_both_fp32_peaks() -> None:
    report = last_json(run_throughput("--gemm-baseline", "--skip-naive"))
    default = report["gemm_backend"]  # the library's: oneDNN on non-Intel CPUs with AVX-512, else aten
    flags, vendor = gemm.cpu_flags(), report["cpu_vendor"]
    expected = os.environ.get("ALIGNDRAW_CPU_GEMM", "").strip().lower() or (
        "onednn" if vendor != "GenuineIntel" and "avx512f" in flags
        else "openblas" if vendor == "AuthenticAMD" and "avx2" in flags and openblas.missing() is None
        else "aten")
    assert default == expected
    assert report["cpu_bf16_native"] is gemm.cpu_bf16_native()
    other = {"aten": "onednn", "onednn": "aten", "openblas": "aten"}[default]
    assert set(report["results"]) == {"library_fp32", f"library_{other}_fp32"}
    peak = report["peak_gflops"]
    fp32 = [peak["fp32_aten"], peak["fp32_onednn"]] + [peak["fp32_openblas"]] * (openblas.missing() is None)
    assert peak["fp32"] == max(fp32) > 0 and len([k for k in peak if k.startswith("fp32_")]) == len(fp32)
    # an fp32 run measures the bf16 peak only where bf16 products are native
    assert ("bf16" in peak) is gemm.cpu_bf16_native() and peak.get("bf16", 1.0) > 0
    assert report["results"][f"library_{other}_fp32"]["train"]["images_per_s"] > 0


def test_throughput_compile_baseline_needs_compile() -> None:
    proc = run_throughput("--compile-baseline")
    assert proc.returncode == 2 and "add --compile" in proc.stderr


def test_throughput_compile_baseline_times_plain_torch_compile_beside_the_library() -> None:
    report = last_json(run_throughput("--compile", "--compile-baseline", "--skip-naive"))
    compiled = {"library_compiled_fp32", "library_plaincompiled_fp32"}
    assert set(report["results"]) == {"library_fp32"} | compiled
    for name in compiled:
        assert "error" not in report["compile_s"][name], report["compile_s"][name]
        assert report["results"][name]["train"]["images_per_s"] > 0
        # three graphs: the training step's, the update's (compiled at the second step), sampling's
        assert report["compile_s"][name]["unique_graphs"] == 3


@needs_onednn
def test_gemm_benchmark_times_both_backends_on_the_models_products() -> None:
    report = last_json(run_benchmark("gemm.py", "--batch", "4", "--square", "64", "--steps", "2",
                                     "--threads", "1", "--min-time", "0.01"))
    assert report["steps"] == 2
    for shape in ("projection", "encoder_input", "square"):
        for case in ("forward", "input_grad", "weight_grad"):
            for backend in ("onednn", "aten"):
                assert report[f"{shape}_{case}_{backend}_ms"] > 0
                assert report[f"{shape}_{case}_{backend}_diff"] < 1e-5
        assert report[f"{shape}_weight_grad_onednn_direct_diff"] < 1e-5
        for case in ("forward", "input_grad"):  # other weight layouts: the same product
            assert report[f"{shape}_{case}_onednn_column_major_diff"] < 1e-5
            assert report[f"{shape}_{case}_onednn_prepacked_diff"] < 1e-5
    for shape in ("projection", "encoder_input"):  # the unpacked slice: same value, slow kernel
        assert report[f"{shape}_forward_onednn_sliced_weight_diff"] < 1e-5
    assert "square_forward_onednn_sliced_weight_ms" not in report


def test_accumulate_benchmark_times_three_forms_of_a_weight_gradient_sum() -> None:
    report = last_json(run_benchmark("accumulate.py", "--batch", "4", "--steps", "3", "--scale", "50",
                                     "--threads", "1", "--min-time", "0.01"))
    assert report["steps"] == 3
    # the preset's weights, as the docs quote them
    assert weight_shapes("mnist-captions") == (32, {"projection": (3286, 300), "encoder_input": (1200, 428),
                                                    "decoder_z": (1200, 150)})
    for shape in ("projection", "encoder_input", "decoder_z"):
        for form in ("addmm_chain", "in_place", "stacked"):  # the same sum, three ways
            assert report[f"{shape}_{form}_eager_ms"] > 0
            assert report[f"{shape}_{form}_eager_diff"] < 1e-5


def test_update_benchmark_times_the_eager_and_the_compiled_update_to_the_same_weights() -> None:
    report = last_json(run_benchmark("update.py", "--smoke", "--threads", "1"))
    assert report["preset"] == "smoke" and report["repeats"] == 2
    assert report["graphs"] == 1  # the compiled side ran compiled, not eagerly
    assert report["max_rel_diff"] < 1e-5  # the same update (N(0, 1) gradients: most tensors clipped), fused


def test_evaluation_benchmark_times_eager_and_compiled_calls_to_the_same_results() -> None:
    report = last_json(run_benchmark("evaluation.py", "--smoke", "--threads", "1", "--rows", "6",
                                     "--words", "5"))
    assert report["model"] == "smoke" and report["repeats"] == 2
    assert report["graphs"] == 2  # ran compiled: the two forward calls share a graph, sample has one
    assert set(report["first_call_s"]) == {"forward", "sample"}  # FixedShapes' record of them
    for call in ("forward", "forward_from_states", "sample"):
        assert report[f"{call}_eager_ms"] > 0 and report[f"{call}_compiled_ms"] > 0
        assert report[f"{call}_diff"] < 1e-5


def test_evaluation_benchmark_rejects_bad_counts() -> None:
    proc = run_benchmark("evaluation.py", "--rows", "0")
    assert proc.returncode == 2 and "must be ≥ 1" in proc.stderr


def test_update_benchmark_rejects_bad_counts() -> None:
    proc = run_benchmark("update.py", "--repeats", "0")
    assert proc.returncode == 2 and "--repeats must be ≥ 1" in proc.stderr


def test_ab_trees_times_two_trees_in_turn_each_with_its_own_package(tmp_path: Path) -> None:
    """B is a copy of this tree: each worker must import the aligndraw of its own tree (an
    installed copy earlier on the path would make an A/B compare a tree with itself)."""
    copy = tmp_path / "copy"
    skip = shutil.ignore_patterns("pretrained", "__pycache__", "*.egg-info")
    for part in ("src", "benchmarks"):
        shutil.copytree(ROOT / part, copy / part, ignore=skip)
    report = last_json(run_benchmark("ab_trees.py", "--a", str(ROOT), "--b", str(copy), "--smoke",
                                     "--repeats", "3", "--threads", "1", "--precision", "bf16"))
    assert report["a_package"] == str((ROOT / "src" / "aligndraw").resolve())
    assert report["b_package"] == str((copy / "src" / "aligndraw").resolve())
    assert report["precision"] == "bf16" and not report["plain_b"]
    for phase in ("train", "sample"):
        assert report[f"{phase}_a_median_ms"] > 0 and report[f"{phase}_b_median_ms"] > 0
        # --repeats 3 became 4 timed rounds, two in each order: 2 blocks
        assert 0 <= report[f"{phase}_b_faster_pairs"] <= 4 and report[f"{phase}_b_over_a_paired"] > 0
        assert report[f"{phase}_b_over_a_paired_ci95"] is None  # 4 pairs give no 95 % interval
        assert report[f"{phase}_blocks"] == 2 and report[f"{phase}_b_over_a_balanced"] > 0
        assert report[f"{phase}_second_run_cost"] > 0
    assert report["other_processes_cores"] is None or report["other_processes_cores"] >= 0


def test_ab_trees_workers_build_the_batch_asked_for() -> None:
    report = last_json(run_benchmark("ab_trees.py", "--a", str(ROOT), "--b", str(ROOT), "--smoke",
                                     "--repeats", "1", "--threads", "1", "--batch", "1"))
    assert (report["batch"], report["a_batch"], report["b_batch"]) == (1, 1, 1)
    bad = run_benchmark("ab_trees.py", "--a", str(ROOT), "--b", str(ROOT), "--batch", "0")
    assert bad.returncode == 2 and "--batch must be at least 1, got 0" in bad.stderr


def test_ab_trees_summary_gives_an_interval_and_the_sign_test() -> None:
    from benchmarks.ab_trees import _summary

    a = [1.0 + 0.01 * i for i in range(11)]
    out = _summary("train", a, [t / 1.1 for t in a])  # B 1.1× faster in every pair
    assert out["train_b_over_a_paired"] == pytest.approx(1.1)
    assert out["train_b_over_a_paired_ci95"] == pytest.approx((1.1, 1.1))
    assert out["train_b_faster_pairs"] == 11 and out["train_sign_test_p"] < 0.01
    mixed = _summary("sample", a, [t * (1.05 if i % 2 else 0.95) for i, t in enumerate(a)])
    lo, hi = mixed["sample_b_over_a_paired_ci95"]
    assert lo < 1 < hi and mixed["sample_sign_test_p"] > 0.5  # 6 of 11: no evidence either way
    # the same rounds two by two (A first, then B first): B is 0.95× A's time when second and
    # 1.05× when first, so about equal speed, and a second run √(0.95/1.05) as long as a first
    assert mixed["sample_b_over_a_balanced"] == pytest.approx(math.sqrt(1 / (1.05 * 0.95)))
    assert mixed["sample_blocks"] == 5 and mixed["sample_second_run_cost"] == pytest.approx(
        math.sqrt(0.95 / 1.05))
    assert out["train_b_over_a_balanced"] == pytest.approx(1.1) and out["train_b_faster_blocks"] == 5


def test_ab_trees_compiles_each_tree_first_in_a_process_of_its_own() -> None:
    """With --compile the timed workers load their graphs from inductor's cache: each tree was
    compiled (and its first steps run) in a worker of its own before."""
    report = last_json(run_benchmark("ab_trees.py", "--a", str(ROOT), "--b", str(ROOT), "--smoke",
                                     "--compile", "--repeats", "1", "--threads", "1"))
    assert report["compile"] and report["warm_up_a_s"] > 0 and report["warm_up_b_s"] > 0
    # the timed workers loaded what the warm-up compiled (they did not compile again)
    assert report["recompiled"] == {"a": False, "b": False}
    for phase in ("train", "sample"):
        assert report[f"{phase}_a_median_ms"] > 0 and report[f"{phase}_b_median_ms"] > 0


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="flush-to-zero as torch.set_flush_denormal sets it is an x86 mode")
def test_throughput_flush_denormal_flushes_in_every_thread() -> None:
    """Two threads: the mode must reach OpenMP's worker thread too (set before it starts)."""
    report = last_json(run_throughput("--flush-denormal", "--threads", "2", "--skip-naive"))
    assert report["flush_denormal"] and report["subnormals_flushed"]
    plain = last_json(run_throughput("--threads", "2", "--skip-naive"))
    assert not plain["flush_denormal"] and not plain["subnormals_flushed"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_throughput_keeps_freed_memory_when_asked() -> None:
    report = last_json(run_throughput("--keep-freed-memory", "--threads", "1", "--skip-naive"))
    assert report["keep_freed_memory"] in allocator.MMAP_THRESHOLDS  # the one glibc took, in bytes
    assert report["block_cache"] is CACHES_BLOCKS
    plain = last_json(run_throughput("--threads", "1", "--skip-naive"))
    assert plain["keep_freed_memory"] == 0 and plain["block_cache"] is False


@needs_onednn
def test_ab_trees_gives_each_worker_its_own_product_backend() -> None:
    report = last_json(run_benchmark("ab_trees.py", "--a", str(ROOT), "--b", str(ROOT), "--smoke",
                                     "--repeats", "1", "--threads", "1",
                                     "--gemm-a", "aten", "--gemm-b", "onednn"))
    assert (report["a_gemm"], report["b_gemm"]) == ("aten", "onednn")
    bad = run_benchmark("ab_trees.py", "--a", str(ROOT), "--b", str(ROOT), "--gemm-b", "mkl")
    assert bad.returncode == 2 and "--gemm-b" in bad.stderr and "'mkl'" in bad.stderr


def test_ab_trees_gives_each_worker_its_own_threads() -> None:
    report = last_json(run_benchmark("ab_trees.py", "--a", str(ROOT), "--b", str(ROOT), "--smoke",
                                     "--repeats", "1", "--threads-a", "1", "--threads-b", "2"))
    assert (report["a_threads"], report["b_threads"]) == (1, 2)
    # a worker without its own takes --threads, not the default
    fallback = last_json(run_benchmark("ab_trees.py", "--a", str(ROOT), "--b", str(ROOT), "--smoke",
                                       "--repeats", "1", "--threads", "1", "--threads-b", "2"))
    assert (fallback["a_threads"], fallback["b_threads"]) == (1, 2)
    bad = run_benchmark("ab_trees.py", "--a", str(ROOT), "--b", str(ROOT), "--threads-b", "0")
    assert bad.returncode == 2 and "--threads-b must be at least 1, got 0" in bad.stderr


@needs_onednn
def test_ab_trees_starts_each_worker_with_its_own_environment() -> None:
    # the product backend is read from the environment when the library is imported, so each
    # worker's report shows whether its variables reached it from its start
    report = last_json(run_benchmark("ab_trees.py", "--a", str(ROOT), "--b", str(ROOT), "--smoke",
                                     "--repeats", "1", "--threads", "1",
                                     "--env-a", "ALIGNDRAW_CPU_GEMM=aten",
                                     "--env-b", "ALIGNDRAW_CPU_GEMM=onednn",
                                     "--env-b", "OMP_PROC_BIND=false",
                                     env=NO_KERNEL_ENV | {"OPENBLAS_CORETYPE": "Haswell"}))
    assert (report["a_gemm"], report["b_gemm"]) == ("aten", "onednn")
    assert report["env_b"] == {"ALIGNDRAW_CPU_GEMM": "onednn", "OMP_PROC_BIND": "false"}
    # each worker's kernel variables: the run's own, which both inherit, and its --env-x ones
    assert report["kernel_env_a"] == {"ALIGNDRAW_CPU_GEMM": "aten", "OPENBLAS_CORETYPE": "Haswell"}
    assert report["kernel_env_b"] == {"ALIGNDRAW_CPU_GEMM": "onednn", "OPENBLAS_CORETYPE": "Haswell"}
    bad = run_benchmark("ab_trees.py", "--a", str(ROOT), "--b", str(ROOT), "--env-b", "OMP_PROC_BIND")
    assert bad.returncode == 2 and "environment variables are KEY=VALUE" in bad.stderr
    assert "'OMP_PROC_BIND'" in bad.stderr


def test_subnormal_outputs_are_counted_per_op() -> None:
    from benchmarks.subnormals import SubnormalOutputs

    with SubnormalOutputs() as mode:
        torch.tensor([1e-40, 1.0, 0.0]) * 1.0  # one subnormal product, unless the CPU flushes
        torch.tensor([1e-40]).view(1, 1)  # a view: not counted again
    assert dict(mode.values) == {"aten.mul.Tensor": 1}


def test_subnormals_benchmark_library_step_and_filterbank_have_none() -> None:
    report = last_json(run_benchmark("subnormals.py", "--smoke", "--threads", "1"))
    assert report["step_subnormals"]["library"] == {}
    product = report["read_product"]
    assert product["plain_subnormal_weights"] > 0 and product["library_subnormal_weights"] == 0
    assert product["plain_us"] > 0 and product["library_us"] > 0


def test_ab_trees_rejects_a_directory_that_is_no_source_tree(tmp_path: Path) -> None:
    proc = run_benchmark("ab_trees.py", "--a", str(tmp_path), "--b", str(ROOT))
    assert proc.returncode == 2 and "--a must be a source tree of this project" in proc.stderr


@pytest.mark.parametrize("setting, message", [("cpp_wrapper", "KEY=VALUE, got 'cpp_wrapper'"),
                                              ("no_such_setting=1", "no setting 'no_such_setting'")])
def test_ab_trees_checks_inductor_settings(setting: str, message: str) -> None:
    proc = run_benchmark("ab_trees.py", "--a", str(ROOT), "--b", str(ROOT), "--inductor-b", setting)
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.parametrize("flag", ["--plain-b", "--no-warm-cache"])
def test_ab_trees_compile_flags_need_compile(flag) -> None:
    proc = run_benchmark("ab_trees.py", "--a", str(ROOT), "--b", str(ROOT), flag)
    assert proc.returncode == 2 and "add --compile" in proc.stderr


def test_ab_trees_inductor_settings_are_json_else_strings() -> None:
    from benchmarks.ab_trees import inductor_settings
    assert inductor_settings(["cpp_wrapper=true", "cpp.threads=2", "cpp.simdlen=x"]) == {
        "cpp_wrapper": True, "cpp.threads": 2, "cpp.simdlen": "x"}


def test_throughput_data_parallel_workers_match_the_reference() -> None:
    """--processes 2: library and naive models in two worker processes each, on half the batch
    apiece; the library's averaged gradients are checked against the naive reference."""
    report = last_json(run_throughput("--processes", "2"))
    assert set(report["results"]) == {"library_fp32", "naive_fp32", "library_dp2_fp32", "naive_dp2_fp32"}
    assert report["check"]["dp2_equal"] is True
    assert report["check"]["dp2_grad_max_rel_diff"] < 1e-3
    assert set(report["targets"]) == {"library_fp32", "library_dp2_fp32"}
    assert report["targets"]["library_dp2_fp32"]["fp32_equal"] is True
    assert {"library_dp2_fp32/naive_fp32", "library_dp2_fp32/naive_dp2_fp32",
            "naive_dp2_fp32/naive_fp32"} <= set(report["ratios"])
    for phase in ("train", "sample"):  # the workers' CPU is counted (the main process only waits:
        # uncounted it would be near 0; a smoke step of ~14 ms on two busy cores can use < 50 %)
        stats = report["results"]["library_dp2_fp32"][phase]
        assert stats["cpu_median_s"] > 0.25 * stats["median_s"]


def test_throughput_rejects_a_batch_the_processes_do_not_divide() -> None:
    proc = run_throughput("--processes", "3")
    assert proc.returncode == 2 and "--processes 3" in proc.stderr and "--batch 8" in proc.stderr


@pytest.mark.parametrize("script, args, shape, forms, tolerance", [
    ("alignment_scores.py", ("--batch", "4", "--words", "3", "--align", "16"), [4, 3, 16],
     ("tanh", "sigmoid"), 1e-5),
    ("filterbank_exp.py", ("--batch", "4", "--n", "3", "--size", "12"), [16, 3, 12], ("exp", "exp2"), 1e-4),
])
def test_forms_benchmarks_agree_eager_and_compiled(script, args, shape, forms, tolerance) -> None:
    report = last_json(run_benchmark(script, *args, "--min-time", "0.01"))
    assert report["shape"] == shape
    for name in forms:
        for mode in ("eager", "compiled"):
            assert report[f"{name}_{mode}_ms"] > 0
            assert report[f"{name}_{mode}_diff"] < tolerance


def test_lstm_cell_benchmark_times_both_forms_and_their_gradients() -> None:
    report = last_json(run_benchmark("lstm_cell.py", "--batch", "3", "--hidden", "5", "--threads", "1",
                                     "--min-time", "0.01"))
    assert report["shape"] == [3, 20] and report["threads"] == 1 and report["keep_freed_memory"] == 0
    for name in ("tanh", "sigmoid"):
        assert report[f"{name}_eager_ms"] > 0 and report[f"{name}_compiled_ms"] > 0
        assert report[f"{name}_grad_eager_ms"] > 0
    assert report["sigmoid_eager_diff"] < 1e-6 and report["sigmoid_compiled_diff"] < 1e-6
    assert report["sigmoid_grad_eager_diff"] < 1e-5
    assert report["op_tanh_eager_ms"] > 0 and report["op_sigmoid_eager_ms"] > 0


@needs_step_kernels
def test_step_kernels_benchmark_times_each_kernel_and_its_gradient() -> None:
    report = last_json(run_benchmark("step_kernels.py", "--batch", "3", "--threads", "1",
                                     "--min-time", "0.01"))
    assert report["batch"] == 3 and report["threads"] == 1
    for name in ("attend", "lstm", "posterior_kl", "scores"):
        assert report[name]["kernel_ms"] > 0 and report[name]["pytorch_ms"] > 0
        assert report[name]["grad_diff_relative"] < 1e-4  # the same gradients, to fp32 rounding


def test_context_mix_benchmark_times_both_precisions() -> None:
    report = last_json(run_benchmark("context_mix.py", "--batch", "3", "--words", "4", "--width", "8",
                                     "--min-time", "0.01"))
    assert report["shape"] == [3, 4, 8]
    assert report["fp32_eager_diff"] == 0 and 0 < report["bf16_eager_diff"] < 2e-2
    assert report["fp32_eager_ms"] > 0 and report["bf16_eager_ms"] > 0
    for form in ("grad_row", "grad_column"):  # the weights' gradient: the same product
        assert report[f"{form}_eager_ms"] > 0 and report[f"{form}_eager_diff"] < 1e-5


def test_neighbours_benchmark_times_every_setting() -> None:
    report = last_json(run_benchmark("neighbours.py", "--smoke", "--rounds", "2", "--passes", "2",
                                     "--threads", "1"))
    assert report["preset"] == "smoke" and report["compiled"] is False
    for p in (1, 2):
        for setting in ("alone", "after_naive", "after_eager", "after_both"):
            figures = report[f"pass{p}_{setting}"]
            assert figures["min_ms"] > 0 and figures["median_ms"] > 0
            assert "faults_per_step" in figures
    assert {"busy", "other_processes_cores"} <= report.keys()


def test_neighbours_runs_the_other_steps_before_each_timed_step() -> None:
    from benchmarks.neighbours import run_setting

    calls: list[str] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def train_step(self) -> None:
            calls.append(self.name)

    run_setting(Recorder("subject"), [Recorder("eager"), Recorder("naive")], rounds=2)
    assert calls == ["eager", "naive", "subject"] * 2


def test_neighbours_rejects_no_rounds(capsys) -> None:
    from benchmarks.neighbours import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])
    assert "--rounds" in capsys.readouterr().err


def test_scaling_benchmark_sweeps_batch_steps_and_canvas() -> None:
    import dataclasses

    from benchmarks.throughput import SMOKE_CONFIG

    report = last_json(run_benchmark("scaling.py", "--smoke"))
    assert report["keep_freed_memory"] == 0  # not asked
    base = ModelConfig(**SMOKE_CONFIG)  # batch 3, T = 3, 12×12 under --smoke
    rows = {(r["axis"], r["value"]): r for r in report["rows"]}
    assert set(rows) == {("batch", 2), ("batch", 4), ("steps", 2), ("steps", 3), ("canvas", 12),
                         ("canvas", 16)}
    # each sweep sets its own axis to its value and keeps the other two at the base
    expect = {"batch": lambda v: (v, base.steps, base.height), "steps": lambda v: (3, v, base.height),
              "canvas": lambda v: (3, base.steps, v)}
    for (axis, value), r in rows.items():
        assert "error" not in r, r
        batch, steps, canvas = expect[axis](value)
        assert (r["batch"], r["steps"], r["canvas"]) == (batch, steps, canvas)
        cfg = dataclasses.replace(base, steps=steps, height=canvas, width=canvas)
        flops = flops_per_image(cfg, 6, batch)
        for phase in ("train", "sample"):
            assert r[f"{phase}_gflop_per_image"] == pytest.approx(flops[phase] / 1e9)
            ms = r[f"{phase}_library_ms"]
            assert ms > 0 and r[f"{phase}_naive_ms"] > 0
            assert r[f"{phase}_library_us_per_image_step"] == pytest.approx(ms * 1e3 / (batch * steps))
            assert r[f"{phase}_library_gflops"] == pytest.approx(flops[phase] * batch / ms / 1e6)
    assert rows[("steps", 3)]["train_gflop_per_image"] > rows[("steps", 2)]["train_gflop_per_image"]
    assert rows[("canvas", 16)]["train_gflop_per_image"] > rows[("canvas", 12)]["train_gflop_per_image"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_scaling_benchmark_keeps_freed_memory_when_asked() -> None:
    out = run_benchmark("scaling.py", "--smoke", "--keep-freed-memory")
    report = last_json(out)
    assert report["keep_freed_memory"] in allocator.MMAP_THRESHOLDS  # the one glibc took, in bytes
    assert "freed memory kept" in out.stdout
    assert len(report["rows"]) == 6 and all("error" not in r for r in report["rows"])


@pytest.mark.parametrize("bad", [["--batches", "0"], ["--batches", "x"], ["--steps", ""],
                                 ["--repeats", "0"], ["--warmup", "-1"]])
def test_scaling_benchmark_rejects_bad_sizes(bad, capsys) -> None:
    from benchmarks.scaling import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(bad)
    assert exit_info.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_fp32_targets_are_judged_per_variant() -> None:
    from benchmarks.throughput import fp32_targets

    ratios = {"library_fp32/naive_fp32": {"train": 1.4, "sample": 3.2},
              "library_compiled_fp32/naive_fp32": {"train": 3.0, "sample": 2.9},
              "library_bf16/naive_fp32": {"train": 5.0, "sample": 5.0}}
    assert fp32_targets(ratios, {"equal": True, "compiled_equal": False}) == {
        "library_fp32": {"train_3x": False, "sample_3x": True, "fp32_equal": True},
        "library_compiled_fp32": {"train_3x": True, "sample_3x": False, "fp32_equal": False}}
    assert set(fp32_targets(ratios, {"equal": True})) == {"library_fp32"}  # compiled not checked


def test_data_parallel_variants_are_judged_with_their_own_check() -> None:
    from benchmarks.throughput import fp32_targets

    ratios = {"library_dp2_compiled_fp32/naive_fp32": {"train": 3.1, "sample": 3.3},
              "library_dp2_compiled_fp32/naive_dp2_fp32": {"train": 1.0, "sample": 1.0},
              "naive_dp2_fp32/naive_fp32": {"train": 3.1, "sample": 3.1}}
    assert fp32_targets(ratios, {"dp2_compiled_equal": False}) == {
        "library_dp2_compiled_fp32": {"train_3x": True, "sample_3x": True, "fp32_equal": False}}
    assert fp32_targets(ratios, {"equal": True}) == {}  # no check of its own: not judged


def test_fp32_ceiling_from_peak_and_flops() -> None:
    from benchmarks.throughput import fp32_ceiling

    results = {"naive_fp32": {"train": {"images_per_s": 100.0}, "sample": {"images_per_s": 400.0}}}
    ceiling = fp32_ceiling(results, {"train": 0.4e9, "sample": 0.08e9}, {"fp32": 200.0})
    assert ceiling["train"]["images_per_s"] == pytest.approx(500.0)
    assert ceiling["train"]["x_naive"] == pytest.approx(5.0)
    assert ceiling["train"]["share_of_peak_for_3x"] == pytest.approx(0.6)
    assert ceiling["sample"]["x_naive"] == pytest.approx(2500.0 / 400.0)
    assert fp32_ceiling({}, {"train": 1.0, "sample": 1.0}, {"fp32": 1.0})["train"]["x_naive"] is None


def test_round_robin_runs_as_many_timed_rounds_in_each_order() -> None:
    from benchmarks.throughput import round_robin

    calls: list[str] = []

    class Recorder:
        worker_cpu_s = 0.0

        def __init__(self, name: str) -> None:
            self.name = name

        def train_step(self) -> None:
            calls.append(self.name)

    walls, _ = round_robin([Recorder("a"), Recorder("b"), Recorder("c")], "train", warmup=1,
                              repeats=3, device=torch.device("cpu"))
    # the warm-up reversed, then timed rounds from the given order, alternating; 3 repeats
    # become 4: every round's first run follows its own variant's run
    assert calls == ["c", "b", "a"] + ["a", "b", "c", "c", "b", "a"] * 2
    assert {name: len(ts) for name, ts in walls.items()} == {"a": 4, "b": 4, "c": 4}  # warm-up left out
    calls.clear()
    round_robin([Recorder("a"), Recorder("b")], "train", warmup=2, repeats=2, device=torch.device("cpu"))
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    calls.clear()
    walls, _ = round_robin([Recorder("a")], "train", warmup=0, repeats=3, device=torch.device("cpu"))
    assert calls == ["a"] * 3  # one variant: no order to balance


def test_balanced_blocks_cancel_a_cost_of_running_second() -> None:
    """Rounds in alternating order, B truly 1.1× faster, and a step run second of a round 1.2×
    slower: per-round ratios A/B alternate 1.1/1.2 (A first) and 1.1·1.2 (B first). With one
    more round with B first the per-round median is the biased 1.32; blocks of two rounds
    give 1.1 and the cost 1.2."""
    from benchmarks.pairs import balanced, paired, second_run_cost

    true, cost = 1.1, 1.2
    reversed_rounds = [i % 2 == 1 for i in range(1, 22)]  # 21 rounds, the first with B first
    ratios = [true * cost if rev else true / cost for rev in reversed_rounds]
    assert paired(ratios)["median"] == pytest.approx(true * cost)  # 11 of the 21 ran B first
    blocks = balanced(ratios)
    assert blocks["median"] == pytest.approx(true) and blocks["blocks"] == 10  # the odd last left out
    assert blocks["ci95"] == pytest.approx((true, true)) and blocks["wins"] == 10
    assert second_run_cost(ratios, reversed_rounds) == pytest.approx(cost)
    assert second_run_cost(ratios[:2], [False, False]) is None  # no block holds both orders
    assert balanced(ratios[:1]) is None


def test_pairs_reads_each_rounds_order_back_from_a_log() -> None:
    from benchmarks.pairs import logged_orders

    log = ("  train round 1/4 (warm-up): a 0.600s (cpu 1.2s), b 0.500s (cpu 1.0s)\n"
           "  train round 2/4: a 0.570s (cpu 1.115s), b 0.528s (cpu 1.044s)\n"
           "  train round 3/4, reversed: a 0.562s (cpu 1.111s), b 0.564s (cpu 1.115s)\n"
           "  train round 4/4: a 0.571s (cpu 1.1s), b 0.529s (cpu 1.0s)\n"
           "  sample round 2/2, reversed: a 0.095s (cpu 0.180s), b 0.098s (cpu 0.185s)\n")
    assert logged_orders(log) == {"train": [False, True, False], "sample": [True]}


def test_pairs_script_prints_the_balanced_figures_of_a_saved_log(tmp_path: Path, capsys) -> None:
    from benchmarks.pairs import main

    rounds = [("", 0.55, 0.60), (", reversed", 0.66, 0.50)] * 3  # B 1.1× faster, second 1.2× slower
    log = "".join(f"  sample round {i + 2}/7{order}: a {a:.3f}s (cpu 1.0s), b {b:.3f}s (cpu 1.0s)\n"
                  for i, (order, a, b) in enumerate(rounds))
    path = tmp_path / "ab.txt"
    path.write_text(log)
    main([str(path)])
    out = capsys.readouterr().out
    assert "by blocks of both orders 1.100×" in out and "faster in 3 of 3 blocks" in out
    assert "a step took 1.200× as long" in out


@pytest.mark.parametrize("n", [1, 6, 11, 15])
def test_sign_test_equals_counting_every_outcome(n: int) -> None:
    from itertools import product

    from benchmarks.pairs import sign_test

    outcomes = [sum(flips) for flips in product((0, 1), repeat=n)]
    for wins in range(n + 1):
        extreme = abs(wins - n / 2)
        p = sum(abs(w - n / 2) >= extreme for w in outcomes) / len(outcomes)
        assert sign_test(wins, n) == pytest.approx(min(1.0, p))
    with pytest.raises(ValueError, match="wins must lie in 0..n"):
        sign_test(n + 1, n)


def test_median_interval_ranks_and_coverage() -> None:
    from benchmarks.pairs import median_interval

    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) is None  # 5 values cannot give 95 %
    values = [float(v) for v in range(11, 0, -1)]
    assert median_interval(values) == (2.0, 10.0)  # 2nd smallest, 2nd largest (98.8 %)
    # coverage of the true median (0) of a symmetric distribution, over many samples of 15
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(4000, 15, generator=g).tolist()
    covered = [lo <= 0.0 <= hi for lo, hi in map(median_interval, samples)]
    assert sum(covered) / len(covered) >= 0.95
    with pytest.raises(ValueError, match="confidence"):
        median_interval(values, confidence=1.0)


def test_pairs_reads_timed_rounds_back_from_an_ab_trees_log() -> None:
    from benchmarks.pairs import logged_rounds

    log = ("  train round 1/3 (warm-up): a 0.600s (cpu 1.2s), b 0.500s (cpu 1.0s)\n"
           "  train round 2/3: a 0.570s (cpu 1.115s), b 0.528s (cpu 1.044s)\n"
           "  train round 3/3, reversed: a 0.562s (cpu 1.111s), b 0.564s (cpu 1.115s)\n"
           "train: B 1.03× A by medians\n"
           "  sample round 2/2: a 0.095s (cpu 0.180s), b 0.098s (cpu 0.185s)\n")
    assert logged_rounds(log) == {"train": {"a": [0.570, 0.562], "b": [0.528, 0.564]},
                                  "sample": {"a": [0.095], "b": [0.098]}}


def test_pairs_compares_a_throughput_log_with_the_naive_reference() -> None:
    from benchmarks.pairs import comparisons, logged_rounds

    log = ("  train round 1/3 (warm-up): library_fp32 0.5s (cpu 1.0s), naive_fp32 1.0s (cpu 2.0s)\n"
           "  train round 2/3: library_fp32 0.500s (cpu 1.0s), naive_fp32 1.000s (cpu 2.0s), "
           "library_compiled_fp32 0.250s (cpu 0.5s)\n"
           "  train round 3/3, reversed: library_fp32 0.400s (cpu 0.8s), naive_fp32 1.200s (cpu 2.4s), "
           "library_compiled_fp32 0.300s (cpu 0.6s)\n")
    found = dict(comparisons(logged_rounds(log)["train"]))
    assert found.keys() == {"library_fp32 over naive_fp32", "library_compiled_fp32 over naive_fp32"}
    assert found["library_fp32 over naive_fp32"] == pytest.approx([2.0, 3.0])
    assert found["library_compiled_fp32 over naive_fp32"] == pytest.approx([4.0, 4.0])
    assert comparisons({"x": [1.0], "y": [2.0]}) == []  # neither an A/B nor a naive reference


def test_blocks_line_names_an_interval_only_where_it_gives_one() -> None:
    from benchmarks.throughput import blocks_line

    with_interval = {"train_balanced": 3.6, "train_balanced_ci95": (3.4, 3.8), "sample_balanced": 5.8,
                     "sample_balanced_ci95": None}
    line = blocks_line("a/b", with_interval)
    assert line == ("by blocks of two rounds in both orders (95 % interval), a/b: "
                    "train 3.60× (3.40–3.80×), sample 5.80×")
    without = {"train_balanced": 3.6, "train_balanced_ci95": None, "sample_balanced": 5.8}
    assert blocks_line("a/b", without) == ("by blocks of two rounds in both orders, a/b: "
                                           "train 3.60×, sample 5.80×")
    assert blocks_line("a/b", {"train_balanced": None, "sample_balanced": None}) is None


def test_ratios_give_the_paired_ratio_an_interval_from_six_rounds() -> None:
    from benchmarks.throughput import ratios

    naive = [1.0, 1.2, 0.9, 1.1, 1.3, 1.0, 0.95]
    library = [t / 2 for t in naive[:-1]] + [naive[-1] / 2.5]  # 2× faster, once 2.5×
    times = {phase: {"naive_fp32": naive, "library_fp32": library} for phase in ("train", "sample")}
    results = {name: {phase: {"median_s": sorted(ts)[3], "cpu_median_s": sorted(ts)[3]}
                      for phase in ("train", "sample")}
               for name, ts in (("naive_fp32", naive), ("library_fp32", library))}
    r = ratios(results, times)["library_fp32/naive_fp32"]
    assert r["train_paired"] == pytest.approx(2.0)
    assert r["train_paired_ci95"] == pytest.approx((2.0, 2.5))  # 7 rounds: smallest and largest
    few = {phase: {name: ts[:5] for name, ts in times[phase].items()} for phase in times}
    assert ratios(results, few)["library_fp32/naive_fp32"]["sample_paired_ci95"] is None
    # blocks of two rounds: (2, 2), (2, 2), (2, 2); the seventh round is left out
    assert r["train_balanced"] == pytest.approx(2.0) and r["train_balanced_ci95"] is None  # 3 blocks
    one = {phase: {name: ts[:1] for name, ts in times[phase].items()} for phase in times}
    assert ratios(results, one)["library_fp32/naive_fp32"]["train_balanced"] is None


PRODUCT_CONFIGS = {"mnist-captions": preset("mnist-captions").model, "coco32": preset("coco32").model,
                   "tiny": tiny_config(), "tiny-c3": tiny_config(channels=3)}


@pytest.mark.parametrize("name", sorted(PRODUCT_CONFIGS))
@pytest.mark.parametrize("batch, caption_len", [(100, 12), (8, 6), (1, 12)])
def test_product_schedule_counts_the_flop_models_flops(name: str, batch: int, caption_len: int) -> None:
    """Two derivations of a step's products agree: the schedule's shapes and flops.py's formulas
    (table or per-word input gates included: 1 image of 12 words has fewer words than a
    vocabulary)."""
    from benchmarks.products import schedule, schedule_flops

    cfg = PRODUCT_CONFIGS[name]
    flops = flops_per_image(cfg, caption_len, batch)
    for phase in ("train", "sample"):
        counted = schedule_flops(schedule(cfg, batch, caption_len, phase))
        assert counted == pytest.approx(flops[phase] * batch, rel=1e-12), phase


def test_product_schedule_has_two_gradients_per_product_and_stacks_shared_weights() -> None:
    from benchmarks.products import schedule

    cfg = preset("mnist-captions").model
    t, batch = cfg.steps, 100
    train = {p.name: p for p in schedule(cfg, batch, 12, "train")}
    forward = [name for name in train if "/" not in name]
    assert sorted(train) == sorted(forward + [f"{f}/d{x}" for f in forward for x in "AB"])
    projection = train["projection"]
    assert (projection.m, projection.k, projection.n, projection.count) == (batch, 300, 3286, t)
    stacked = train["projection/dB"]  # Σ_t h_tᵀ dY_t as one product over T·B rows
    assert (stacked.m, stacked.k, stacked.n, stacked.count) == (300, t * batch, 3286, 1)
    per_step = train["read_rows/dB"]  # a batched product's operands are no shared weight
    assert per_step.count == t and per_step.b == 2 * batch
    sample = {p.name: p for p in schedule(cfg, batch, 12, "sample")}
    assert not {"enc_input", "posterior", "read_rows"} & set(sample)  # no encoder when sampling
    assert sample["projection"].n == 3286 - 4 * cfg.enc_hidden - 5  # nor its gates and read window
    assert sample["write_cols_all_steps"].k == t * cfg.write_n and sample["write_cols_all_steps"].count == 1


def test_product_schedule_rejects_other_models_and_phases() -> None:
    from benchmarks.products import schedule

    with pytest.raises(ValueError, match="'noalign' is not covered"):
        schedule(tiny_config(model="noalign"), 4, 5, "train")
    with pytest.raises(ValueError, match="phase must be 'train' or 'sample', got 'eval'"):
        schedule(tiny_config(), 4, 5, "eval")


def test_products_only_runs_every_plain_product_of_the_schedule() -> None:
    """Every plain product's output holds its operands' product after a step; no batched one ran."""
    from benchmarks.products import ProductsOnly, plain, schedule, schedule_flops

    cfg = tiny_config()
    with gemm.using("aten"):  # torch.mm into the preallocated outputs (oneDNN calls make new ones)
        variant = ProductsOnly(cfg, 4, 5, torch.device("cpu"))
    for phase in ("train", "sample"):
        products = schedule(cfg, 4, 5, phase)
        assert 0 < variant.share_of_flops[phase] < 1
        assert variant.share_of_flops[phase] == pytest.approx(schedule_flops(plain(products))
                                                              / schedule_flops(products))
        for _, _, out in variant._operands.values():
            out.fill_(float("nan"))
        getattr(variant, f"{phase}_step")()
        shapes = {(p.m, p.k, p.n) for p in plain(products)}
        ran = {(b, m, k, n) for (b, m, k, n), (a, w, out) in variant._operands.items()
               if not out.isnan().any() and torch.allclose(out, a @ w, rtol=1e-5, atol=1e-5)}
        assert {(0, *s) for s in shapes} <= ran, phase
        assert all(b == 0 for b, *_ in variant._operands)  # batched ones: never allocated nor run
        calls = sum(rounds * len(calls) for rounds, calls in variant._plans[phase])
        assert calls == sum(p.count for p in plain(products))


def test_throughput_products_floor_beside_library_and_naive() -> None:
    report = last_json(run_throughput("--products"))
    assert set(report["results"]) == {"library_fp32", "naive_fp32", "products_fp32"}
    floor = report["products_floor"]
    for phase in ("train", "sample"):
        f = floor[phase]
        assert 0 < f["share_of_flops"] < 1 and f["products_ms"] > 0
        naive_ms = report["results"]["naive_fp32"][phase]["median_s"] * 1e3
        assert f["x_naive"] == pytest.approx(naive_ms / f["products_ms"])
        assert f["ms_left_for_3x"] == pytest.approx(naive_ms / 3 - f["products_ms"])
        library_ms = report["results"]["library_fp32"][phase]["median_s"] * 1e3
        assert f["beside_products_ms"] == {"library_fp32": pytest.approx(library_ms - f["products_ms"])}
    assert "products_fp32/naive_fp32" in report["ratios"]
    assert set(report["targets"]) == {"library_fp32"}  # the floor is no implementation to judge


def test_products_benchmark_times_every_product_of_both_phases() -> None:
    from benchmarks.products import schedule
    from benchmarks.throughput import SMOKE_CONFIG

    proc = run_benchmark("products.py", "--smoke", "--threads", "1")
    report = last_json(proc)
    for phase in ("train", "sample"):
        rows = report["phases"][phase]["products"]
        expected = schedule(ModelConfig(**SMOKE_CONFIG), 8, 6, phase)
        assert [r["name"] for r in rows] == [p.name for p in expected]
        assert all(r["ms"] > 0 and r["gflops"] > 0 for r in rows)
        totals = report["phases"][phase]["total_ms"]
        assert totals["plain"] == pytest.approx(sum(r["ms"] for r in rows if not r["b"]))
        assert totals["batched"] == pytest.approx(sum(r["ms"] for r in rows if r["b"]))
        assert f"{phase}: plain products" in proc.stdout


@pytest.mark.parametrize("backend", [pytest.param("onednn", marks=needs_onednn),
                                     pytest.param("openblas", marks=needs_openblas)])
def test_products_only_follows_the_librarys_product_backend(backend: str) -> None:
    """With oneDNN chosen (as on AVX-512 AMD processors) or OpenBLAS (AVX2-only AMD) the plain
    products go through it."""
    from test_gemm import _BackendCalls

    from benchmarks.products import ProductsOnly

    cfg = tiny_config(enc_hidden=64, dec_hidden=64)
    counts = {}
    for name in (backend, "aten"):
        with gemm.using(name):  # as in a process started with ALIGNDRAW_CPU_GEMM=name
            variant = ProductsOnly(cfg, 4, 5, torch.device("cpu"))
            with _BackendCalls() as calls:
                variant.train_step()
            counts[name] = calls.counts
            for _, planned in variant._plans["train"]:
                for product, a, b, out in planned:
                    assert torch.allclose(product(a, b, out=out), a @ b, rtol=1e-4, atol=1e-4)
    # per drawing step at least the projection and the inference LSTM's input, forward and
    # input gradient (their weights have both sides ≥ 64 here)
    assert counts[backend][backend] >= 4 * cfg.steps
    assert counts["aten"]["onednn"] == counts["aten"]["openblas"] == 0


@pytest.mark.parametrize("transposed", [True, False])
def test_products_times_batched_products_as_the_library_forms_them(monkeypatch, transposed: bool) -> None:
    """Where the library forms tall batched results transposed (PyTorch's products on an AMD
    processor) the benchmark does too, with the same values."""
    from benchmarks import products

    monkeypatch.setattr(gemm, "_tall_transposed", transposed)
    with gemm.using_batched("aten"):
        product = products._batched_product(torch.device("cpu"))
    assert product is (products._tall_bmm if transposed else torch.bmm)
    a, b = torch.randn(3, 9, 5), torch.randn(3, 5, 4)
    assert torch.allclose(product(a, b, out=torch.empty(3, 9, 4)), a @ b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flag", ["--batch", "--caption-len", "--repeats", "--threads"])
def test_products_benchmark_rejects_sizes_below_one(flag: str) -> None:
    proc = run_benchmark("products.py", "--smoke", flag, "0")
    assert proc.returncode == 2
    assert f"{flag} must be ≥ 1, got 0" in proc.stderr


def test_floor_line_says_when_the_products_alone_rule_3x_out() -> None:
    from benchmarks.throughput import floor_line

    f = {"share_of_flops": 0.94, "products_ms": 345.0, "x_naive": 3.68, "ms_left_for_3x": 78.0,
         "beside_products_ms": {"library_compiled_fp32": 247.0}}
    line = floor_line("train", f, "aten")
    assert "3× leaves 78 ms for all else; beside them: library_compiled_fp32 247 ms" in line
    f |= {"x_naive": 2.13, "ms_left_for_3x": -324.0}
    assert "2.13× naive; 3× is out of reach: they alone take 324 ms more than 3× allows" in floor_line(
        "train", f, "aten")
    f |= {"x_naive": None}  # no naive reference in the run
    assert "naive" not in floor_line("train", f, "aten")


@pytest.mark.parametrize(("bad", "says"), [
    (["--compile-mode", "reduce-overhead"], "add --compile"),
    (["--compile", "--compile-mode", "reduce-overhead"], "needs --device cuda"),
])
def test_throughput_benchmark_rejects_a_compile_mode_it_cannot_use(bad, says, capsys) -> None:
    from benchmarks.throughput import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(bad)
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_freed_memory_benchmark_reports_every_setting(capsys) -> None:
    from benchmarks.freed_memory import main

    assert main(["--repeats", "2", "--rows", "8192", "--words", "64"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    default, kept, cached = (report["results"][s] for s in ("default", "kept", "cached"))
    # each in its own process: only kept and cached took the library's setting, and only cached
    # the block cache (the effects are tests/test_allocator.py's)
    linux = sys.platform.startswith("linux")
    assert not default["kept"] and bool(kept["kept"]) is linux and bool(cached["kept"]) is linux
    assert default["block_cache"] is None and kept["block_cache"] is None
    assert (cached["block_cache"] is not None) is (linux and CACHES_BLOCKS)
    if cached["block_cache"] is not None:
        assert cached["block_cache"]["hits"] > 0  # its repeated calls took freed blocks again


def test_native_profile_reads_perf_samples_and_what_runs_while_a_thread_waits() -> None:
    from benchmarks.native_profile import OPENMP, parse_samples, while_waiting

    lines = [  # perf script -F tid,time,ip,sym,dso; C++ symbols hold spaces and parentheses
        " 11 100.000000:  7f01 mkl_blas_avx512_sgemm_kernel_0 (/t/lib/libtorch_cpu.so)",
        " 12 100.000100:  7f02 [unknown] (/t/lib/libgomp.so.1)",  # 11 runs MKL meanwhile
        " 11 100.010000:  7f03 c10::function_ref<void (char**, long)>::callback_fn<k> (/t/libtorch_cpu.so)",
        " 12 100.010200:  7f04 [unknown] (/t/lib/libgomp.so.1)",  # 11's sample is 0.2 ms away
        " 12 100.020000:  7f05 cpp_fused_add_3._omp_fn.0 (/tmp/torchinductor_root/ab/cabc.main.so)",
        " 11 100.030000:  7f06 mkl_vml_kernel_sExp_Z0HAynn (/t/lib/libtorch_cpu.so)",
        " 11 100.040000:  7f07 Sleef_finz_tanhf16_u10avx512f (/t/lib/libtorch_cpu.so)",
        " 11 100.050000:  7f08 gblock_by_k_omp (/t/lib/libtorch_cpu.so)",  # MKL's, without mkl_
        " 11 100.060000:  7f09 aoti_torch_cpu_mm_out (/t/lib/libtorch_cpu.so)",  # PyTorch's C shim
        " 11 100.070000:  7f0a vsexp_cout_rare (/t/lib/libtorch_cpu.so)",  # MKL's vector math
        " 12 100.080000:  7f0b sgemm_kernel_HASWELL (/t/numpy.libs/libscipy_openblas64_-32a4.so)",
        " 12 100.090000:  7f0c aligndraw_mm (/root/.cache/torch_extensions/aligndraw_openblas.so)",
        "not a sample line",
        "",
    ]
    samples, skipped = parse_samples(lines)
    assert skipped == 1  # the blank line is no line to read
    assert [s.tid for s in samples] == [11, 12, 11, 12, 12, 11, 11, 11, 11, 11, 12, 12]
    assert samples[2].symbol == "c10::function_ref<void (char**, long)>::callback_fn<k>"
    assert samples[2].library == "/t/libtorch_cpu.so"
    kinds = [s.kind for s in samples]  # worked out by library_kind as each line is read
    assert kinds == ["MKL products", OPENMP, "PyTorch ops (libtorch_cpu)", OPENMP,
                     "compiled kernels and their wrapper", "MKL, other", "vector math (SLEEF)",
                     "MKL products", "PyTorch ops (libtorch_cpu)", "MKL, other", "OpenBLAS products",
                     "OpenBLAS products"]
    assert while_waiting(samples, 0.00015) == {("MKL products", "mkl_blas_avx512_sgemm_kernel_0"): 1}
    assert sum(while_waiting(samples, 0.001).values()) == 2  # a wider window takes both


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_profile_step_profiles_both_phases_and_keeps_freed_memory_when_asked() -> None:
    kept = run_benchmark("profile_step.py", "--smoke", "--threads", "1", "--keep-freed-memory")
    assert kept.returncode == 0, kept.stderr
    header = kept.stdout.splitlines()[0]
    cached = ", blocks cached by size" if CACHES_BLOCKS else ""
    taken = [size for size in allocator.MMAP_THRESHOLDS
             if header.endswith(f", freed memory kept (mmap threshold {size >> 20} MiB{cached})")]
    assert len(taken) == 1, header  # the threshold glibc took, named in the header
    assert "=== train: library_fp32" in kept.stdout and "=== sample: library_fp32" in kept.stdout


class _Built(Exception):
    """Raised in place of building the step: what came before is all a test needs."""


@pytest.mark.parametrize("script", ["profile_step", "native_profile"])
def test_the_profilers_keep_freed_memory_before_building_the_step(monkeypatch, script) -> None:
    import importlib

    module, calls = importlib.import_module(f"benchmarks.{script}"), []
    monkeypatch.setattr(module, "keep_freed_memory",
                        lambda flag, asked: calls.append(("keep", flag, asked)) or 1 << 30)

    def build(*_):
        calls.append("build")
        raise _Built

    monkeypatch.setattr(module, "build_variant", build)
    monkeypatch.setattr(module, "perf_binary", lambda: "perf", raising=False)  # native_profile's
    threads = ["--threads", str(torch.get_num_threads())]  # this process's, left as they are
    for asked in (True, False):
        calls.clear()
        with pytest.raises(_Built):
            module.main(["--smoke", *threads, *(["--keep-freed-memory"] * asked)])
        assert calls == [("keep", "--keep-freed-memory", asked), "build"]


def test_keeping_freed_memory_not_asked_does_nothing(monkeypatch) -> None:
    from benchmarks.machine import keep_freed_memory, kept_note

    assert keep_freed_memory("--keep-freed-memory", asked=False) == 0 and kept_note(0) == ""
    monkeypatch.setattr(allocator, "block_cache_installed", lambda: False)
    assert kept_note(1 << 30, ", ") == ", freed memory kept (mmap threshold 1024 MiB)"
    assert kept_note(0, ", ") == ""  # no separator left behind
    monkeypatch.setattr(allocator, "block_cache_installed", lambda: True)
    assert kept_note(1 << 30) == "freed memory kept (mmap threshold 1024 MiB, blocks cached by size)"


def test_profile_step_keeps_freed_memory_only_on_the_cpu() -> None:
    proc = run_benchmark("profile_step.py", "--smoke", "--device", "cuda", "--keep-freed-memory")
    assert proc.returncode == 2 and "--keep-freed-memory" in proc.stderr and "cuda" in proc.stderr


def test_native_profile_samples_the_training_step_with_perf() -> None:
    glibc = platform.libc_ver()[0] == "glibc"
    flags = ["--keep-freed-memory"] if glibc else []  # glibc's mallopt
    proc = run_benchmark("native_profile.py", "--smoke", "--threads", "2", "--seconds", "1",
                         "--warmup", "1", "--frequency", "499", *flags)
    if shutil.which("perf") is None:  # .ci/run installs it; elsewhere it says what is missing
        assert proc.returncode != 0 and "needs Linux perf" in proc.stderr
        return
    report = last_json(proc)
    assert report["keep_freed_memory"] in (allocator.MMAP_THRESHOLDS if glibc else (0,))
    assert report["variant"] == "library_fp32" and report["phase"] == "train"
    assert report["steps"] >= 1 and report["seconds"] >= 1
    assert report["main_thread"] in report["samples"]  # the process's own thread was sampled
    assert sum(report["samples"].values()) > 0
    assert sum(report["kinds"]["all"].values()) == pytest.approx(1)
    assert report["kinds"]["all"].get("PyTorch ops (libtorch_cpu)", 0) > 0  # the step ran its ops


@pytest.mark.parametrize(("args", "says"), [
    (["--seconds", "0"], "--seconds must be positive"),
    (["--compile", "--naive"], "drop --naive"),
    (["--caption-len", "0"], "--caption-len must be at least 1"),
    (["--compile", "--warmup", "1"], "--warmup must be at least 2 with --compile and --phase train"),
    (["--compile", "--phase", "sample", "--warmup", "0"], "--warmup must be at least 1 with --compile"),
    (["--warmup", "-1"], "--warmup must be 0 or more"),
])
def test_native_profile_rejects_bad_settings(args, says) -> None:
    proc = run_benchmark("native_profile.py", *args)
    assert proc.returncode == 2 and says in proc.stderr
