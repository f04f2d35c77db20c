import torch
from conftest import needs_cxx

from ebdiff.backbones import build_model
from ebdiff.cli import main
from ebdiff.config import TrainConfig
from ebdiff.core.diffusion import DiffusionLoss, Schedule
from ebdiff.training.step import EAGER_FP32, FastPath, TrainStep, make_optimizer, prepare_model, resolve_fast_path


def _losses(fast: FastPath, steps: int = 4) -> list[float]:
    torch.manual_seed(0)
    model = prepare_model(build_model("tiny", dropout=0.0), fast)
    opt = make_optimizer(model.parameters(), TrainConfig(), fast)
    step = TrainStep(model, model, opt, None, DiffusionLoss(Schedule.linear()), 1.0, fast)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x0 = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
        noise = torch.randn(4, 1, 32, 32, generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)
        out.append(float(step(x0, t, noise)))
    return out


def test_channels_last_matches_plain_path():
    a = _losses(EAGER_FP32)
    b = _losses(FastPath(channels_last=True))
    assert all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)
    assert a[0] > 0


def test_bf16_autocast_on_cpu_stays_close():
    a = _losses(EAGER_FP32, 2)
    b = _losses(FastPath(bf16=True), 2)
    assert abs(a[0] - b[0]) < 0.05 * a[0]


@needs_cxx
def test_compiled_step_matches_plain_path():
    """The compiled step (inductor, the GPU fast path's compiler; on the CPU without CUDA graphs)
    trains like the eager one: same losses within fp32 reassociation noise."""
    a = _losses(EAGER_FP32, 3)
    b = _losses(FastPath(compile="default"), 3)
    assert all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)


def test_auto_switches():
    cpu = resolve_fast_path(TrainConfig(), torch.device("cpu"))
    assert cpu == EAGER_FP32  # the exact-resume path
    assert not cpu.cudnn_benchmark
    assert resolve_fast_path(TrainConfig(cudnn_benchmark=True), torch.device("cpu")).cudnn_benchmark
    t = TrainConfig(mixed_precision="bf16", channels_last=True, compile="none")
    assert resolve_fast_path(t, torch.device("cpu")) == FastPath(bf16=True, channels_last=True)


def test_bench_runs_on_cpu(tmp_path, capsys):
    j = tmp_path / "b.json"
    assert main(["bench", "--preset", "tiny", "--ratios", "0.5", "--batch", "4", "--steps", "2", "--warmup", "1",
                 "--device", "cpu", "--json", str(j)]) == 0
    out = capsys.readouterr().out
    assert "| fp32 | 0.00 |" in out and "| fp32 | 0.50 |" in out and "channels_last" in out
    import json
    rows = json.loads(j.read_text())["rows"]
    assert {r["ratio"] for r in rows} == {0.0, 0.5} and all(r["it_s"] > 0 for r in rows)
    r50 = next(r for r in rows if r["ratio"] == 0.5 and r["mode_name"] == "eager")
    assert 3.0 < r50["macs_ratio"] < 5.0
    # model FLOP/s for every row; no MFU on the CPU (no known peak): "-"
    assert "| model FLOP/s | MFU |" in out and "GFLOP/s" in out
    assert all(abs(r["model_tflops_s"] / (6 * r["macs"] * 4 * r["it_s"] / 1e12) - 1) < 1e-9 and r["mfu"] is None
               for r in rows)
    assert main(["bench", "--preset", "tiny", "--ratios", "1.5"]) == 2
    assert main(["bench", "--preset", "tiny", "--modes", "fast", "--device", "cpu"]) == 2  # a GPU-only mode


