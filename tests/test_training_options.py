"""Issue 16, the training options diffusion users expect: gradient accumulation, lr warm-up and
schedules, diffusers-style EMA settings, trackers (TensorBoard, offline W&B), --resume of a parent folder."""

import json

import pytest
import torch
from conftest import tiny_args
from safetensors.torch import load_file

from ebdiff.backbones import build_model
from ebdiff.cli import main
from ebdiff.config import TrainConfig
from ebdiff.core.diffusion import DiffusionLoss, Schedule
from ebdiff.training.step import EAGER_FP32, EMA, TrainStep, lr_factor, make_optimizer


def _train_steps(accum: int, steps: int = 3) -> dict:
    torch.manual_seed(0)
    model = build_model("tiny", dropout=0.0)  # dropout draws would differ between micro-batches
    opt = make_optimizer(model.parameters(), TrainConfig(lr=1e-3), EAGER_FP32)
    step = TrainStep(model, model, opt, EMA(model, 0.9), DiffusionLoss(Schedule.linear()), 1.0, EAGER_FP32, accum=accum)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x0 = torch.rand(8, 1, 32, 32, generator=g) * 2 - 1
        losses.append(float(step(x0, torch.randint(0, 1000, (8,), generator=g), torch.randn(8, 1, 32, 32, generator=g))))
    return {"losses": losses, **{k: v.clone() for k, v in model.state_dict().items()}}


def test_gradient_accumulation_equals_the_whole_batch():
    whole, acc = _train_steps(1), _train_steps(2)
    assert all(abs(a - b) < 1e-5 * max(1, abs(a)) for a, b in zip(whole.pop("losses"), acc.pop("losses")))
    diff = max((whole[k] - acc[k]).abs().max().item() for k in whole)
    assert diff < 1e-5, diff
    assert any(not torch.equal(v, build_model("tiny").state_dict()[k]) for k, v in acc.items())  # it trained


def test_gradient_accumulation_resumes_bit_exactly(tmp_path, has_fmnist):
    a, b = tmp_path / "a", tmp_path / "b"
    opts = ["train.grad_accum=2", "train.ckpt_every=3"]
    assert main(["train", *tiny_args(a, "train.iters=6", *opts)]) == 0
    assert main(["train", *tiny_args(b, "train.iters=3", *opts)]) == 0
    assert main(["train", "--resume", str(b), "train.iters=6"]) == 0
    wa = load_file(str(a / "checkpoints/ckpt-000000006/model.safetensors"))
    wb = load_file(str(b / "checkpoints/ckpt-000000006/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert main(["train", *tiny_args(tmp_path / "c", "train.grad_accum=3")]) == 2  # 8 is not divisible by 3


def test_warmup_and_schedules():
    f = lr_factor("constant", 4, 100)
    assert [f(i) for i in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor("constant", 0, 100)(57) == 1.0
    c = lr_factor("cosine", 10, 110)
    assert c(5) == 0.5 and c(10) == 1.0 and abs(c(60) - 0.5) < 1e-9 and c(110) == 0.0
    lin = lr_factor("linear", 0, 100)
    assert lin(0) == 1.0 and abs(lin(25) - 0.75) < 1e-12


def test_warmup_in_a_run_logs_the_scheduled_lr(tmp_path, has_fmnist):
    run = tmp_path / "w"
    assert main(["train", *tiny_args(run, "train.iters=6", "train.lr_warmup=4", "train.lr=0.001",
                                     "train.log_every=1")]) == 0
    lrs = [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.0, 0.00025, 0.0005, 0.00075, 0.001, 0.001])  # the lr each step used


def test_ema_power_warmup_matches_diffusers_emamodel():
    from diffusers.training_utils import EMAModel

    model = build_model("tiny")
    ref = EMAModel(model.parameters(), decay=0.9999, min_decay=0.1, update_after_step=3, use_ema_warmup=True,
                   inv_gamma=2.0, power=0.75)
    ema = EMA(model, 0.9999, power=0.75, inv_gamma=2.0, min_decay=0.1, start=3)
    for step in range(4, 200, 7):
        assert ema.decay_at(step - 3) == pytest.approx(ref.get_decay(step)), step
    # the first `start` steps copy the online weights, then updates every `every` steps
    src = torch.nn.Linear(1, 1)
    e = EMA(src, 0.5, start=2, every=2)
    seen = []
    for v in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
        with torch.no_grad():
            src.weight.fill_(v)
        e.update(src)
        seen.append(float(e.module.weight))
    assert seen == [1.0, 2.0, 2.0, 3.0, 3.0, 4.5] and e.updates == 2 and e.steps == 6


def test_tensorboard_and_sample_grids(tmp_path, has_fmnist):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    assert main(["train", *tiny_args(run, "train.iters=4", "train.log_every=2", "train.log_with=tensorboard",
                                     "train.sample_every=2", "early_bird.ratio=0.5", "early_bird.check_every=1",
                                     "early_bird.queue=2", "early_bird.eta=0.9")]) == 0
    acc = EventAccumulator(str(next((run / "tensorboard").rglob("events.out.tfevents.*")).parent)).Reload()
    tags = acc.Tags()
    assert {"loss", "lr", "images_per_s", "eb_check/max_distance", "ticket/iteration"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [2, 4]
    logged = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx(logged)
    assert "samples" in tags["images"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["iter-000000002.png", "iter-000000004.png"]
    # the grids' time is kept out of the training time and the wall clock, as evaluation's is
    grid_s = sum(r["seconds"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                 if r.get("event") == "samples")
    assert json.loads((run / "summary.json").read_text())["time_s"]["eval_s"] >= grid_s > 0


def test_wandb_offline_without_a_network(tmp_path, has_fmnist, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "wb"
    assert main(["train", *tiny_args(run, "train.iters=2", "train.log_every=1", "train.log_with=wandb")]) == 0
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and b"loss" in files[0].read_bytes()


def test_resume_accepts_a_parent_folder(tmp_path, has_fmnist, capsys):
    import os
    import time

    parent = tmp_path / "exp"
    assert main(["train", *tiny_args(parent / "a", "train.iters=2")]) == 0
    time.sleep(0.05)
    assert main(["train", *tiny_args(parent / "b", "train.iters=2")]) == 0
    os.utime(parent / "a" / "checkpoints" / "ckpt-000000002", (time.time() + 10,) * 2)  # a is the newest
    assert main(["train", "--resume", str(parent), "train.iters=3"]) == 0
    assert f"resuming the newest run under {parent}: {parent / 'a'}" in capsys.readouterr().out
    assert json.loads((parent / "a" / "summary.json").read_text())["iterations"] == 3
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
