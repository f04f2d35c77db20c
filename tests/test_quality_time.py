"""Quality over training time (issue 15): evaluation points during training, their cadence and resume,
training time that excludes evaluation, wall-clock budgets, time to quality, and TA-EB's two size
weightings."""

import json
import shutil

import pytest
from conftest import tiny_args

from ebdiff.cli import main
from ebdiff.config import load_config
from ebdiff.errors import ConfigError
from ebdiff.evaluate.quality_curves import Point, time_to_quality, time_to_target, verdict
from ebdiff.evaluate.training_eval import Cadence, ensemble_plan
from ebdiff.runs.checkpoint import read_records, records_upto

EVAL = ["train.eval_n=16", "train.eval_steps=3", "train.eval_classifier_epochs=1"]


def evals(run):
    return [r for r in read_records(run / "metrics.jsonl") if r.get("event") == "eval"]


# ---------------------------------------------------------------------- pure logic
def test_time_to_target_on_hand_made_curves():
    c = [Point(10, 200.0), Point(20, 150.0), Point(30, 120.0), Point(40, 125.0)]
    assert time_to_target(c, 150.0) == 20  # a point exactly at the target reaches it
    assert time_to_target(c, 130.0) == 30  # the first point at or below
    assert time_to_target(c, 130.0, interpolate=True) == pytest.approx(20 + (150 - 130) / (150 - 120) * 10)
    assert time_to_target(c, 150.0, interpolate=True) == 20
    assert time_to_target(c, 250.0, interpolate=True) == 10  # the first point: nothing before it to interpolate from
    assert time_to_target(c, 119.9) is None and time_to_target(c, 119.9, interpolate=True) is None  # no extrapolation
    assert time_to_target([], 1.0) is None
    assert time_to_target(list(reversed(c)), 130.0) == 30  # points are taken in time order


def test_time_to_quality_speedups_and_verdict():
    curves = {"dense": [Point(10, 200), Point(20, 150), Point(30, 140), Point(40, 145)],  # final 145, first <= at 30
              "eb": [Point(5, 190), Point(10, 144), Point(15, 130)],
              "taeb": [Point(8, 300), Point(16, 160)]}
    t = time_to_quality(curves, "dense", target=150, train_s={"dense": 40, "eb": 15, "taeb": 16})
    assert t["reference_final"] == 145 and t["reference_to_final_s"] == 30 and t["reference_to_target_s"] == 20
    rows = {r["name"]: r for r in t["rows"]}
    assert rows["dense"]["to_reference_s"] == 30 and rows["dense"]["speedup_at_reference"] == 1.0
    assert rows["eb"]["to_reference_s"] == 10 and rows["eb"]["speedup_at_reference"] == 3.0
    assert rows["eb"]["to_target_s"] == 10 and rows["eb"]["speedup_at_target"] == 2.0
    assert rows["eb"]["paper_speedup"] == pytest.approx(40 / 15)
    assert rows["taeb"]["to_reference_s"] is None and rows["taeb"]["speedup_at_reference"] is None
    assert rows["taeb"]["best"] == {"value": 160, "train_s": 16} and rows["taeb"]["final"]["value"] == 160
    line = verdict(t, "dense", "eb", "FD", {"eb": "EB 50%"})
    assert line.startswith("EB 50% reached the better FD") and "EB 50% 130.00 after 15 s, dense 145.00 after 40 s" in line
    assert "after 10 s (speed-up at equal quality 3.00x)" in line
    assert verdict(t, "dense", "taeb", "FD").startswith("dense reached the better FD")


