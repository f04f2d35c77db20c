import json

import numpy as np
import pytest
import torch
from conftest import needs_cxx, tiny_args
from safetensors.torch import load_file

from ebdiff.backbones import build_model, example_inputs
from ebdiff.cli import main


def weights(run, it, name="model.safetensors"):
    return load_file(str(run / "checkpoints" / f"ckpt-{it:09d}" / name))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bitwise_resume_dense(tmp_path, has_fmnist):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *tiny_args(a, "train.iters=20")]) == 0
    assert main(["train", *tiny_args(b, "train.iters=10")]) == 0
    assert main(["train", "--resume", str(b), "train.iters=20"]) == 0
    assert same(weights(a, 20), weights(b, 20))
    assert same(weights(a, 20, "ema.safetensors"), weights(b, 20, "ema.safetensors"))
    assert not same(weights(a, 20), weights(a, 10))
    lines = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    logs = [x for x in lines if "loss" in x]
    assert [x["iter"] for x in logs] == [5, 10, 15, 20]
    assert all(k in logs[0] for k in ("loss", "images_per_s", "wall_s", "lr"))
    assert (a / "config.yaml").is_file() and (a / "summary.json").is_file()


@pytest.mark.parametrize("split,carry", [(4, False), (14, False), (4, True), (14, True)])
def test_bitwise_resume_early_bird(tmp_path, has_fmnist, split, carry):
    """Resume before the ticket (search phase) and after it (ticket phase) both continue exactly, with the
    ticket's optimizer state and EMA fresh or carried over from the dense phase (early_bird.carry_state)."""
    eb = ["early_bird.ratio=0.5", "early_bird.check_every=2", "early_bird.eta=0.5", "early_bird.queue=3",
          f"early_bird.carry_state={str(carry).lower()}"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *tiny_args(a, "train.iters=20", "train.ckpt_every=2", *eb)]) == 0
    ticket = json.loads((a / "ticket.json").read_text())
    assert ticket["iteration"] == 6 and ticket["check"] == 2  # eta 0.5: drawn at the first full queue
    assert main(["train", *tiny_args(b, f"train.iters={split}", "train.ckpt_every=2", *eb)]) == 0
    assert main(["train", "--resume", str(b), "train.iters=20"]) == 0
    assert same(weights(a, 20), weights(b, 20))
    assert same(weights(a, 20, "ema.safetensors"), weights(b, 20, "ema.safetensors"))
    assert json.loads((b / "ticket.json").read_text())["iteration"] == ticket["iteration"]
    state = torch.load(a / "checkpoints" / f"ckpt-{20:09d}" / "state.pt", weights_only=True)
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {20.0 if carry else 14.0}  # carried: Adam's step counts go on from the dense phase
    assert state["ema_steps"] == (20 if carry else 14)


def test_carried_ticket_state_is_the_dense_state_restricted_to_the_kept_channels():
    """early_bird.carry_state: Adam's moments and the EMA of a ticket equal the dense ones pruned by the
    same plan (torch-pruning itself slicing them), exactly; the step counts go on."""
    import copy

    from ebdiff.pruning.engine import PruningEngine, apply_plan, extract, kept_entries
    from ebdiff.training.step import EMA, carry_ema, carry_optimizer

    torch.manual_seed(0)
    dense = build_model("tiny")
    opt, ema = torch.optim.Adam(dense.parameters(), lr=1e-3), EMA(dense, 0.9)
    for _ in range(3):
        dense(**example_inputs(dense, 2)).sample.square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update(dense)
    eng = PruningEngine(dense)
    plan = eng.plan(eng.mask("magnitude", 0.5))
    small = extract(dense, plan)
    opt2, ema2 = torch.optim.Adam(small.parameters(), lr=1e-3), EMA(small, 0.9)
    kept = kept_entries(dense, plan)
    carry_optimizer(opt, dense, opt2, small, kept)
    carry_ema(ema, ema2, kept)

    def pruned(values: dict) -> dict:  # the dense model holding `values` instead of its weights, pruned by the plan
        m = copy.deepcopy(dense)
        m.load_state_dict({**m.state_dict(), **values})
        return apply_plan(m, plan).state_dict()

    params = dict(dense.named_parameters())
    for key in ("exp_avg", "exp_avg_sq"):
        want = pruned({n: opt.state[p][key] for n, p in params.items()})
        got = {n: opt2.state[p][key] for n, p in small.named_parameters()}
        assert all(torch.equal(got[n], want[n]) for n in got)
    assert {float(opt2.state[p]["step"]) for p in small.parameters()} == {3.0}
    assert any(opt2.state[p]["exp_avg"].shape != params[n].shape for n, p in small.named_parameters())
    want = apply_plan(copy.deepcopy(ema.module), plan).state_dict()
    assert same(ema2.module.state_dict(), want) and (ema2.updates, ema2.steps) == (3, 3)
    sd = dense.state_dict()  # the same indices give the ticket's own weights
    assert all(torch.equal(sd[n].reshape(-1)[kept[n]], v) for n, v in small.state_dict().items() if n in kept)


