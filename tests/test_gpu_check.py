"""bench/gpu_check: its CPU mode end to end (so the GPU command cannot rot unseen), and the
arithmetic behind its table."""

import json
import os
import subprocess

import pytest

from bench import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_variant_names_round_trip():
    variant = gpu_check.Variant("tiny_imagenet", "host", "bfloat16", 1024)
    assert variant.name == "tiny_imagenet_host_bf16_b1024"
    assert gpu_check.Variant.parse(variant.name) == variant
    pallas = gpu_check.Variant("cifar100", "device", "bfloat16", 256, pallas=True)
    assert pallas.name == "cifar100_device_bf16_b256_pallas"
    assert gpu_check.Variant.parse(pallas.name) == pallas


@pytest.mark.parametrize(
    "kind, key",
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-40GB", "A100"),
        ("Tesla T4", "T4"),
        ("NVIDIA L4", "L4"),
        ("TPU v5 lite", "TPU v5"),
        ("TPU v5p", "TPU v5p"),
        ("cpu", None),
    ],
)
def test_peak_flops_matches_the_most_specific_chip_name(kind, key):
    found = gpu_check.peak_flops(kind)
    assert (found[0] if found else None) == key


def test_derive_computes_mfu_projection_and_ratio_against_the_matching_reference():
    report = {
        "environment": {"peak_bf16_flops": 1e15},
        "jax": {
            "cifar100_device_bf16_b256": {
                "batch": 256,
                "images_per_s": 25600.0,  # 100 steps/s
                "step_only_s": 0.005,
                "flops_per_step": 2e12,
                "compile_s": 30.0,
                "full_run_steps": 39000,
            }
        },
        "torch": {
            "torch_cifar100_amp_b256": {"batch": 256, "images_per_s": 6400.0, "full_run_steps": 39000},
            "torch_cifar100_fp32_b256": {"batch": 256, "images_per_s": 3200.0, "full_run_steps": 39000},
        },
        "skipped": [],
    }
    derived = gpu_check.derive(report)
    row = derived["jax"]["cifar100_device_bf16_b256"]
    assert row["mfu"] == pytest.approx(0.2)  # 2e12 FLOPs x 100 / 1e15
    assert row["step_only_mfu"] == pytest.approx(0.4)
    assert row["projected_full_run_s"] == pytest.approx(390 + 30)
    # bf16 is compared with the reference's fp16 autocast run, not its float32 one.
    assert derived["ratios"] == {"cifar100_device_bf16_b256_vs_torch_amp_speedup": 4.0}
    assert derived["torch"]["torch_cifar100_amp_b256"]["projected_full_run_s"] == pytest.approx(1560)


@pytest.mark.slow
def test_gpu_check_cpu_mode_measures_ours_and_the_reference_and_writes_its_table(tmp_path):
    out = subprocess.run(
        # A budget with room for a busy machine (the default, 240 s, is what a user waits at most).
        ["bash", "bench/gpu_check.sh", str(tmp_path), "--cpu", "--profile=device", "--budget-s=480"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    with open(tmp_path / "gpu_check.json") as f:
        report = json.load(f)
    assert set(report["jax"]) == {"cifar100_device_fp32_b32", "cifar100_host_fp32_b32"}
    for name, row in report["jax"].items():
        assert "error" not in row, (name, row)
        assert row["images_per_s"] > 0 and row["step_only_images_per_s"] > 0
        assert row["flops_per_step"] > 1e9 and row["compile_s"] > 0
        assert row["loss_finite"] and row["full_run_steps"] == 50000 // 32
        assert row["launched_ops_per_step"] > 100  # a 2-block ViT step is hundreds of fused ops
    torch_row = report["torch"]["torch_cifar100_fp32_b32"]
    assert torch_row["images_per_s"] > 0 and torch_row["loss_finite"]
    assert "cifar100_device_fp32_b32_vs_torch_fp32_speedup" in report["ratios"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| cifar100_host_fp32_b32 | 32 |" in table and "PyTorch reference" in table
    # --profile=device: that variant's trace and optimised HLO, for offline analysis.
    assert (tmp_path / "cifar100_device_fp32_b32.xplane.pb").stat().st_size > 0
    assert (tmp_path / "cifar100_device_fp32_b32.hlo.txt.gz").stat().st_size > 0
    assert not (tmp_path / "cifar100_host_fp32_b32.xplane.pb").exists()
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert (
        figures["cifar100_device_fp32_b32_images_per_s"]
        == report["jax"]["cifar100_device_fp32_b32"]["images_per_s"]
    )
    assert all(isinstance(v, (int, float, str)) for v in figures.values())