def test_cadence_log_truncation_and_ensemble_plan():
    it = Cadence.of(5)
    assert (it.unit, it.every) == ("iters", 5)
    assert it.next_due(0) == 5 and it.next_due(5) == 10 and it.next_due(7) == 10  # as iteration % 5 == 0
    s = Cadence.of("2.5s")
    assert (s.unit, s.every) == ("seconds", 2.5) and s.position(100, 6.0) == 6.0
    assert s.next_due(0.0) == 2.5 and s.next_due(2.6) == 5.0 and s.next_due(7.6) == 10.0  # skipped multiples stay skipped
    assert Cadence.of(None) is None
    for bad in ("s", "-3s", "10 min", 0, "1.5"):  # "1.5" parses as a float: iterations are whole
        with pytest.raises(ConfigError, match="train.eval_every") as e:
            load_config(None, [f"train.eval_every={bad}"])
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="120s"):
        Cadence.of("12")  # a quoted number in a YAML file: neither iterations nor seconds
    with pytest.raises(ConfigError, match="train.max_seconds"):
        load_config(None, ["train.max_seconds=0"])
    lines = ['{"iter": 5, "loss": 1}', '{"event": "eval", "iter": 10}', '{"iter": 11, "loss": 1}', "{bro",
             '{"note": "no iteration"}', ""]
    assert records_upto(lines, 10) == lines[:2] + [lines[4]]
    a = [{"iter": 4, "train_s": 1.0, "snapshot": "a4"}, {"iter": 8, "train_s": 2.0, "snapshot": "a8"}]
    b = [{"iter": 4, "train_s": 1.5, "snapshot": "b4"}, {"iter": 6, "train_s": 2.5, "snapshot": "b6"},
         {"iter": 9, "train_s": 3.0, "snapshot": "b9"}]
    p = ensemble_plan([a, b])
    assert [x["iters"] for x in p] == [[4, 4], [8, 6], [8, 9]]  # the shorter branch gives its last snapshot
    assert [x["train_s"] for x in p] == [1.5, 2.5, 3.0] and p[2]["snapshots"] == ["a8", "b9"]
    assert ensemble_plan([a, []]) == []


def test_taeb_size_weightings_on_the_cifar10_regions():
    """The paper's Table 4 TA-EB size (7.2M / 1.3G) is the weighting by timesteps (uniform over T), not by
    the 100 quad-spaced DDIM steps. Per-region sizes: `ebdiff info --preset cifar10 --ratio 0.3 ...`."""
    from ebdiff.core.regions import RegionSet
    from ebdiff.core.sampling import ddim_timesteps
    from ebdiff.training.taeb_spec import size_weightings

    regions = RegionSet.from_config([{"t": [0, 260], "ratio": 0.3}, {"t": [240, 460], "ratio": 0.6},
                                     {"t": [440, 999], "ratio": 0.8}])
    params, macs = [19_851_157, 8_594_415, 2_162_709], [3_391_878_598, 1_490_435_796, 374_773_638]
    w = size_weightings(regions, params, macs, ddim_timesteps(1000, 100, "quad"), "higher-noise", "ddim 100 quad")
    s, t = w["sampling_steps"], w["timesteps"]
    assert s["steps_per_region"] == [55, 19, 26] and t["timesteps_per_region"] == [240, 200, 560]
    assert round(s["params"] / 1e6, 2) == 13.11 and round(s["macs"] / 1e9, 2) == 2.25
    assert round(t["params"] / 1e6, 2) == 7.69 and round(t["macs"] / 1e9, 2) == 1.32
    assert "paper" in t["definition"] and "sampler visits" in s["definition"]


