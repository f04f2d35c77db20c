"""diffusers interop (issue 16): runs as diffusers models, diffusers' schedulers as samplers, exported
model folders, bundled configs and the README's Python API."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_args
from test_sampling import MU, SD, gaussian_eps

from ebdiff.cli import main
from ebdiff.core.diffusion import Schedule
from ebdiff.core.sampling import SAMPLERS, ddim_timesteps, generate
from ebdiff.errors import CheckpointError, ConfigError
from ebdiff.runs import interop

REPO = Path(__file__).resolve().parents[1]
EB = ["early_bird.check_every=1", "early_bird.queue=2", "early_bird.eta=0.9"]  # a ticket at iteration 2


def _train(out, *extra):
    assert main(["train", *tiny_args(out, *extra)]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory, has_fmnist):
    """A dense run, an Early-Bird ticket run and a sequential two-region TA-EB run, each a few iterations."""
    root = tmp_path_factory.mktemp("runs")
    _train(root / "dense", "train.iters=1")
    _train(root / "eb", "train.iters=3", "early_bird.ratio=0.5", *EB)
    assert main(["ta-eb", "--config", "demo_taeb", *tiny_args(root / "ta", "train.iters=3", *EB),
                 "taeb.launch=sequential", "regions=[{t: [0, 500], ratio: 0.3}, {t: [480, 999], ratio: 0.6}]"]) == 0
    return {k: root / k for k in ("dense", "eb", "ta")}


def _eps(model):
    return lambda x, t: model(x, t).sample


def _ebdiff_samples(path, **overrides):
    from ebdiff.evaluate.evaluate import sample_checkpoint

    return sample_checkpoint(path, "cpu", progress=False, **{"n": 2, "steps": 4, "batch_size": 2, "seed": 1,
                                                              **overrides})[0]


def _loaded_samples(model, run, **overrides):
    """The same job as `_ebdiff_samples`, through the generic sampler loop over a loaded model."""
    from ebdiff.evaluate.evaluate import run_sample_config
    from ebdiff.runs.folders import run_config

    cfg = run_config(run)
    dcfg, scfg = run_sample_config(cfg, **{"n": 2, "steps": 4, "batch_size": 2, "seed": 1, **overrides})
    c = model.config
    return generate(_eps(model), scfg.n, (c.in_channels, c.sample_size, c.sample_size), Schedule.from_config(dcfg),
                    sampler=scfg.sampler, steps=scfg.steps, spacing=scfg.spacing, batch_size=scfg.batch_size,
                    seed=scfg.seed, eta=scfg.eta, clip_x0=scfg.clip_x0)


# ---------------------------------------------------------------------- schedulers (exact eps model, no training)
def test_diffusers_schedulers_agree_with_ebdiff_ddim_and_the_data():
    s = Schedule.linear()
    exact = gaussian_eps(s)

    def f(x, t):  # Euler's schedulers hand over float timesteps (integral here)
        assert torch.equal(t, t.round())
        return exact(x, t.round().long())

    def run(sampler, steps, spacing, n=4000, seed=0, **kw):
        spec = SAMPLERS[sampler]
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 1, 1, 1, generator=g)
        return spec.fn(f, x, s, spec.timesteps(1000, steps, spacing), generator=g,
                       **{k: v for k, v in kw.items() if k in spec.options})

    # ebdiff uniform = diffusers leading (steps_offset 0), trailing = trailing; eta 0 and 1, clip on and off
    for spacing in ("uniform", "trailing"):
        for kw in ({}, {"clip_x0": True}, {"eta": 1.0}):
            ours, theirs = run("ddim", 20, spacing, **kw), run("diffusers-ddim", 20, spacing, **kw)
            assert (ours - theirs).abs().max() < 1e-4, (spacing, kw)
    # Euler on an eps model is DDIM in sigma coordinates: the same images, quad spacing included
    for spacing in ("uniform", "quad"):
        assert (run("ddim", 20, spacing) - run("diffusers-euler", 20, spacing)).abs().max() < 1e-4
    # DPM-Solver++ (2nd order) and ancestral Euler reach the data distribution N(MU, SD^2)
    for sampler, steps, spacing, tol in (("diffusers-dpm-solver++", 50, "trailing", 0.02),
                                         ("diffusers-dpm-solver++", 50, "quad", 0.02),
                                         ("diffusers-euler-ancestral", 200, "trailing", 0.03)):
        y = run(sampler, steps, spacing, n=8000)
        assert abs(y.mean().item() - MU) < 0.02 and abs(y.std().item() - SD) < tol, (sampler, spacing, y.std())
    # a spacing a scheduler cannot visit stops with one line
    with pytest.raises(ConfigError, match="quad spacing") as e:
        SAMPLERS["diffusers-ddim"].timesteps(1000, 50, "quad")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="divides T"):
        SAMPLERS["diffusers-ddim"].timesteps(1000, 30, "trailing")  # DDIMScheduler.step assumes a stride of T // n


def test_scheduler_is_configured_to_the_run_schedule():
    from diffusers import DDIMScheduler

    from ebdiff.config import load_config

    cfg = load_config(None, ["diffusion.beta_end=0.03", "sample.clip_x0=true"])
    sched = interop.scheduler("ddim", cfg)
    assert isinstance(sched, DDIMScheduler) and sched.config.clip_sample and sched.config.prediction_type == "epsilon"
    ab = Schedule.from_config(cfg.diffusion).alphas_cumprod
    assert torch.allclose(sched.alphas_cumprod.double(), ab, rtol=1e-5)
    # ebdiff's uniform spacing is diffusers' default (leading, steps_offset 0)
    sched.set_timesteps(50)
    assert sorted(sched.timesteps.tolist()) == ddim_timesteps(1000, 50, "uniform")
    cos = interop.scheduler("euler", load_config(None, ["diffusion.beta_schedule=cosine"]))
    assert torch.allclose(cos.alphas_cumprod.double(), Schedule.cosine().alphas_cumprod, rtol=1e-5)
    with pytest.raises(ConfigError, match="known: ddim"):
        interop.scheduler("plms")


# ---------------------------------------------------------------------- load and export
def test_load_and_export_give_ebdiffs_own_samples(runs, tmp_path, capsys):
    from diffusers import UNet2DModel

    from ebdiff.runs.checkpoint import list_checkpoints, load_model

    for kind, run in runs.items():
        model = interop.load(run)
        assert not model.training
        assert isinstance(model, interop.RoutedUNet if kind == "ta" else UNet2DModel)
        ref = _ebdiff_samples(run)
        assert torch.equal(_loaded_samples(model, run), ref), kind
        # the export of a copy rebuilds the same model once the copy is gone
        copy = tmp_path / f"{kind}-copy"
        shutil.copytree(run, copy)
        assert main(["export", str(copy), "--out", str(tmp_path / f"{kind}-model")]) == 0
        shutil.rmtree(copy)
        exp = tmp_path / f"{kind}-model"
        again = interop.load(exp)
        assert torch.equal(_loaded_samples(again, exp), ref), kind
        assert torch.equal(_ebdiff_samples(exp), ref), kind  # ebdiff sample/eval read an export too
        man = json.loads((exp / "ebdiff.json").read_text())
        assert man["weights"] == "ema" and (exp / "config.yaml").is_file() and not list(tmp_path.glob(".*"))
        card = (exp / "README.md").read_text()
        assert "training time" in card and "MACs" in card
    assert "TA-EB ensemble of 2 region tickets" in (tmp_path / "ta-model" / "README.md").read_text()
    # only a dense model's folder claims to be a diffusers pipeline (a pruned one needs its plan replayed)
    assert (tmp_path / "dense-model" / "model_index.json").is_file()
    assert not (tmp_path / "eb-model" / "model_index.json").exists()
    assert json.loads((tmp_path / "ta-model" / "regions.json").read_text())["regions"][1]["t"] == [480, 999]
    plan = json.loads((tmp_path / "eb-model" / "unet" / "plan.json").read_text())
    assert plan["phase"] == "ticket" and plan["plan"]
    # a checkpoint folder, and the online weights
    first = list_checkpoints(runs["eb"])[0]
    a, b = interop.load(first, ema=False), load_model(first, ema=False)[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(CheckpointError, match="holds the ema weights only"):
        interop.load(tmp_path / "eb-model", ema=False)
    capsys.readouterr()
    # a non-empty --out is refused with one line; an empty one is used
    assert main(["export", str(runs["eb"]), "--out", str(tmp_path / "eb-model")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not an empty folder" in err and "\n" not in err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(runs["eb"]), "--out", str(tmp_path / "empty"), "--no-ema"]) == 0
    assert json.loads((tmp_path / "empty" / "ebdiff.json").read_text())["weights"] == "online"


def test_export_is_atomic(runs, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(interop, "model_card", broken)
    with pytest.raises(RuntimeError):
        interop.export(runs["eb"], tmp_path / "m")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin


def test_dense_export_is_a_diffusers_pipeline_folder(runs, tmp_path):
    from diffusers import DDIMPipeline

    interop.export(runs["dense"], tmp_path / "m")
    pipe = DDIMPipeline.from_pretrained(tmp_path / "m")  # plain diffusers: no ebdiff code involved
    ours = interop.load(tmp_path / "m")
    x, t = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 900])
    with torch.no_grad():
        assert (pipe.unet(x, t).sample - ours(x, t).sample).abs().max() < 1e-4
    assert pipe.scheduler.config.num_train_timesteps == 1000 and pipe.scheduler.config.beta_end == 0.02
    assert "plain diffusers: `DDIMPipeline.from_pretrained" in (tmp_path / "m" / "README.md").read_text()


def test_diffusers_pipeline_samples_a_ticket_and_an_ensemble_like_ebdiff_ddim(runs, capsys):
    from diffusers import DDIMPipeline

    from ebdiff.core.sampling import ddim_sample

    for kind in ("eb", "ta"):
        run = runs[kind]
        model = interop.load(run)
        pipe = DDIMPipeline(model, interop.scheduler("ddim", run))
        pipe.set_progress_bar_config(disable=True)
        clip = pipe.scheduler.config.clip_sample  # the run's sample.clip_x0: on in demo_taeb.yaml, off by default
        assert clip == (kind == "ta")
        # ebdiff's clip_x0 also re-derives eps from the clipped x0: diffusers' use_clipped_model_output
        imgs = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(3),
                    use_clipped_model_output=clip, output_type="np").images
        x = torch.randn((2, 1, 32, 32), generator=torch.Generator().manual_seed(3))  # the pipeline's noise
        eps = model if kind == "ta" else _eps(model)  # the ensemble routes each step through model.at(t)
        ref = ddim_sample(eps, x, Schedule.linear(), ddim_timesteps(1000, 5, "uniform"), clip_x0=clip)
        ref = ((ref / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
        assert imgs.shape == (2, 32, 32, 1) and np.abs(imgs - ref).max() < 1e-4, kind
    # the CLI: a diffusers scheduler by name; one that cannot visit the run's quad spacing says what to pass
    assert main(["sample", str(runs["ta"]), "--scheduler", "dpm-solver++", "--n", "2", "--steps", "4",
                 "--out", str(runs["ta"] / "dpm.png")]) == 0
    assert "diffusers-dpm-solver++, 4 steps, quad spacing" in capsys.readouterr().out
    assert np.load(runs["ta"] / "dpm.npz")["images"].shape == (2, 32, 32, 1)
    assert main(["sample", str(runs["eb"]), "--scheduler", "ddim", "--n", "2", "--steps", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--spacing uniform" in err and "\n" not in err


def test_routed_unet_routes_each_sample_by_its_timestep(runs):
    model = interop.load(runs["ta"])
    a, b = model.unets
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700, 480])  # 480 is in the overlap: the higher-noise region (higher-noise routing)
    with torch.no_grad():
        out = model(x, t).sample
        assert torch.equal(out[0], a(x[:1], t[:1]).sample[0])
        assert torch.equal(out[1:], b(x[1:], t[1:]).sample)
        assert torch.equal(model(x[:1], 10).sample, a(x[:1], 10).sample)  # a Python int, as diffusers allows
        assert model(x, torch.tensor(900), return_dict=False)[0].shape == x.shape
    assert model.config.sample_size == 32 and model.config.in_channels == 1 and model.dtype == torch.float32
    assert model.config.regions[0]["t"] == [0, 500] and model.device.type == "cpu"


# ---------------------------------------------------------------------- bundled configs and the README's Python API
def test_configs_are_found_by_name_outside_the_repository(tmp_path, monkeypatch, capsys):
    from ebdiff.app.experiment import load_experiment
    from ebdiff.config import bundled_configs, find_config, load_config

    assert (REPO / "configs").resolve() == bundled_configs()  # one copy: the repository links to the package's
    monkeypatch.chdir(tmp_path)
    for name in ("fmnist", "fmnist.yaml", "configs/fmnist.yaml"):
        assert find_config(name) == bundled_configs() / "fmnist.yaml"
    assert load_config("cifar10").model.preset == "cifar10"
    assert load_experiment("cifar10_table4").name == "cifar10_table4"
    assert load_experiment("configs/experiments/fmnist_table4_cpu.yaml").name == "fmnist_table4_cpu"
    (tmp_path / "fmnist.yaml").write_text("model: {preset: tiny}\n")  # a path wins over a bundled name
    assert load_config("fmnist.yaml").model.preset == "tiny"
    assert main(["train", "--config", "nosuch", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "config file not found: nosuch" in err and "demo_taeb" in err and "\n" not in err


def test_readme_python_api_runs(tmp_path, monkeypatch, has_fmnist):
    """The README's library example, run as written, with its sizes made small."""
    text = (REPO / "README.md").read_text()
    code = re.search(r"<!-- python-api -->\n```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 14
    small = {'"train.iters=300"': ", ".join(f'"{o}"' for o in ["train.iters=3", "data.limit=256", "train.batch_size=8",
                                                                  "train.progress=false", "train.device=cpu", *EB]),
             "batch_size=16": "batch_size=2", "num_inference_steps=50": "num_inference_steps=5"}
    for old, new in small.items():
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["summary"]["phase"] == "ticket" and len(scope["images"]) == 2
    assert (tmp_path / "sample.png").is_file() and (tmp_path / "models" / "api" / "ebdiff.json").is_file()


def test_model_card_reports_quality_and_time():
    facts = {"phases": ["ticket"], "preset": "cifar10", "weights": "ema", "iterations": [900000], "params": 8.97e6,
             "macs": 1.52e9, "dense": {"params": 35.75e6, "macs": 6.06e9}, "ticket_iteration": 4000,
             "dense_iterations": 4000, "ticket_iterations": 896000, "train_s": 7200.0,
             "quality": [{"metric": "FID", "value": 7.32, "kid": 0.0051, "floor": None, "n": 50000, "steps": 100,
                          "checkpoint": "ckpt-000900000"}]}
    card = interop.model_card("c10-eb50", "unet", facts)
    for line in ("An Early-Bird ticket", "| parameters | 8.97M |", "| MACs (one image) | 1.52G |",
                 "35.75M params, 6.06G MACs", "iteration 4000", "4000 dense + 896000 pruned", "| training time | 7200.0 s |",
                 "| FID | 7.320 (KID 0.0051; 50000 samples, 100 steps, ckpt-000900000) |", "plain diffusers cannot"):
        assert line in card, line
    assert "not measured" in interop.model_card("m", "unet", dict(facts, quality=[]))


def test_the_python_api_is_imported_on_first_use():
    import ebdiff

    assert {"load", "export", "scheduler", "train", "load_config", "RoutedUNet", "Config"} <= set(dir(ebdiff))
    assert ebdiff.load is interop.load and ebdiff.RoutedUNet is interop.RoutedUNet
    with pytest.raises(AttributeError):
        ebdiff.nothing_here


def test_the_taeb_worker_entry_point_knows_diffusers_samplers():
    """A TA-EB worker (`python -m ebdiff.app.taeb_worker RUN`) reads a config naming a diffusers scheduler: the
    application layer registers them on import, as the CLI and `ebdiff`'s API do."""
    import subprocess
    import sys

    code = ("import ebdiff.app.taeb_worker\nfrom ebdiff.config import load_config\n"
            "print(load_config(None, ['sample.sampler=diffusers-ddim']).sample.sampler)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "diffusers-ddim"
