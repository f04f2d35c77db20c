"""Deploying and feeding ebdiff: model files that run without ebdiff (ONNX, torch.export)."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from test_interop import runs  # noqa: F401  (the module's dense, ticket and TA-EB runs)

import ebdiff
from ebdiff.cli import main

ONNX_ATOL = 1e-4  # onnxruntime's CPU kernels against torch's, float32 (observed: ~2e-6)
PT2_ATOL = 1e-5  # the same aten graph (observed: 0)

# what a user without ebdiff runs: onnxruntime and torch.export.load on every member, dynamic batch
PLAIN = textwrap.dedent("""
    import json, sys
    import numpy as np, onnxruntime as ort, torch
    folder, inputs, out = sys.argv[1:]
    man = json.load(open(f"{folder}/ebdiff.json"))
    ins = dict(np.load(inputs))
    res = {}
    for m in man["members"]:
        sess = ort.InferenceSession(f"{folder}/{m}/model.onnx")
        feed = {i.name: ins[i.name] for i in sess.get_inputs()}
        res[f"{m}/onnx"] = sess.run(None, feed)[0]
        prog = torch.export.load(f"{folder}/{m}/model.pt2").module()
        with torch.no_grad():
            res[f"{m}/pt2"] = prog(*[torch.from_numpy(feed[k]) for k in feed]).numpy()
    k = [sum(int(t) >= s for s in man.get("switch_points", [])) for t in ins["timestep"]]
    np.savez(out, route=np.array(k), **res)
    assert "ebdiff" not in sys.modules and "diffusers" not in sys.modules, "imported ebdiff or diffusers"
