"""The experiment runner: trains every method once, skips finished runs, resumes interrupted ones,
evaluates, and writes the report with the dense-then-prune accounting."""

import json

import pytest
import yaml

from ebdiff.app.assemble import train
from ebdiff.app.experiment import load_experiment, method_config, run_experiment, scale_config
from ebdiff.cli import main
from ebdiff.config import load_config
from ebdiff.errors import ConfigError

TINY = ["model.preset=tiny", "data.limit=256", "train.batch_size=8", "train.device=cpu", "train.progress=false",
        "train.log_every=2", "train.ckpt_every=2", "sample.steps=3", "train.iters=6"]


def write_exp(tmp_path, **extra):
    spec = {"name": "t", "base": "base.yaml", "out": str(tmp_path / "out"), "overrides": TINY,
            "eval": {"metric": "fd", "n": 8, "steps": 3, "classifier_epochs": 1},
            "methods": [
                {"name": "dense"},
                {"name": "pft", "from": "dense", "overrides": ["prune.ratio=0.5", "train.iters=2"]},
                {"name": "scratch", "from": "dense", "overrides": ["prune.ratio=0.5", "prune.reinit=true",
                                                                   "train.iters=2"]},
                {"name": "eb", "overrides": ["early_bird.ratio=0.5", "early_bird.check_every=1",
                                             "early_bird.eta=0.5", "early_bird.queue=2",
                                             "diffusion.timestep_sampler=speed-dual"]},
                {"name": "taeb", "overrides": ["taeb.launch=sequential", "train.iters=3", "early_bird.check_every=1",
                                               "early_bird.queue=2", "early_bird.eta=0.9",
                                               "regions=[{t: [0, 520], ratio: 0.3}, {t: [480, 999], ratio: 0.6}]"]},
            ], **extra}
    (tmp_path / "base.yaml").write_text("model: {preset: tiny}\n")
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_experiment_runs_skips_and_resumes(tmp_path, has_fmnist, monkeypatch, capsys):
    monkeypatch.setenv("EBDIFF_CACHE", str(tmp_path / "cache"))
    path = write_exp(tmp_path)
    exp = load_experiment(path)
    # an interrupted dense run (2 of 6 iterations) is resumed, not restarted
    cfg = method_config(exp, exp.methods[0])
    cfg.train.iters = 2
    train(cfg, exp.out / "dense")
    assert main(["experiment", str(path)]) == 0
    rec = json.loads((exp.out / "experiment.json").read_text())
    actions = {m["name"]: m["action"] for m in rec["methods"]}
    assert actions == {"dense": "resumed", "pft": "trained", "scratch": "trained", "eb": "trained", "taeb": "trained"}
    assert json.loads((exp.out / "dense" / "summary.json").read_text())["iterations"] == 6
    pft = json.loads((exp.out / "pft" / "summary.json").read_text())
    dense = json.loads((exp.out / "dense" / "summary.json").read_text())
    assert pft["time_s"]["dependency_s"] == pytest.approx(dense["time_s"]["train_total"])
    for name in actions:
        assert (exp.out / name / "eval.json").is_file()
    md = (exp.out / "report" / "report.md").read_text()
    for label in ("| dense | dense |", "prune+finetune magnitude 50%", "Scratch 50%", "EB magnitude 50% + SpeeD-dual",
                  "TA-EB 30/60%"):
        assert label in md, label
    # the speed-up of a dense-then-prune baseline is below 1: it pays for the dense run
    row = next(line for line in md.splitlines() if line.startswith("| pft |"))
    assert float(row.rstrip("|").split("|")[-1].strip().rstrip("x")) < 1.0
    # TA-EB: both accountings side by side, one device per branch (longest branch) and one device (the sum)
    a = json.loads((exp.out / "taeb" / "taeb.json").read_text())
    row = next(line for line in md.splitlines() if line.startswith("| taeb |")).rstrip("|").split("|")
    assert row[-2].strip() == f"{a['taeb_train_s']:.1f} / {a['sum_train_s']:.1f}" and " / " in row[-1]
    assert "every branch on one device" in md
    capsys.readouterr()
    # a second call trains and evaluates nothing
    assert main(["experiment", str(path)]) == 0
    rec = json.loads((exp.out / "experiment.json").read_text())
    assert {m["action"] for m in rec["methods"]} == {"skipped"} and {m["eval"] for m in rec["methods"]} == {"current"}
    assert "finished earlier, skipped" in capsys.readouterr().out


