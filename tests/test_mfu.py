import pytest

from ebdiff.core.mfu import (
    PEAK_TFLOPS,
    compute_mfu,
    format_flops,
    gpu_family,
    peak_tflops,
    step_precision,
    train_step_flops,
)
from ebdiff.evaluate.bench import format_mfu


@pytest.mark.parametrize("name,fam", [("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
                                      ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA H200", "H200"),
                                      ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA A100-SXM4-80GB", "A100"),
                                      ("NVIDIA GeForce RTX 4090", None), ("cpu", None), (None, None)])
def test_gpu_family(name, fam):
    assert gpu_family(name) == fam


def test_the_h200s_measured_fast_dense_row():
    """The fast path's dense cifar10 row on the H200 (../shared/gpu, 36.25 it/s at batch 128): 6 x 6.064
    GMACs x 128 = 4.657 TFLOP per step, 168.8 TFLOP/s, 17.1% of the bf16 dense peak of 989.4 TFLOP/s."""
    m = compute_mfu(6_064_135_040, 128, 1 / 36.24542666261261, "NVIDIA H200", "bf16")
    assert m.flops_per_step == pytest.approx(6 * 6_064_135_040 * 128)
    assert m.flops_per_s / 1e12 == pytest.approx(168.80, abs=0.01)
    assert m.mfu == pytest.approx(0.17061, abs=1e-4)
    assert m.describe() == "168.8 TFLOP/s, MFU 17.1% of bf16 peak"
    # the eager fp32 row (15.5 it/s) runs its convolutions in TF32: 72 TFLOP/s would read 108% of the FP32 peak
    e = compute_mfu(6_064_135_040, 128, 1 / 15.5, "NVIDIA H200", "tf32")
    assert e.mfu == pytest.approx(72.18 / 494.7, abs=1e-3)


def test_unknown_devices_have_no_mfu():
    m = compute_mfu(65e6, 4, 0.05, "cpu", "fp32")
    assert m.mfu is None and m.flops_per_s == pytest.approx(6 * 65e6 * 4 / 0.05)
    assert format_mfu(m.mfu) == "-" and format_mfu(0.1706, "bf16") == "17.1% bf16"
    assert train_step_flops(1e9, 2) == 12e9
    assert format_flops(2.26e9) == "2.26 GFLOP/s" and format_flops(None) == "-" and format_flops(512.0) == "512 FLOP/s"
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "tf32") == 156.0
    assert all(set(p) == {"bf16", "tf32", "fp32"} for p in PEAK_TFLOPS.values())
    assert step_precision(True, "cuda") == "bf16" and step_precision(False, "cpu") == "fp32"
    with pytest.raises(ValueError):
        peak_tflops("NVIDIA H200", "fp8")
    with pytest.raises(ValueError):
        compute_mfu(1e9, 2, 0.0, "cpu", "fp32")