""")


@pytest.mark.parametrize("kind", ["dense", "eb", "ta"])
def test_onnx_and_pt2_files_run_without_ebdiff_like_ebdiff_load(runs, tmp_path, kind, capsys):  # noqa: F811
    out = tmp_path / f"{kind}-model"
    assert main(["export", str(runs[kind]), "--out", str(out), "--format", "onnx", "--format", "torch-export"]) == 0
    man = json.loads((out / "ebdiff.json").read_text())
    assert man["files"] == {f: [f"{m}/model.{e}" for m in man["members"]]
                            for f, e in (("onnx", "onnx"), ("torch-export", "pt2"))}
    card = (out / "README.md").read_text()
    assert "## Without ebdiff" in card and "onnxruntime" in card and "torch.export.load" in card
    model = ebdiff.load(out)
    unets = list(model.unets) if kind == "ta" else [model]
    g = torch.Generator().manual_seed(0)
    b = 5  # exported at batch 2: another batch size
    x = torch.randn(b, 1, 32, 32, generator=g)
    t = torch.tensor([0, 250, 490, 510, 999])
    np.savez(tmp_path / "in.npz", sample=x.numpy(), timestep=t.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # not even on the path
    subprocess.run([sys.executable, "-c", PLAIN, str(out), str(tmp_path / "in.npz"), str(tmp_path / "o.npz")],
                   check=True, env=env, cwd=tmp_path)
    got = np.load(tmp_path / "o.npz")
    with torch.no_grad():
        for m, unet in zip(man["members"], unets):
            ref = unet(x, t).sample.numpy()
            assert np.abs(got[f"{m}/onnx"] - ref).max() < ONNX_ATOL, m
            assert np.abs(got[f"{m}/pt2"] - ref).max() < PT2_ATOL, m
        if kind == "ta":  # the manifest's switch points route as RoutedUNet does
            assert got["route"].tolist() == [model.regions.route(int(v), model.route) for v in t]
            routed = np.stack([got[f"{man['members'][k]}/pt2"][i] for i, k in enumerate(got["route"])])
            assert np.abs(routed - model(x, t).sample.numpy()).max() < PT2_ATOL
    # the card's loops sample without ebdiff (2 steps here)
    blocks = re.findall(r"```python\n(.*?)```", card.split("## Without ebdiff")[1], re.S)
    assert len(blocks) == 2
    code = "\n".join(blocks).replace("set_timesteps(50)", "set_timesteps(2)")
    code += "\nimport sys; assert 'ebdiff' not in sys.modules; assert np.isfinite(np.asarray(x)).all()"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)


def test_unknown_export_format_is_one_line_and_writes_nothing(runs, tmp_path, capsys):  # noqa: F811
    assert main(["export", str(runs["dense"]), "--out", str(tmp_path / "m"), "--format", "tflite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ebdiff: error: unknown export format 'tflite'")
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- folders from others stay inside
def _refused(capsys, *argv, match):
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ebdiff: error:") and match in err[0], err


def _files(root):
    return sorted(p for p in root.rglob("*"))


def test_paths_from_an_export_or_a_regions_file_stay_inside_it(runs, tmp_path, capsys):  # noqa: F811
    from ebdiff.runs import interop
    exp = interop.export(runs["eb"], tmp_path / "m")
    before = _files(tmp_path)
    man_path = exp / "ebdiff.json"
    man = json.loads(man_path.read_text())
    for bad in ("../../other-run/checkpoints/ckpt-8", "/etc", "unet/../.."):
        man_path.write_text(json.dumps(dict(man, members=[bad])))
        _refused(capsys, "sample", str(exp), "--n", "2", "--steps", "2", match="ebdiff.json member")
    man_path.write_text(json.dumps(man))
    # a weights file that is a link out of the folder
    (tmp_path / "elsewhere.safetensors").write_bytes((exp / "unet" / interop.WEIGHTS_FILE).read_bytes())
    (exp / "unet" / interop.WEIGHTS_FILE).unlink()
    (exp / "unet" / interop.WEIGHTS_FILE).symlink_to(tmp_path / "elsewhere.safetensors")
    _refused(capsys, "sample", str(exp), "--n", "2", "--steps", "2", match="leads outside")
    # a TA-EB run's regions.json
    ta = tmp_path / "ta"
    import shutil

    shutil.copytree(runs["ta"], ta)
    spec = json.loads((ta / "regions.json").read_text())
    (ta / "regions.json").write_text(json.dumps(dict(spec, members=[spec["members"][0], "../../x"])))
    _refused(capsys, "sample", str(ta), "--n", "2", "--steps", "2", match="regions.json member")
    assert [p for p in _files(tmp_path) if p not in before and ta not in p.parents and p != ta
            and p.name != "elsewhere.safetensors"] == []


@pytest.mark.parametrize("plan, match", [
    ([["conv_in", [3, 1]]], "sorted and unique"),
    ([["conv_in", [1, 1]]], "sorted and unique"),
    ([["conv_in", [-1]]], "non-negative integers"),
    ([["conv_in", [0, 9999]]], "do not fit its 16"),
    ([["conv_in", list(range(16))]], "some must stay"),
    ([["no.such.block", [0]]], "no prunable module 'no.such.block'"),
    ([["conv_in"]], "expected [module name"),
    ("all", "expected a list"),
])
def test_a_pruning_plan_is_checked_before_it_is_replayed(runs, tmp_path, capsys, plan, match):  # noqa: F811
    from ebdiff.pruning.engine import check_plan
    from ebdiff.runs import interop

    exp = interop.export(runs["eb"], tmp_path / "m")
    meta = json.loads((exp / "unet" / "plan.json").read_text())
    assert check_plan(meta["plan"])  # the plan a run wrote passes
    (exp / "unet" / "plan.json").write_text(json.dumps(dict(meta, plan=plan)))
    _refused(capsys, "sample", str(exp), "--n", "2", "--steps", "2", match=match)


def test_inside():
    from pathlib import Path

    from ebdiff.errors import CheckpointError
    from ebdiff.runs.confine import inside

    assert inside(Path("/a/b"), "c/d", "x") == Path("/a/b/c/d")
    for bad in ("..", "../b2", "/a/b/c", "", None, 3):
        with pytest.raises(CheckpointError, match="x "):
            inside(Path("/a/b"), bad, "x")


# ---------------------------------------------------------------------- resume past a damaged checkpoint
def test_resume_skips_a_damaged_newest_checkpoint_and_leaves_it(tmp_path, has_fmnist, capsys):
    from conftest import tiny_args

    run = tmp_path / "R"
    assert main(["train", *tiny_args(run, "train.iters=4", "train.ckpt_every=2")]) == 0
    ck4 = run / "checkpoints" / "ckpt-000000004"
    ema = ck4 / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:100])  # truncated
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.iters=3"]) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint ckpt-000000004" in out and "ema.safetensors" in out and "left in place" in out
    assert json.loads((run / "summary.json").read_text())["iterations"] == 3
    assert ema.stat().st_size == 100  # never deleted or rewritten
    # the checkpoint itself, named: still refused in one line
    _refused(capsys, "train", "--resume", str(ck4), match="")
    # none reads: one line
    for c in (run / "checkpoints").iterdir():
        (c / "state.pt").write_bytes(b"garbage")
    _refused(capsys, "train", "--resume", str(run), "train.iters=5", match="none of the 3 checkpoints")


# ---------------------------------------------------------------------- bad images found before training
def _image_folder(root, n=20, bad=(7,)):
    from PIL import Image

    (root / "a").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((40, 40, 3), i * 10, np.uint8)).save(root / "a" / f"{i:02d}.png")
    for i in bad:
        (root / "a" / f"{i:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_bad_images_are_found_before_the_first_iteration(tmp_path, capsys, monkeypatch):
    from ebdiff.config import DataConfig
    from ebdiff.data import imagecheck
    from ebdiff.data.datasets import load_dataset

    imgs = _image_folder(tmp_path / "imgs", bad=(7, 12))
    cache = tmp_path / "cache"
    run = tmp_path / "r"
    _refused(capsys, "train", "--out", str(run), "model.preset=cifar10", "data.name=imagefolder",
             f"data.root={imgs}", f"data.cache_dir={cache}", "train.device=cpu", "train.progress=false",
             match="07.png")
    assert not run.exists()
    dcfg = DataConfig(name="imagefolder", root=str(imgs), cache_dir=str(cache), bad_images="skip")
    data = load_dataset(dcfg, 32, progress=False)
    assert len(data) == 18 and data.left_out_images == 2
    assert "left out 2 unreadable image(s) of 20" in capsys.readouterr().err
    # remembered: the next load opens no file again, except one that changed
    opened = []
    real = imagecheck.check_file
    monkeypatch.setattr(imagecheck, "check_file", lambda p: opened.append(p.name) or real(p))
    assert len(load_dataset(dcfg, 32, progress=False)) == 18 and opened == []
    _image_folder(tmp_path / "fresh", bad=())
    (imgs / "a" / "07.png").write_bytes((tmp_path / "fresh" / "a" / "07.png").read_bytes())
    assert len(load_dataset(dcfg, 32, progress=False)) == 19 and opened == ["07.png"]


def test_skip_counts_the_left_out_images_in_the_summary(tmp_path, capsys):
    imgs = _image_folder(tmp_path / "imgs")
    run = tmp_path / "r"
    assert main(["train", "--out", str(run), "model.preset=cifar10", "data.name=imagefolder", f"data.root={imgs}",
                 f"data.cache_dir={tmp_path / 'c'}", "data.bad_images=skip", "train.device=cpu",
                 "train.progress=false", "train.iters=1", "train.batch_size=4", "train.ckpt_every=1",
                 "sample.steps=2"]) == 0
    assert json.loads((run / "summary.json").read_text())["left_out_images"] == 1


# ---------------------------------------------------------------------- Hugging Face datasets, offline
@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    """A tiny Fashion-MNIST-like dataset: saved with save_to_disk (train/test splits) and as parquet files."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    root = tmp_path_factory.mktemp("hf")
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), mode="L") for _ in range(24)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"]),
                               "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": imgs, "label": [i % 3 for i in range(24)],
                                     "caption": ["x"] * 24}, features=feats)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(8))}).save_to_disk(str(root / "saved"))
    (root / "pq" / "train").mkdir(parents=True)
    ds.to_parquet(str(root / "pq" / "train" / "part-0.parquet"))
    return root


