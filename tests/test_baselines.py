"""Dense-then-prune baselines (train-prune-finetune, Scratch): they run, resume exactly, and their
accounting carries the dense training they depend on."""

import json

import pytest
import torch
from conftest import tiny_args
from safetensors.torch import load_file

from ebdiff.cli import main


def weights(run, it, name="model.safetensors"):
    return load_file(str(run / "checkpoints" / f"ckpt-{it:09d}" / name))


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, has_fmnist):
    run = tmp_path_factory.mktemp("dense") / "dense"
    assert main(["train", *tiny_args(run, "train.iters=12")]) == 0
    return run


@pytest.mark.parametrize("criterion,reinit", [("magnitude", False), ("taylor", False), ("random", True)])
def test_prune_from_run_accounting(tmp_path, dense_run, criterion, reinit, capsys):
    run = tmp_path / "pft"
    args = tiny_args(run, "train.iters=6", f"prune.from_run={dense_run}", f"prune.criterion={criterion}",
                     "prune.ratio=0.5", f"prune.reinit={str(reinit).lower()}")
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    assert ("Scratch" if reinit else "prune+finetune") in out or "scratch" in out
    s = json.loads((run / "summary.json").read_text())
    d = json.loads((dense_run / "summary.json").read_text())
    pf = s["pruned_from"]
    assert pf["method"] == ("scratch" if reinit else "prune-finetune") and pf["iteration"] == 12
    assert s["phase"] == "pruned" and s["dense_iterations"] == 12 and s["ticket_iterations"] == 6
    t = s["time_s"]
    assert t["dependency_s"] == pytest.approx(d["time_s"]["train_total"])
    assert t["train_total"] == pytest.approx(t["own_total"] + t["dependency_s"])
    assert t["dense_s"] == 0 and t["sparse_s"] > 0 and t["extract_s"] > 0
    assert s["ticket"]["params"] < s["dense"]["params"] and s["ticket"]["macs"] < s["dense"]["macs"]


def test_prune_keeps_dense_weights_and_scratch_does_not(tmp_path, dense_run):
    ema = load_file(str(dense_run / "checkpoints" / "ckpt-000000012" / "ema.safetensors"))
    got = {}
    for reinit in (False, True):
        run = tmp_path / f"r{reinit}"
        assert main(["train", *tiny_args(run, "train.iters=1", "train.lr=1e-12", f"prune.from_run={dense_run}",
                                          f"prune.reinit={str(reinit).lower()}", "prune.ratio=0.3")]) == 0
        got[reinit] = weights(run, 1)
    # conv_out is never pruned: after one step at lr ~0 fine-tuning keeps the dense EMA weights
    assert torch.allclose(got[False]["conv_out.weight"], ema["conv_out.weight"], atol=1e-6)
    assert not torch.allclose(got[True]["conv_out.weight"], ema["conv_out.weight"], atol=1e-3)


def test_prune_resume_is_exact(tmp_path, dense_run):
    a, b = tmp_path / "a", tmp_path / "b"
    extra = [f"prune.from_run={dense_run}", "prune.ratio=0.5", "train.ckpt_every=2"]
    assert main(["train", *tiny_args(a, "train.iters=8", *extra)]) == 0
    assert main(["train", *tiny_args(b, "train.iters=4", *extra)]) == 0
    assert main(["train", "--resume", str(b), "train.iters=8"]) == 0
    wa, wb = weights(a, 8), weights(b, 8)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((b / "summary.json").read_text())["pruned_from"]["iteration"] == 12


def test_prune_errors(tmp_path, dense_run, capsys):
    def error(*extra):
        assert main(["train", *tiny_args(tmp_path / "x", "train.iters=1", *extra)]) == 2
        return capsys.readouterr().err

    assert "exclude each other" in error(f"prune.from_run={dense_run}", "early_bird.ratio=0.5")
    pft = tmp_path / "p"
    assert main(["train", *tiny_args(pft, "train.iters=1", f"prune.from_run={dense_run}")]) == 0
    assert "must be a dense run" in error(f"prune.from_run={pft}")
    assert "no checkpoint there" in error(f"prune.from_run={tmp_path / 'nothing'}")