def test_experiment_file_errors_and_scale(tmp_path):
    path = write_exp(tmp_path)
    spec = yaml.safe_load(path.read_text())
    for bad, msg in (({"methods": [{"name": "a", "from": "b"}]}, "earlier method"),
                     ({"methods": [{"name": "a"}, {"name": "a"}]}, "unique"),
                     ({"colour": 1}, "unknown key"), ({"reference": "zzz"}, "not one of the methods"),
                     ({"methods": [{"name": "a", "iters": 3}]}, "unknown key")):
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump({**spec, **bad}))
        with pytest.raises(ConfigError, match=msg):
            load_experiment(p)
    cfg = load_config(None, ["train.iters=1000", "train.ckpt_every=500", "early_bird.check_every=10",
                             "regions=[{t: [0, 499], ratio: 0.3, iters: 400}, {t: [480, 999], ratio: 0.6}]"])
    scale_config(cfg, 0.1)
    assert (cfg.train.iters, cfg.train.ckpt_every, cfg.early_bird.check_every) == (100, 50, 1)
    assert cfg.regions[0]["iters"] == 40 and "iters" not in cfg.regions[1]
    exp = load_experiment(path, scale=0.5)
    assert method_config(exp, exp.methods[0]).train.iters == 3
    assert method_config(exp, exp.methods[1]).prune.from_run == str(exp.out / "dense")
    # --only a baseline whose dense run is missing stops with a clear error
    assert run_experiment_only_error(exp)


def run_experiment_only_error(exp):
    with pytest.raises(ConfigError, match="not finished"):
        run_experiment(exp, only=["pft"], evaluate=False, log=lambda *_: None)
    return True


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parents[1].glob("configs/experiments/*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_experiment_files_load(path, tmp_path):
    from ebdiff.app.experiment import plan

    exp = load_experiment(path, out=tmp_path / "x")
    rows = plan(exp)
    assert rows and all(r["status"] == "new" for r in rows) and rows[0]["name"] == exp.reference


def test_from_a_dense_checkpoint(tmp_path, has_fmnist, monkeypatch):
    """`from: NAME@ITER` prunes the dense method's checkpoint at ITER (a budget ladder from one dense run): the
    pruned run records that iteration and that checkpoint's training time, not the dense run's final time."""
    monkeypatch.setenv("EBDIFF_CACHE", str(tmp_path / "cache"))
    spec = {"name": "t", "base": "base.yaml", "out": str(tmp_path / "out"), "overrides": TINY, "eval": None,
            "methods": [{"name": "dense", "overrides": ["train.keep_last=3"]},
                        {"name": "pft-at-2", "from": "dense@2", "overrides": ["prune.ratio=0.5", "train.iters=2"]},
                        {"name": "pft-at-5", "from": "dense@5", "overrides": ["prune.ratio=0.5", "train.iters=2"]}]}
    (tmp_path / "base.yaml").write_text("model: {preset: tiny}\n")
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(spec))
    exp = load_experiment(p)
    assert method_config(exp, exp.methods[1]).prune.from_run == str(exp.out / "dense/checkpoints/ckpt-000000002")
    assert load_experiment(p, scale=2.0).methods[1].source_iteration == 2  # scaled when the config is made:
    assert method_config(load_experiment(p, scale=2.0), exp.methods[1]).prune.from_run.endswith("ckpt-000000004")
    with pytest.raises(ConfigError, match="no checkpoint .*ckpt-000000005"):  # dense@5 was never written
        run_experiment(exp, evaluate=False, log=lambda *_: None)
    facts = json.loads((exp.out / "pft-at-2" / "summary.json").read_text())
    assert facts["pruned_from"]["iteration"] == 2 and facts["pruned_from"]["checkpoint"] == "ckpt-000000002"
    dense = json.loads((exp.out / "dense" / "summary.json").read_text())
    assert 0 < facts["time_s"]["dependency_s"] < dense["time_s"]["train_total"]
    for bad in ("dense@", "dense@0", "dense@x"):
        spec["methods"][1]["from"] = bad
        p.write_text(yaml.safe_dump(spec))
        with pytest.raises(ConfigError, match="NAME@ITERATION"):
            load_experiment(p)
