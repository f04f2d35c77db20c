"""Model FLOP/s and model FLOPs utilisation (MFU) of a training step: how far a step is from the chip.

Model FLOPs of one step = 3 x 2 x MACs(one image, forward) x batch: a MAC is 2 FLOPs, and forward
plus backward cost about three forwards (the backward computes the gradients of the activations and
of the weights, ~2 forwards). FLOP/s = that / seconds per step; MFU = FLOP/s / the device's dense peak
for the number format the step's convolutions and matmuls run in. The FLOPs are counted from the model
(torch-pruning's MACs: convolutions and linear layers; the attention's q@k and attn@v products are
left out, so attention-heavy models are slightly understated), not from the kernels: recomputation,
optimizer, EMA and elementwise work do not count.

Dense peaks (without 2:4 sparsity), TFLOP/s, from NVIDIA's datasheets:
  * "NVIDIA H100 Tensor Core GPU" datasheet: H100 SXM BF16 989.4 (the table's 1,979 is with
    sparsity), TF32 494.7 (989 sparse), FP32 67; H100 PCIe BF16 756.5 (1,513), TF32 378 (756), FP32
    51; H100 NVL BF16 835.5 (1,671), TF32 417.5 (835), FP32 60.
  * "NVIDIA H200 Tensor Core GPU" datasheet: H200 SXM as H100 SXM (989.4 / 494.7 / 67); H200 NVL
    as H100 NVL (835.5 / 417.5 / 60).
  * "NVIDIA A100 Tensor Core GPU" datasheet: BF16 312 (624), TF32 156 (312), FP32 19.5.
The format of a step (`step_precision`): bf16 under autocast; otherwise TF32 when cuDNN may use it
for convolutions (PyTorch's default, `torch.backends.cudnn.allow_tf32`), else FP32. An fp32 step
measured against the FP32 (non-tensor-core) peak would read above 100% on an H100/H200, since its
convolutions run on the tensor cores in TF32. Other GPUs and the CPU: unknown peak, MFU None
(printed "-").
"""

from __future__ import annotations

from dataclasses import dataclass

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.5, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 67.0},
    "H200 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
PRECISIONS = ("bf16", "tf32", "fp32")


def gpu_family(device_name: str | None) -> str | None:
    """The PEAK_TFLOPS row of a `torch.cuda.get_device_name()` string, None when not known.

    "NVIDIA H100 80GB HBM3" -> "H100 SXM"; "NVIDIA H100 PCIe"; "NVIDIA H100 NVL"; "NVIDIA H200";
    "NVIDIA H200 NVL"; "NVIDIA A100-SXM4-80GB" and "NVIDIA A100 80GB PCIe" -> "A100" (same peaks).
    "cpu", None and other GPUs -> None."""
    if not device_name:
        return None
    n = device_name.upper().replace("-", " ")
    if "H200" in n:
        return "H200 NVL" if "NVL" in n else "H200"
    if "H100" in n:
        return "H100 NVL" if "NVL" in n else ("H100 PCIe" if "PCIE" in n else "H100 SXM")
    if "A100" in n:
        return "A100"
    return None


def peak_tflops(device_name: str | None, precision: str) -> float | None:
    """Dense peak TFLOP/s of a device for "bf16", "tf32" or "fp32"; None if the device is unknown."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    fam = gpu_family(device_name)
    return None if fam is None else PEAK_TFLOPS[fam][precision]


def step_precision(bf16: bool, device_type: str) -> str:
    """The number format a step's convolutions run in: bf16 under autocast, else tf32 on a GPU whose
    cuDNN may use TF32 (PyTorch's default), else fp32."""
    if bf16:
        return "bf16"
    if device_type == "cuda":
        import torch

        return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return "fp32"


def train_step_flops(macs_per_image: float, batch: int) -> float:
    """Model FLOPs of one training step: 3 (forward + backward) x 2 (FLOPs per MAC) x MACs x batch."""
    return 6.0 * float(macs_per_image) * int(batch)


def format_flops(flops_per_s: float | None) -> str:
    """"168.8 TFLOP/s", "2.26 GFLOP/s" (3 significant digits, the largest prefix below the value)."""
    if flops_per_s is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if flops_per_s >= scale:
            return f"{flops_per_s / scale:.4g} {prefix}FLOP/s"
    return f"{flops_per_s:.3g} FLOP/s"


@dataclass(frozen=True)
class MFU:
    flops_per_step: float
    flops_per_s: float
    precision: str
    peak_flops_per_s: float | None  # None: unknown device
    mfu: float | None  # fraction of the peak

    def describe(self) -> str:
        s = format_flops(self.flops_per_s)
        return s + (f", MFU {100 * self.mfu:.1f}% of {self.precision} peak" if self.mfu is not None else ", MFU -")


def compute_mfu(macs_per_image: float, batch: int, step_s: float, device_name: str | None,
                precision: str) -> MFU:
    """MFU of a training step that took `step_s` seconds on `device_name` (torch.cuda.get_device_name(),
    or "cpu"/None) with its convolutions in `precision` (`step_precision`)."""
    if step_s <= 0:
        raise ValueError("step_s must be > 0")
    flops = train_step_flops(macs_per_image, batch)
    rate = flops / step_s
    peak = peak_tflops(device_name, precision)
    peak_s = None if peak is None else peak * 1e12
    return MFU(flops, rate, precision, peak_s, None if peak_s is None else rate / peak_s)