def test_early_bird_run_and_artifacts(tmp_path, has_fmnist, capsys):
    run = tmp_path / "eb"
    eb = ["early_bird.ratio=0.5", "early_bird.check_every=2", "early_bird.eta=0.3", "early_bird.queue=3"]
    assert main(["train", *tiny_args(run, "train.iters=16", *eb)]) == 0
    out = capsys.readouterr().out
    assert "ticket" in out and "search cost" in out
    t = json.loads((run / "ticket.json").read_text())
    for k in ("check", "iteration", "search_seconds", "ratio", "dense", "ticket", "check_seconds_mean"):
        assert k in t
    assert t["ticket"]["params"] < t["dense"]["params"] and t["ticket"]["macs"] < t["dense"]["macs"]
    with np.load(run / "masks.npz") as z:
        assert z["masks"].shape[0] == t["check"] + 1 and z["masks"].shape[1] == z["sizes"].sum()
    dm = np.load(run / "hamming.npy")
    assert dm.shape == (t["check"] + 1,) * 2 and np.allclose(dm, dm.T)
    assert (run / "hamming.png").stat().st_size > 1000
    s = json.loads((run / "summary.json").read_text())
    assert s["dense_iterations"] == t["iteration"] and s["ticket_iterations"] == 16 - t["iteration"]
    assert s["ticket"]["params"] == t["ticket"]["params"]
    # the ticket reloads without pickle and samples
    grid = tmp_path / "g.png"
    assert main(["sample", str(run), "--n", "4", "--steps", "3", "--out", str(grid)]) == 0
    imgs = np.load(grid.with_suffix(".npz"))["images"]
    assert imgs.shape == (4, 32, 32, 1) and imgs.dtype == np.uint8


@needs_cxx
def test_compiled_sampling_matches_eager(tmp_path, has_fmnist, capsys):
    """sample --compile (inductor; the GPU default adds CUDA graphs) gives the eager images; the last,
    smaller batch is padded to the compiled batch shape."""
    run = tmp_path / "r"
    assert main(["train", *tiny_args(run, "train.iters=4")]) == 0
    args = ["sample", str(run), "--n", "5", "--batch-size", "4", "--steps", "3"]
    assert main([*args, "--compile", "none", "--out", str(tmp_path / "e.png")]) == 0
    assert main([*args, "--compile", "default", "--out", str(tmp_path / "c.png")]) == 0
    assert "compile=default" in capsys.readouterr().out
    e, c = (np.load(tmp_path / f"{k}.npz")["images"].astype(int) for k in "ec")
    assert e.shape == c.shape == (5, 32, 32, 1)
    assert np.abs(e - c).max() <= 1  # uint8 rounding of fp32 reassociation noise