def test_bench_profile_on_cpu(tmp_path, capsys):
    j = tmp_path / "b.json"
    assert main(["bench", "--preset", "tiny", "--ratios", "0", "--batch", "2", "--steps", "1", "--warmup", "1",
                 "--device", "cpu", "--modes", "eager", "--profile", "2", "--json", str(j)]) == 0
    out = capsys.readouterr().out
    assert "Where the step time goes" in out and "aten::convolution_backward" in out
    import json
    prof = json.loads(j.read_text())["rows"][0]["profile"]
    assert prof["steps"] == 2 and prof["ms_per_step"] > 0 and len(prof["top"]) > 5
    assert abs(sum(e["share"] for e in prof["top"]) - 1) < 0.5  # the top operators hold most of the time
    names = [e["name"] for e in prof["top"]]
    assert "aten::convolution_backward" in names
    # copies attributed to the operators that launched them
    assert prof["copies"] and all(c["source"].startswith("aten::copy_") for c in prof["copies"])
    assert "copies by source" in out


def test_bench_taeb_rows_on_cpu(tmp_path, capsys):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("regions:\n  - {t: [0, 499], ratio: 0.3}\n  - {t: [480, 999], ratio: 0.6}\n")
    j = tmp_path / "b.json"
    assert main(["bench", "--preset", "tiny", "--ratios", "0", "--batch", "4", "--steps", "2", "--warmup", "1",
                 "--device", "cpu", "--modes", "eager", "--taeb", str(cfg), "--json", str(j)]) == 0
    out = capsys.readouterr().out
    assert "TA-EB region tickets" in out and "(slowest)" in out
    import json
    taeb = json.loads(j.read_text())["taeb"]
    assert [b["ratio"] for b in taeb[0]["branches"]] == [0.3, 0.6]
    slow = min(taeb[0]["branches"], key=lambda b: b["it_s"])
    assert taeb[0]["slowest_region"] == slow["region"]


def test_kernel_kinds():
    from ebdiff.evaluate.bench import kernel_kind

    assert kernel_kind("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "conv (cuDNN)"
    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "gemm"
    assert kernel_kind("triton_poi_fused_convolution_silu_3") == "triton (fused by inductor)"
    assert kernel_kind("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>") \
        == "optimizer / EMA"
    assert kernel_kind("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>") \
        == "attention"
    assert kernel_kind("Memcpy DtoD (Device -> Device)") == "copy / layout"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, silu>") == "other"


def test_whole_step_graph_switch():
    """train.cuda_graph: the combinations that cannot be captured stop with one line (the capture itself
    needs a GPU and is measured by benchmarks/gpu_issue7.sh, modes graph and fast-graph)."""
    import pytest

    from ebdiff.errors import ConfigError

    gpu = torch.device("cuda")  # resolving needs no GPU when the precision is given
    cfg = TrainConfig(mixed_precision="bf16", cuda_graph=True)
    f = resolve_fast_path(cfg, gpu)
    assert f.cuda_graph and f.compile == "default" and "whole-step-graph" in f.describe()
    assert resolve_fast_path(TrainConfig(mixed_precision="bf16", cuda_graph=True, compile="none"), gpu).compile == "none"
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainConfig(), FastPath(cuda_graph=True))
    assert opt.param_groups[0]["capturable"]
    for bad, msg in [(dict(), "needs a CUDA device"), (dict(compile="reduce-overhead"), "both make CUDA graphs"),
                     (dict(ema_warmup=True), "ema_warmup=false")]:
        dev = torch.device("cpu") if not bad else gpu
        with pytest.raises(ConfigError, match=msg):
            resolve_fast_path(TrainConfig(mixed_precision="bf16", cuda_graph=True, **bad), dev)
    with pytest.raises(ConfigError, match="one process"):
        resolve_fast_path(cfg, gpu, world=2)


def test_each_compiled_step_starts_from_clean_dynamo_caches(monkeypatch):
    """Runs that build many compiled steps in one process (EB extraction, `ebdiff experiment`) would
    otherwise pass dynamo's recompile limit and fall back to eager without a word."""
    calls = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append(1))
    model = build_model("tiny")
    loss = DiffusionLoss(Schedule.linear())
    for comp in ("default", "none", "default"):
        fast = FastPath(compile=comp)
        TrainStep(model, model, make_optimizer(model.parameters(), TrainConfig(), fast), None, loss, 1.0, fast)
    assert len(calls) == 2  # compilation is lazy: nothing was compiled here