# ---------------------------------------------------------------------- training runs (tiny preset, CPU)
def test_eval_points_resume_without_gaps_and_report(tmp_path, has_fmnist, monkeypatch, capsys):
    monkeypatch.setenv("EBDIFF_CACHE", str(tmp_path / "cache"))
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    ev = ["train.eval_every=2", "train.ckpt_every=2", *EVAL]
    assert main(["train", *tiny_args(a, "train.iters=6", *ev)]) == 0
    pa = evals(a)
    assert [p["iter"] for p in pa] == [2, 4, 6] and all(p["metric"] == "FD-FMNIST" and p["n"] == 16 for p in pa)
    assert [p["train_s"] for p in pa] == sorted(p["train_s"] for p in pa)
    assert "evaluation" in capsys.readouterr().out and (a / "samples_curve.png").is_file()
    s = json.loads((a / "summary.json").read_text())
    assert s["stopped"] == "iters" and s["time_s"]["eval_s"] > 0
    # evaluation leaves training as it was: the same weights as a run without it
    assert main(["train", *tiny_args(c, "train.iters=6", "train.ckpt_every=2")]) == 0
    assert (a / "checkpoints/ckpt-000000006/model.safetensors").read_bytes() == \
        (c / "checkpoints/ckpt-000000006/model.safetensors").read_bytes()
    # a crash after the point at iteration 6 was logged but before its checkpoint: the resume drops the
    # records past iteration 4 and continues the curve exactly (no gap, no duplicate)
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "ckpt-000000006")
    assert main(["train", "--resume", str(b)]) == 0
    pb = evals(b)
    assert [p["iter"] for p in pb] == [2, 4, 6] and [p["value"] for p in pb] == [p["value"] for p in pa]
    losses = [r["iter"] for r in read_records(b / "metrics.jsonl") if "loss" in r]
    assert losses == sorted(set(losses))
    # Early-Bird: the curve continues across the extraction (the EMA of the ticket afterwards)
    eb = tmp_path / "eb"
    assert main(["train", *tiny_args(eb, "train.iters=6", "train.eval_every=2", *EVAL, "early_bird.ratio=0.5",
                                     "early_bird.check_every=2", "early_bird.queue=2", "early_bird.eta=0.9")]) == 0
    pe = evals(eb)
    assert [p["iter"] for p in pe] == [2, 4, 6] and [p["phase"] for p in pe] == ["dense", "ticket", "ticket"]
    # the report: quality curves, time to the reference's final quality and to a target, report.json
    rep = tmp_path / "rep"
    target = max(p["value"] for p in pa + pe) + 1.0  # every run reaches it at its first point
    assert main(["report", str(a), str(eb), "--out", str(rep), "--target", str(target)]) == 0
    md = (rep / "report.md").read_text()
    assert "## Time to quality" in md and f"time to FD-FMNIST {target:g}" in md and "paper's speed-up" in md
    assert (rep / "quality_curves.png").stat().st_size > 1000 and "quality_curves.png" in md
    j = json.loads((rep / "report.json").read_text())["time_to_quality"]
    rows = {r["name"]: r for r in j["rows"]}
    assert j["reference"] == "a" and j["reference_final"] == pa[-1]["value"] and j["target"] == target
    assert rows["eb"]["to_target_s"] == pytest.approx(pe[0]["train_s"]) and rows["eb"]["points"] == 3
    assert rows["a"]["speedup_at_target"] == 1.0 and rows["eb"]["paper_speedup"] is not None
    assert "Time to quality" in capsys.readouterr().out