@pytest.mark.parametrize("crit", ["taylor", "diff-pruning", "random"])
def test_other_criteria_and_ema_source(tmp_path, has_fmnist, crit):
    run = tmp_path / crit
    eb = ["early_bird.ratio=0.3", f"early_bird.criterion={crit}", "early_bird.check_every=2",
          "early_bird.eta=0.5", "early_bird.queue=2", "early_bird.mask_source=ema",
          "early_bird.taylor_timesteps=4", "early_bird.taylor_batch=2"]
    assert main(["train", *tiny_args(run, "train.iters=8", *eb)]) == 0
    t = json.loads((run / "ticket.json").read_text())
    assert t["criterion"] == crit and t["mask_source"] == "ema"
    with np.load(run / "masks.npz") as z:
        assert z["sizes"].sum() > 100 and 0.15 < z["masks"][-1].mean() < 0.35  # real masks of the EMA model
    assert t["ticket"]["params"] < t["dense"]["params"]


def test_miss_then_continue_dense_or_extract_anyway(tmp_path, has_fmnist, capsys):
    # eta so small that masks which change at all never converge
    eb = ["early_bird.ratio=0.5", "early_bird.check_every=2", "early_bird.eta=1e-12", "early_bird.queue=3",
          "early_bird.max_search_iters=6", "train.lr=0.05"]
    run = tmp_path / "miss"
    assert main(["train", *tiny_args(run, "train.iters=10", *eb)]) == 0
    assert "no Early-Bird ticket within 6 iterations" in capsys.readouterr().out
    s = json.loads((run / "summary.json").read_text())
    assert s["phase"] == "dense" and s["dense_iterations"] == 10 and s["ticket"] is None
    checks = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eb_check" in x]
    assert [c["iter"] for c in checks] == [2, 4, 6]  # the search stops at max_search_iters
    run2 = tmp_path / "anyway"
    assert main(["train", *tiny_args(run2, "train.iters=10", *eb, "early_bird.on_miss=extract-anyway")]) == 0
    t = json.loads((run2 / "ticket.json").read_text())
    assert t["found"] is False and t["iteration"] == 6
    assert json.loads((run2 / "summary.json").read_text())["phase"] == "ticket"


