import json
import os
import time

import pytest
import torch
from conftest import needs_cxx, tiny_args

from ebdiff.backbones import build_model
from ebdiff.config import TrainConfig
from ebdiff.core.diffusion import DiffusionLoss, Schedule
from ebdiff.training import compile_cache as cc
from ebdiff.training.compile_cache import CompileCache, cache_key, compile_counters, resolve_dir, was_hit
from ebdiff.training.step import FastPath, TrainStep, make_optimizer


@pytest.fixture
def inductor_env(monkeypatch):
    """Leave TORCHINDUCTOR_CACHE_DIR as it was after a test that points it somewhere."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")


def test_keys_tell_shapes_settings_and_specialisations_apart():
    dense = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.GroupNorm(4, 8))
    ticket = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(4, 4))  # a pruned copy: fewer channels
    k = cache_key(dense, {"bf16": True}, "cpu", {"x0": [8, 1, 32, 32]})
    assert k == cache_key(dense, {"bf16": True}, "cpu", {"x0": [8, 1, 32, 32]})
    assert k.startswith(torch.__version__[:4]) and "cpu" in k and "/" not in k
    others = [cache_key(ticket, {"bf16": True}, "cpu", {"x0": [8, 1, 32, 32]}),
              cache_key(dense, {"bf16": False}, "cpu", {"x0": [8, 1, 32, 32]}),
              cache_key(dense, {"bf16": True}, "cpu", {"x0": [16, 1, 32, 32]}),
              cache_key([dense, ticket], {"bf16": True}, "cpu", {"x0": [8, 1, 32, 32]})]
    assert len({k, *others}) == 5


def test_the_folder_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("EBDIFF_COMPILE_CACHE", str(tmp_path / "env"))
    assert resolve_dir("auto") == tmp_path / "env" and resolve_dir(None) == tmp_path / "env"
    assert resolve_dir("none") is None and CompileCache.from_setting("none", "cpu") is None
    assert resolve_dir(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.delenv("EBDIFF_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_dir("auto") == tmp_path / "xdg" / "ebdiff" / "compile"


def test_an_unwritable_folder_is_one_warning_line_not_a_crash(tmp_path, capsys, inductor_env):
    (tmp_path / "file").write_text("")
    c = CompileCache(tmp_path / "file" / "cache", "cpu")  # below a file: no one can create it, root neither
    assert not c.activate() and not c.activate()
    c.record("k", step_s=1.0)
    assert c.load_artifacts("k") is None and c.save_artifacts("k") is None and c.timings("k") == {}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ebdiff: warning: compile cache: cannot write the folder")
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_timings_artifacts_and_inductor_folder(tmp_path, capsys, inductor_env):
    c = CompileCache(tmp_path / "c", "cpu")
    assert c.activate()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path / "c" / "inductor"))
    c.record("k", step_s=0.5)
    c.record("k", compile_miss_s=80.0, step_s=0.4)
    rec = c.timings("k")
    assert rec["step_s"] == 0.4 and rec["compile_miss_s"] == 80.0 and rec["device"].startswith("cpu:")
    c.timing_path("bad").write_text("{torn")
    assert c.timings("bad") == {} and c.timings("missing") == {}
    assert c.load_artifacts("missing") is None and not c.has_artifacts("missing")
    c.artifact_path("junk").parent.mkdir(parents=True, exist_ok=True)
    c.artifact_path("junk").write_bytes(b"not an artifact file")
    assert c.load_artifacts("junk") is None
    assert "ebdiff: warning: compile cache:" in capsys.readouterr().err
    # a folder the user chose for inductor stays theirs
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "mine")
    d = CompileCache(tmp_path / "other", "cpu")
    assert d.activate() and d.inductor_dir == str(tmp_path / "mine")
    assert was_hit({"fx_hit": 0, "fx_miss": 0, "aot_hit": 0, "aot_miss": 0},
                   {"fx_hit": 2, "fx_miss": 0, "aot_hit": 1, "aot_miss": 0}) is True
    assert was_hit({"fx_hit": 0, "fx_miss": 0, "aot_hit": 0, "aot_miss": 0},
                   {"fx_hit": 1, "fx_miss": 1, "aot_hit": 0, "aot_miss": 0}) is False


@needs_cxx
def test_artifacts_round_trip_through_a_fresh_inductor_folder(tmp_path, inductor_env):
    """A real inductor compile (forward and backward of a small function): its artifacts, saved after the
    first step, make the same graphs a cache hit in an empty inductor folder (a fresh machine)."""
    def f(x, w):
        return torch.nn.functional.gelu(x @ w).square().sum()

    x = torch.randn(8, 16)

    def step():
        w = torch.randn(16, 16, requires_grad=True)
        torch.compile(f)(x, w).backward()
        return w.grad

    a = CompileCache(tmp_path / "a", "cpu")
    assert a.activate()
    torch._dynamo.reset()
    before = compile_counters()
    t0 = time.perf_counter()
    step()
    cold = time.perf_counter() - t0
    assert was_hit(before, compile_counters()) is False
    path = a.save_artifacts("k")
    assert path is not None and path.stat().st_size > 1000
    b = CompileCache(tmp_path / "b", "cpu")  # nothing in its inductor folder but what the file brings
    assert b.activate() and not any((tmp_path / "b").rglob("*.so"))
    b.artifact_path("k").parent.mkdir(parents=True)
    b.artifact_path("k").write_bytes(path.read_bytes())
    assert b.load_artifacts("k")
    torch._dynamo.reset()
    before = compile_counters()
    step()
    assert was_hit(before, compile_counters()) is True
    assert cold > 0


def _step(tmp_path, monkeypatch, planned):
    torch.manual_seed(0)
    model = build_model("tiny", dropout=0.0)
    fast = FastPath(compile="default", compile_auto=True)
    decisions, compiled = [], []
    monkeypatch.setattr(TrainStep, "_compile", lambda self: compiled.append(self.fast.compile))
    step = TrainStep(model, model, make_optimizer(model.parameters(), TrainConfig(), fast), None,
                     DiffusionLoss(Schedule.linear()), 1.0, fast, cache=CompileCache(tmp_path / "c", "cpu"),
                     planned_iters=lambda: planned, on_decision=decisions.append)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 32, 32, generator=g)
    return step, x0, decisions, compiled


def test_auto_measures_the_uncompiled_step_and_keeps_the_cpu_default_without_records(tmp_path, monkeypatch,
                                                                                   inductor_env):
    step, x0, decisions, compiled = _step(tmp_path, monkeypatch, 10_000)
    for _ in range(6):
        step(x0, torch.randint(0, 1000, (4,)), torch.randn_like(x0))
    assert len(decisions) == 1 and not decisions[0]["compile"] and not compiled
    assert decisions[0]["reason"].startswith("train.compile=auto: not compiling: not enough measured timings")
    assert step.fast.compile == "none" and not step.fast.compile_auto
    rec = step.cache.timings(step.key("none", x0))
    assert rec["step_s"] > 0  # the measured uncompiled step, for the next decision


def test_auto_decides_from_recorded_timings(tmp_path, monkeypatch, inductor_env):
    for planned, expect in ((1000, True), (5, False)):
        step, x0, decisions, compiled = _step(tmp_path / str(planned), monkeypatch, planned)
        step.cache.activate()
        step.cache.record(step.key("none", x0), step_s=0.10)
        step.cache.record(step.key("default", x0), step_s=0.02, compile_hit_s=2.0)
        step(x0, torch.randint(0, 1000, (4,)), torch.randn_like(x0))
        d = decisions[0]
        assert d["compile"] is expect and compiled == (["default"] if expect else [])
        assert d["compile_s"] == 2.0 and d["uncompiled_step_s"] == 0.10 and d["compiled_step_s"] == 0.02
        assert "break-even at 25 iterations" in d["reason"] and "recorded" in d["reason"]


def test_the_trainer_prints_and_logs_the_auto_decision(tmp_path, monkeypatch, capsys, has_fmnist, inductor_env):
    """On a GPU `train.compile=auto` decides per model shape; the trainer prints the one line, logs it in
    metrics.jsonl and summary.json (here forced on the CPU, where auto means no compilation)."""
    from dataclasses import replace

    from ebdiff.cli import main
    from ebdiff.training import trainer as tr

    real = tr.resolve_fast_path
    monkeypatch.setattr(tr, "resolve_fast_path",
                        lambda *a, **k: replace(real(*a, **k), compile="default", compile_auto=True))
    out = tmp_path / "run"
    assert main(["train", *tiny_args(out, "train.iters=6", f"train.compile_cache={tmp_path / 'cc'}")]) == 0
    assert "train.compile=auto: not compiling" in capsys.readouterr().out
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["phase"] for e in events if e.get("event") == "compile_decision"] == ["dense"]
    s = json.loads((out / "summary.json").read_text())
    assert s["compile_decisions"][0]["compile"] is False and s["fast_path"]["compile"] == "none"
    assert list((tmp_path / "cc" / "timings").glob("*.json"))
    assert cc.resolve_dir(str(tmp_path / "cc")) == tmp_path / "cc"