@pytest.mark.parametrize("where", ["saved", "pq"])
def test_hf_dataset_from_disk_trains_with_its_labels(hf_saved, tmp_path, where, monkeypatch):
    from ebdiff.config import DataConfig
    from ebdiff.data import hf as hf_data
    from ebdiff.data.datasets import load_dataset

    dcfg = DataConfig(name="hf", root=str(hf_saved / where), label_column="label")
    data = load_dataset(dcfg, 32, progress=False)
    assert data.images.shape == (24, 1, 32, 32) and data.labels.tolist()[:4] == [0, 1, 2, 0]
    monkeypatch.setattr(hf_data, "IN_MEMORY_BYTES", 0)  # a large dataset: decoded item by item
    lazy = load_dataset(dcfg, 32, progress=False)
    assert lazy.images is None and torch.equal(lazy.files_dataset[5], data.images[5])
    if where == "saved":
        test = load_dataset(DataConfig(name="hf", root=str(hf_saved / where), split="test"), 32, progress=False)
        assert len(test) == 8 and test.labels is None
        run = tmp_path / "r"
        assert main(["train", "--out", str(run), "model.preset=tiny", "data.name=hf", f"data.root={hf_saved / where}",
                     "data.label_column=label", "model.num_classes=3", "train.iters=2", "train.batch_size=8",
                     "train.device=cpu", "train.progress=false", "sample.steps=2"]) == 0


@pytest.mark.parametrize("over, match", [
    (["data.image_column=picture"], "data.image_column=picture: the dataset has no such column"),
    (["data.image_column=caption"], "is a Value column, not images"),
    (["data.label_column=caption"], "not class indices"),
    (["data.split=validation"], "no split 'validation' (it has: train, test)"),
])
def test_hf_dataset_refusals_are_one_line(hf_saved, tmp_path, capsys, over, match):
    _refused(capsys, "train", "--out", str(tmp_path / "r"), "model.preset=tiny", "data.name=hf",
             f"data.root={hf_saved / 'saved'}", "train.device=cpu", *over, match=match)
    assert not (tmp_path / "r").exists()


def test_a_hub_name_without_a_local_copy_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(capsys, "train", "--out", str(tmp_path / "r"), "model.preset=tiny", "data.name=hf",
             "data.root=zalando-datasets/fashion_mnist", "train.device=cpu", match="reads a local copy only")