def test_bad_input_one_line_nonzero(tmp_path, has_fmnist, capsys):
    # unknown key / negative iterations / bad EB settings
    for args in (["train.itres=5"], ["train.iters=-1"], ["early_bird.ratio=1.5"], ["early_bird.queue=1"],
                 ["early_bird.eta=0"], ["early_bird.criterion=l3"]):
        assert main(["train", "--out", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ebdiff: error:") and "\n" not in err
    assert not (tmp_path / "x").exists()  # nothing written
    # missing dataset
    assert main(["train", *tiny_args(tmp_path / "m", "train.iters=2", f"data.root={tmp_path / 'nowhere'}",
                                     "data.download=false")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Fashion-MNIST not found" in err and "apt-get install dataset-fashion-mnist" in err and "\n" not in err
    assert not (tmp_path / "m" / "checkpoints").exists()


def test_corrupt_checkpoint(tmp_path, has_fmnist, capsys):
    run = tmp_path / "c"
    assert main(["train", *tiny_args(run, "train.iters=5")]) == 0
    ck = run / "checkpoints" / "ckpt-000000005"
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    (ck / "ema.safetensors").write_bytes(b"garbage")
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read weights" in err and "\n" not in err
    assert not (tmp_path / "s.png").exists()
    (ck / "ema.safetensors").write_bytes(before["ema.safetensors"])
    (ck / "state.pt").write_bytes(before["state.pt"][:100])
    assert main(["train", "--resume", str(run), "train.iters=8"]) == 2
    assert "cannot read training state" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-000000005"]
    # a run folder is never silently overwritten
    assert main(["train", *tiny_args(run, "train.iters=5")]) == 2
    assert "--resume" in capsys.readouterr().err


def test_state_loads_weights_only(tmp_path, has_fmnist):
    run = tmp_path / "w"
    assert main(["train", *tiny_args(run, "train.iters=5")]) == 0
    st = torch.load(run / "checkpoints" / "ckpt-000000005" / "state.pt", weights_only=True)
    assert st["iteration"] == 5 and "optimizer" in st and "rng" in st


def test_ddpm_sampler_cli(tmp_path, has_fmnist):
    run = tmp_path / "d"
    assert main(["train", *tiny_args(run, "train.iters=2", "diffusion.timesteps=20")]) == 0
    assert main(["sample", str(run), "--sampler", "ddpm", "--n", "2", "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").is_file()


def test_eval_on_fixture_run(tmp_path, has_fmnist, capsys, monkeypatch):
    monkeypatch.setenv("EBDIFF_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "e"
    assert main(["train", *tiny_args(run, "train.iters=4", "early_bird.ratio=0.5", "early_bird.check_every=1",
                                     "early_bird.queue=2", "early_bird.eta=0.9")]) == 0
    assert main(["eval", str(run), "--n", "48", "--steps", "3", "--classifier-epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "FD-FASHION" not in out and "FD-FMNIST" in out and "floor" in out
    r = json.loads((run / "eval.json").read_text())
    m = r["metrics"]["fd"]
    for k in ("value", "kid", "floor_train_vs_test", "classifier_test_accuracy", "note"):
        assert k in m
    assert m["value"] >= 0 and r["phase"] == "ticket" and r["params"] < 280_177
    assert r["sampling"]["images_per_s"] > 0 and "training_time_s" in r and (run / "samples_eval.png").is_file()
    assert "not Inception FID" in m["note"]
    # Inception FID offline: one clear line, exit 2
    assert main(["eval", str(run), "--n", "8", "--metric", "fid", "--inception-weights",
                 str(tmp_path / "none.pth")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_report(tmp_path, has_fmnist, capsys):
    a, b = tmp_path / "dense", tmp_path / "eb"
    assert main(["train", *tiny_args(a, "train.iters=4")]) == 0
    assert main(["train", *tiny_args(b, "train.iters=4", "early_bird.ratio=0.5", "early_bird.check_every=1",
                                     "early_bird.queue=2", "early_bird.eta=0.9")]) == 0
    assert main(["sample", str(b), "--n", "4", "--steps", "2"]) == 0
    out = tmp_path / "rep"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| dense | dense |" in md and "EB magnitude 50%" in md and "speed-up" in md
    for png in ("loss_curves.png", "heatmaps.png", "samples.png"):
        assert (out / png).stat().st_size > 1000
    assert main(["report", str(tmp_path / "nothing"), "--out", str(out)]) == 2


@pytest.mark.parametrize("extra", [["diffusion.timestep_sampler=speed", "diffusion.loss_weighting=min-snr"],
                                   ["diffusion.loss_weighting=speed", "diffusion.t_min=240",
                                    "diffusion.t_max=460", "early_bird.ratio=0.5", "early_bird.check_every=2"]])
def test_speed_and_min_snr_train(tmp_path, has_fmnist, extra):
    run = tmp_path / "s"
    assert main(["train", *tiny_args(run, "train.iters=4", *extra)]) == 0
    logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert logs and all(np.isfinite(x["loss"]) for x in logs)


def test_reinit_ticket_is_freshly_initialised(tmp_path, has_fmnist):
    from ebdiff.runs.checkpoint import load_model, resolve_checkpoint

    eb = ["early_bird.ratio=0.5", "early_bird.check_every=2", "early_bird.queue=2", "early_bird.eta=0.9"]
    a, b = tmp_path / "keep", tmp_path / "reinit"
    assert main(["train", *tiny_args(a, "train.iters=4", "train.lr=0.01", *eb)]) == 0
    assert main(["train", *tiny_args(b, "train.iters=4", "train.lr=0.01", "early_bird.reinit=true", *eb)]) == 0
    ma, _ = load_model(resolve_checkpoint(a), ema=False)
    mb, _ = load_model(resolve_checkpoint(b), ema=False)
    assert json.loads((b / "ticket.json").read_text())["reinit"] is True
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)


def test_demo_command_end_to_end(tmp_path, has_fmnist, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "data.limit=256", "train.iters=6", "train.batch_size=8",
                 "early_bird.check_every=2", "early_bird.queue=2", "early_bird.eta=0.9", "sample.steps=3"]) == 0
    text = capsys.readouterr().out
    assert "ticket" in text and "Demo outputs in" in text
    assert (out / "samples_ddim3.png").is_file() and (out / "hamming.png").is_file() and (out / "ticket.json").is_file()