def test_training_time_excludes_evaluation_and_wall_clock_budget(tmp_path, has_fmnist, monkeypatch):
    """On a clock that moves only while a (stand-in) scorer works, evaluation shows in eval_s and nowhere
    else: not in the training time, the points' train_s, the logged wall clock. train.max_seconds stops
    a run cleanly (real clock)."""
    from ebdiff.app.assemble import train
    from ebdiff.app.experiment import run_status
    from ebdiff.config import load_config
    from ebdiff.evaluate import training_eval
    from ebdiff.training import trainer as trainer_module

    class Clock:
        now = 0.0

        def perf_counter(self):
            return self.now

    clock = Clock()

    class SlowScorer:
        def __call__(self, x):
            clock.now += 100.0
            return {"name": "FD-TEST", "extractor": "none", "value": float(x.abs().mean()), "kid": 0.0}

    with monkeypatch.context() as m:
        m.setattr(training_eval, "make_scorer", lambda *a, **k: SlowScorer())
        m.setattr(trainer_module, "time", clock)
        m.setattr(training_eval, "time", clock)
        over = tiny_args(tmp_path, "train.iters=6", "train.eval_every=2", "train.log_every=2", "train.eval_n=4",
                         "train.eval_steps=2")[2:]
        run = tmp_path / "slow"
        s = train(load_config(None, over), run)
    pts, logs = evals(run), [r for r in read_records(run / "metrics.jsonl") if "loss" in r]
    assert [p["iter"] for p in pts] == [2, 4, 6] and [p["eval_s"] for p in pts] == [100.0] * 3
    assert [p["train_s"] for p in pts] == [0.0] * 3 and [r["wall_s"] for r in logs] == [0.0] * 3
    t = s["time_s"]
    assert t["eval_s"] == 300.0 and t["own_total"] == 0.0 and t["wall_s"] == 0.0 and t["train_total"] == 0.0
    # a run that died before its first checkpoint starts again: its stale records go
    shutil.rmtree(run / "checkpoints")
    with monkeypatch.context() as m:
        m.setattr(training_eval, "make_scorer", lambda *a, **k: SlowScorer())
        train(load_config(None, over), run)
    assert [p["iter"] for p in evals(run)] == [2, 4, 6]
    # a wall-clock budget, on a clock that moves 1/8 s at every reading (a step is one: exactly 0.125 s):
    # it stops with a checkpoint, a final point and a finished summary; points every 0.5 s of training
    clock.now, tick = 0.0, 0.125

    class Ticking:
        def perf_counter(self):
            clock.now += tick
            return clock.now - tick

    monkeypatch.setattr(training_eval, "make_scorer", lambda *a, **k: (lambda x: {
        "name": "FD-TEST", "extractor": "none", "value": 1.0, "kid": 0.0}))
    monkeypatch.setattr(trainer_module, "time", Ticking())
    monkeypatch.setattr(training_eval, "time", Ticking())
    cfg = load_config(None, tiny_args(tmp_path, "train.iters=100000", "train.max_seconds=1",
                                      "train.eval_every=0.25s", "train.eval_n=4", "train.eval_steps=2")[2:])
    run = tmp_path / "budget"
    s = train(cfg, run)
    assert s["stopped"] == "max_seconds" and s["iterations"] == 8 and s["time_s"]["own_total"] == 1.0
    assert [p["iter"] for p in evals(run)] == [2, 4, 6, 8] and (run / "checkpoints/ckpt-000000008").is_dir()
    assert run_status(run, cfg) == "done"
    assert train(cfg, run, resume=True)["iterations"] == 8  # nothing left to train
    cfg.train.max_seconds = 1.25  # a larger budget continues it, and its curve
    assert run_status(run, cfg) == "resume"
    assert train(cfg, run, resume=True)["iterations"] == 10
    assert [p["iter"] for p in evals(run)] == [2, 4, 6, 8, 10]


def test_demo_compare_same_time_both_grids_and_a_verdict(tmp_path, has_fmnist, monkeypatch, capsys):
    """`ebdiff demo --compare` on a clock that moves 1/8 s per reading (fast and exact), with a stand-in
    scorer: both runs stop on the same time budget, the report has the curves and both grids, and one
    line says which reached the better quality."""
    from ebdiff.evaluate import training_eval
    from ebdiff.training import trainer as trainer_module
    class Ticking:
        now = 0.0

        def perf_counter(self):
            self.now += 0.125
            return self.now

    monkeypatch.setattr(trainer_module, "time", Ticking())
    monkeypatch.setattr(training_eval, "time", Ticking())
    monkeypatch.setattr(training_eval, "make_scorer", lambda *a, **k: (lambda x: {
        "name": "FD-TEST", "extractor": "none", "value": float(x.std()), "kid": 0.0}))
    out = tmp_path / "cmp"
    assert main(["demo", "--compare", "--seconds", "1", "--out", str(out), "data.limit=256", "train.batch_size=8",
                 "train.eval_n=4", "train.eval_steps=2", "early_bird.check_every=2", "early_bird.queue=2",
                 "early_bird.eta=0.9"]) == 0
    text = capsys.readouterr().out
    line = text.strip().splitlines()[-1]
    assert "in the same training time:" in line and "EB magnitude 50%" in line and "dense" in line
    for name in ("dense", "eb-magnitude-50"):
        s = json.loads((out / name / "summary.json").read_text())
        assert s["stopped"] == "max_seconds" and s["time_s"]["own_total"] >= 1.0
        assert len(evals(out / name)) >= 2
    assert (out / "report" / "quality_curves.png").is_file() and (out / "report" / "samples.png").is_file()
    assert main(["demo", "--seconds", "5", "--out", str(tmp_path / "x")]) == 2  # --seconds belongs to --compare
