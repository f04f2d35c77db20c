"""The DiT backbone: presets, pruning correctness per head and MLP channel, training with an Early-Bird search,
bitwise resume across the ticket extraction, loading a run, and the DiT paper's size convention."""

import json

import pytest
import torch
from conftest import tiny_args
from test_train import same, weights

import ebdiff
from ebdiff.app.info import format_sizes, size_rows
from ebdiff.backbones import backbone_of, backbone_of_preset, build_model, count_macs_params, eps_fn
from ebdiff.cli import main
from ebdiff.core.diffusion import DiffusionLoss, Schedule
from ebdiff.pruning.engine import PruningEngine, ScoreProbe, channel_zero_mask_, extract


def _pair(num_classes, criterion, multiple=1, seed=0):
    torch.manual_seed(seed)
    m = build_model("dit-tiny", 0.0, num_classes).eval()
    # a trained model's adaLN is not zero: perturb every weight so that no block is the identity
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    eng = PruningEngine(m)
    probe = None
    if criterion in ("taylor", "diff-pruning"):
        x0 = torch.rand(4, 1, 32, 32) * 2 - 1
        labels = None if num_classes is None else torch.arange(4) % num_classes
        probe = ScoreProbe(x0, DiffusionLoss(Schedule.linear()), 4, None, 0, labels)
    mask = eng.mask(criterion, 0.5, probe, seed=1, multiple=multiple)
    small = extract(m, eng.plan(mask)).eval()
    channel_zero_mask_(m, eng, mask)  # the engine's graph holds m's modules: zero the dense model itself
    return m, small, eng, mask


@pytest.mark.parametrize("num_classes,criterion", [(None, "magnitude"), (10, "magnitude"), (10, "random"),
                                                   (10, "taylor"), (None, "diff-pruning")])
def test_ticket_equals_zeroed_dense(num_classes, criterion):
    """Removing heads' channels and MLP channels is exactly zeroing them (the softmax scale stays the dense
    head width), conditional or not, for every criterion."""
    dense, small, eng, mask = _pair(num_classes, criterion)
    assert 0.3 < mask.pruned_fraction < 0.6
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([3, 400, 999])
    cond = None if num_classes is None else torch.tensor([0, 9, num_classes])  # the null class too
    with torch.no_grad():
        a, b = eps_fn(small)(x, t, cond), eps_fn(dense)(x, t, cond)
    assert a.shape == x.shape
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert count_macs_params(small)[0] < 0.7 * count_macs_params(dense)[0]


def test_groups_are_heads_and_mlp_channels():
    m = build_model("dit-tiny")
    eng = PruningEngine(m)
    kinds = {i.name.split(".", 2)[-1]: (i.kind, i.gn_groups, i.size) for i in eng.info}
    assert kinds == {"attn1.to_v": ("heads", 4, 64), "ff.net.0.proj": ("plain", 1, 256)}
    assert len(eng.info) == 2 * 4  # two groups per block; residual width, embedders, final layer left whole


def test_round_channels_keeps_heads_consistent():
    _, small, _, _ = _pair(10, "magnitude", multiple=4)
    for b in small.transformer_blocks:
        a = b.attn1
        assert a.to_q.out_features == a.to_k.out_features == a.to_v.out_features == a.to_out[0].in_features
        assert (a.to_v.out_features // a.heads) % 4 == 0 and a.to_v.out_features % a.heads == 0
        assert b.ff.net[0].proj.out_features % 4 == 0
        assert a.scale == 16 ** -0.5  # the dense head width's softmax scale


def test_presets_and_latent():
    assert backbone_of_preset("dit-tiny").name == "dit" and not backbone_of_preset("dit-tiny").latent
    lat = backbone_of_preset("dit-xl2-imagenet256")
    assert lat.latent and lat.latent_channels("dit-xl2-imagenet256") == 4
    assert lat.image_shape("dit-xl2-imagenet256") == (3, 256) and lat.classes("dit-xl2-imagenet256") == 1000
    m = build_model("dit-tiny", num_classes=10)
    assert backbone_of(m).model_classes(m) == 10 and m.config.out_channels == 1  # eps only: no learned sigma
    assert backbone_of(build_model("dit-tiny")).model_classes(build_model("dit-tiny")) is None


def test_info_paper_convention():
    """DiT-XL/2 in the paper: 675M params, 118.6 Gflops (multiply-adds); B/2: 130M, 23.01G."""
    rows = size_rows("dit-xl2-imagenet256", [0.5])
    assert rows[0]["params"] > 749e6  # diffusers' per-block embedders
    assert round(rows[0]["paper_params"] / 1e6) == 675 and round(rows[0]["paper_macs"] / 1e8) == 1186
    assert rows[1]["paper_macs"] < 0.55 * rows[0]["paper_macs"]
    assert "DiT paper's convention" in format_sizes(rows)
    b2 = size_rows("dit-b2-imagenet256")[0]
    assert round(b2["paper_params"] / 1e6) == 130 and round(b2["paper_macs"] / 1e7) == 2301


EB = ["model.preset=dit-tiny", "early_bird.ratio=0.5", "early_bird.check_every=2", "early_bird.eta=0.5",
      "early_bird.queue=3"]


def test_early_bird_run_loads_and_samples(tmp_path, has_fmnist):
    run = tmp_path / "eb"
    assert main(["train", *tiny_args(run, "train.iters=12", "model.num_classes=10", *EB)]) == 0
    t = json.loads((run / "ticket.json").read_text())
    assert t["iteration"] == 6 and t["ticket"]["params"] < t["dense"]["params"]
    model = ebdiff.load(run)
    assert type(model).__name__ == "DiTTransformer2DModel"
    assert sum(p.numel() for p in model.parameters()) == t["ticket"]["params"]
    grid = tmp_path / "g.png"
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--out", str(grid)]) == 0


def test_bitwise_resume_across_extraction(tmp_path, has_fmnist):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *tiny_args(a, "train.iters=8", "train.ckpt_every=2", *EB)]) == 0
    assert main(["train", *tiny_args(b, "train.iters=4", "train.ckpt_every=2", *EB)]) == 0
    assert main(["train", "--resume", str(b), "train.iters=8"]) == 0  # the ticket is drawn at iteration 6
    assert same(weights(a, 8), weights(b, 8))
    assert json.loads((b / "ticket.json").read_text())["iteration"] == 6


def test_latent_dit_with_guidance(tmp_path, has_fmnist):
    """A latent DiT (the tiny VQ autoencoder's 3x8x8 latents, 10 classes): Early-Bird search with label dropout,
    resume, sampling by class with classifier-free guidance."""
    from diffusers import VQModel

    from ebdiff.data.latents import TINY_VQ, save_autoencoder

    torch.manual_seed(0)
    vq = save_autoencoder(VQModel(**TINY_VQ), tmp_path / "vq")
    args = ["model.preset=dit-latent-tiny", f"model.autoencoder={vq}", f"data.latent_cache={tmp_path / 'lat'}",
            "data.limit=64", "model.dropout=0", "model.latent_scale=std", "model.class_dropout=0.5",
            "early_bird.ratio=0.5", "early_bird.check_every=2", "early_bird.queue=2", "early_bird.eta=0.9",
            "train.ckpt_every=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *tiny_args(a, "train.iters=8", *args)]) == 0
    assert main(["train", *tiny_args(b, "train.iters=6", *args)]) == 0
    assert main(["train", "--resume", str(b), "train.iters=8"]) == 0
    assert same(weights(a, 8), weights(b, 8))
    meta = json.loads((a / "checkpoints" / "ckpt-000000008" / "meta.json").read_text())
    assert meta["phase"] == "ticket" and meta["num_classes"] == 10 and meta["image_shape"] == [3, 8, 8]
    out = tmp_path / "s.png"
    assert main(["sample", str(a), "--n", "4", "--steps", "3", "--class", "2", "--class", "7", "--guidance", "2",
                 "--out", str(out)]) == 0


def test_every_ratio_extracts_and_trains():
    torch.manual_seed(0)
    m = build_model("dit-tiny", num_classes=10)
    eng = PruningEngine(m)
    macs = []
    for r in (0.1, 0.3, 0.5, 0.7, 0.9):
        small = extract(m, eng.plan(eng.mask("magnitude", r)))
        macs.append(count_macs_params(small)[0])
        x = torch.randn(2, 1, 32, 32)
        eps_fn(small)(x, torch.tensor([1, 500]), torch.tensor([3, 10])).square().mean().backward()
        assert all(p.grad is not None for n, p in small.named_parameters() if "class_embedder" not in n)
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == len(macs)


def test_prune_from_run_baseline_with_taylor(tmp_path, has_fmnist):
    d = tmp_path / "d"
    assert main(["train", *tiny_args(d, "train.iters=2", "model.preset=dit-tiny", "model.num_classes=10")]) == 0
    p = tmp_path / "p"
    assert main(["train", *tiny_args(p, "train.iters=2", "model.preset=dit-tiny", "model.num_classes=10",
                                     f"prune.from_run={d}", "prune.ratio=0.5", "prune.criterion=taylor")]) == 0
    s = json.loads((p / "summary.json").read_text())
    assert s["ticket"]["macs"] < 0.6 * s["dense"]["macs"]
    assert sum(q.numel() for q in ebdiff.load(p).parameters()) == s["ticket"]["params"]


def test_taeb_with_two_dit_regions(tmp_path, has_fmnist):
    """TA-EB on DiT: one DiT ticket per timestep region (30% and 70%), routed at sampling time, loaded as one
    model and exported."""
    run = tmp_path / "ta"
    args = tiny_args(run, "model.preset=dit-tiny", "model.num_classes=10", "train.iters=8", "early_bird.check_every=2",
                     "early_bird.queue=2", "early_bird.eta=0.9", "taeb.launch=sequential",
                     "regions=[{t: [0, 520], ratio: 0.3}, {t: [480, 999], ratio: 0.7}]")
    assert main(["ta-eb", "--config", "configs/demo_taeb.yaml", *args]) == 0
    a = json.loads((run / "taeb.json").read_text())
    assert len(a["branches"]) == 2 and all(b["ticket_found"] for b in a["branches"])
    params = [b["params"] for b in a["branches"]]
    assert params[0] > params[1] and min(params) < a["weighted_params"] < max(params)
    model = ebdiff.load(run)
    assert [type(m).__name__ for m in model.unets] == ["DiTTransformer2DModel"] * 2
    assert [sum(p.numel() for p in m.parameters()) for m in model.unets] == params
    x, y = torch.randn(2, 1, 32, 32), torch.tensor([1, 2])
    with torch.no_grad():  # each timestep reaches its region's ticket
        for t, k in ((100, 0), (900, 1)):
            want = eps_fn(model.unets[k])(x, torch.tensor([t, t]), y)
            assert torch.equal(model(x, t, class_labels=y).sample, want)
    assert main(["sample", str(run), "--n", "2", "--steps", "4", "--class", "3",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "x")]) == 0
    again = ebdiff.load(tmp_path / "x")
    for m0, m1 in zip(model.unets, again.unets):
        assert same(m0.state_dict(), m1.state_dict())


def _vq_args(tmp_path):
    from diffusers import VQModel

    from ebdiff.data.latents import TINY_VQ, save_autoencoder

    torch.manual_seed(0)
    vq = save_autoencoder(VQModel(**TINY_VQ), tmp_path / "vq")
    return ["model.preset=dit-latent-tiny", f"model.autoencoder={vq}", f"data.latent_cache={tmp_path / 'lat'}",
            "data.limit=64", "model.dropout=0", "model.latent_scale=std"]


def test_dense_latent_dit_export_is_a_diffusers_dit_pipeline(tmp_path, has_fmnist):
    """`ebdiff export` of a dense latent DiT is a DiTPipeline folder (transformer, scheduler, vae): plain diffusers
    samples it as ebdiff's DDIM and decoder do, and ebdiff.load reads it back."""
    from diffusers import DiTPipeline

    from ebdiff.core.sampling import ddim_sample, ddim_timesteps
    from ebdiff.data.latents import LatentDecoder
    from ebdiff.runs.interop import read_models

    run, out = tmp_path / "r", tmp_path / "x"
    assert main(["train", *tiny_args(run, "train.iters=2", *_vq_args(tmp_path))]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert json.loads((out / "ebdiff.json").read_text())["kind"] == "transformer"
    pipe = DiTPipeline.from_pretrained(out)  # plain diffusers: no ebdiff code involved
    pipe.set_progress_bar_config(disable=True)
    imgs = pipe(class_labels=[1, 7], guidance_scale=1.0, num_inference_steps=4,
                generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert imgs.shape == (2, 1, 32, 32) and torch.isfinite(imgs).all()
    ours, y = ebdiff.load(run), torch.tensor([1, 7])
    x, t = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(3)), torch.tensor([999, 3])
    with torch.no_grad():
        assert (pipe.transformer(x, t, class_labels=y).sample - ours(x, t, class_labels=y).sample).abs().max() < 1e-5
        z = ddim_sample(lambda a, b: ours(a, b, class_labels=y).sample, x, Schedule.linear(),
                        ddim_timesteps(1000, 4, "uniform"))  # from the pipeline's noise
    meta = read_models(run).metas[0]
    ref = (LatentDecoder(meta["latent"])(z) / 2 + 0.5).clamp(0, 1)
    assert (imgs - ref).abs().max() < 1e-4
    assert pipe.vae.config.scaling_factor == meta["latent"]["scale"] != 1.0  # latent_scale=std, as ebdiff divides
    again = read_models(out)  # self-contained: the export's own vae/
    assert same(again.models[0].state_dict(), ours.state_dict())
    assert again.metas[0]["latent"]["autoencoder"] == str(out / "vae")
    assert "DiTPipeline.from_pretrained('x')" in (out / "README.md").read_text()


def test_dense_pixel_dit_export_loads_in_diffusers_and_a_ticket_does_not(tmp_path, has_fmnist):
    """A pixel DiT has no autoencoder for DiTPipeline's `vae`: its folder's transformer and scheduler load in
    plain diffusers (the card's loop samples them); a ticket's pruned widths need ebdiff.load."""
    import re
    import subprocess
    import sys

    from diffusers import DiTTransformer2DModel

    run, out = tmp_path / "eb", tmp_path / "x"
    assert main(["train", *tiny_args(run, "train.iters=2", "model.num_classes=10", *EB)]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert not (out / "model_index.json").exists() and not (out / "vae").exists()
    theirs, ours = DiTTransformer2DModel.from_pretrained(out, subfolder="transformer"), ebdiff.load(run)
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([999, 3]), torch.tensor([4, 10])
    with torch.no_grad():
        assert (theirs(x, t, class_labels=y).sample - ours(x, t, class_labels=y).sample).abs().max() < 1e-5
    assert same(ebdiff.load(out).state_dict(), ours.state_dict())
    code = re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S)[0]
    code = code.replace("set_timesteps(50)", "set_timesteps(3)") + "\nassert images.shape == (16, 1, 32, 32)" \
        "\nassert torch.isfinite(images).all() and 'ebdiff' not in __import__('sys').modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    # a ticket: per-block head and MLP widths, which a DiTTransformer2DModel config cannot express
    assert main(["train", "--resume", str(run), "train.iters=8"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "t")]) == 0
    with pytest.raises(ValueError, match="expected shape"):
        DiTTransformer2DModel.from_pretrained(tmp_path / "t", subfolder="transformer")
    assert "plain diffusers cannot load this model" in (tmp_path / "t" / "README.md").read_text()
    assert same(ebdiff.load(tmp_path / "t").state_dict(), ebdiff.load(run).state_dict())


@pytest.mark.parametrize("num_classes", [None, 10])
def test_ticket_onnx_and_torch_export_files(tmp_path, num_classes):
    """A DiT ticket's eps as ONNX and `.pt2` files (written at batch 2) agree with the model at batch 3,
    unconditional (the null class filled in inside the file) or class-conditional."""
    import onnxruntime as ort

    from ebdiff.runs.export_formats import write_files

    _, small, _, _ = _pair(num_classes, "magnitude")
    write_files(tmp_path, small, ["onnx", "torch-export"])
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([5, 500, 999])
    y = None if num_classes is None else torch.tensor([0, 9, 10])
    with torch.no_grad():
        ref = eps_fn(small)(x, t, y)
        feed = {"sample": x.numpy(), "timestep": t.numpy(), **({} if y is None else {"class_labels": y.numpy()})}
        got = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feed)[0]
        assert abs(torch.from_numpy(got) - ref).max() < 1e-4
        pt2 = torch.export.load(str(tmp_path / "model.pt2")).module()
        assert (pt2(x, t, *([] if y is None else [y])) - ref).abs().max() < 1e-5


def test_speed_min_snr_eval_points_and_time_to_quality(tmp_path, has_fmnist, monkeypatch):
    """SpeeD (sampler and weighting) on a dense DiT, Min-SNR on an Early-Bird DiT, both scored by FD-FMNIST
    during training (across the extraction), then the report's time to quality."""
    monkeypatch.setenv("EBDIFF_CACHE", str(tmp_path / "cache"))
    ev = ["model.num_classes=10", "train.eval_every=2", "train.eval_n=16", "train.eval_steps=3",
          "train.eval_classifier_epochs=1"]
    a, eb = tmp_path / "a", tmp_path / "eb"
    assert main(["train", *tiny_args(a, "train.iters=4", "diffusion.timestep_sampler=speed-dual",
                                     "diffusion.loss_weighting=speed", *ev, "model.preset=dit-tiny")]) == 0
    assert main(["train", *tiny_args(eb, "train.iters=6", "diffusion.loss_weighting=min-snr", *ev, *EB[1:],
                                     "model.preset=dit-tiny", "early_bird.queue=2", "early_bird.eta=0.9")]) == 0
    from ebdiff.runs.checkpoint import read_records

    pts = {r.name: [p for p in read_records(r / "metrics.jsonl") if p.get("event") == "eval"] for r in (a, eb)}
    assert [p["iter"] for p in pts["a"]] == [2, 4] and [p["phase"] for p in pts["eb"]] == ["dense", "ticket", "ticket"]
    assert all(p["metric"] == "FD-FMNIST" and p["value"] > 0 for p in pts["a"] + pts["eb"])
    target = max(p["value"] for p in pts["a"] + pts["eb"]) + 1.0
    assert main(["report", str(a), str(eb), "--out", str(tmp_path / "rep"), "--target", str(target)]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Time to quality" in md and "dense + SpeeD" in md and "Min-SNR" in md
    rows = {r["name"]: r for r in json.loads((tmp_path / "rep" / "report.json").read_text())["time_to_quality"]["rows"]}
    assert rows["eb"]["points"] == 3 and rows["eb"]["to_target_s"] is not None


def test_bench_rows_with_mfu():
    """`ebdiff bench --preset dit-tiny`: dense and ticket rows with model FLOP/s (and MFU where the device's peak
    is known: not on the CPU)."""
    from ebdiff.core.mfu import compute_mfu
    from ebdiff.evaluate.bench import available_modes, format_table, run_bench

    modes = {"eager": available_modes(torch.device("cpu"))["eager"]}
    rows = run_bench("dit-tiny", [0.0, 0.5], modes, 4, 2, 1, torch.device("cpu"), progress=False)
    assert [r["ratio"] for r in rows] == [0.0, 0.5] and rows[1]["macs_ratio"] > 1.5
    assert all(r["model_tflops_s"] > 0 and r["mfu"] is None for r in rows)
    assert "MFU" in format_table(rows)
    h100 = compute_mfu(rows[0]["macs"], 4, rows[0]["ms_step"] / 1e3, "NVIDIA H100 80GB HBM3", "bf16")
    assert 0 < h100.mfu < 1


def test_dit_demo_command(tmp_path, has_fmnist, capsys):
    """`ebdiff demo --backbone dit` (configs/demo_dit.yaml) at a tiny size: search, ticket, ticket training, one
    grid row per class."""
    from PIL import Image

    out = tmp_path / "demo"
    assert main(["demo", "--backbone", "dit", "--out", str(out), "data.limit=256", "train.iters=6",
                 "train.batch_size=8", "early_bird.check_every=2", "early_bird.queue=2", "early_bird.eta=0.9",
                 "sample.steps=3", "sample.n=20"]) == 0
    text = capsys.readouterr().out
    assert "drawn at iteration 4" in text and "(one row per class)" in text and "Demo outputs in" in text
    assert json.loads((out / "ticket.json").read_text())["ratio"] == 0.5
    w, h = Image.open(out / "samples_ddim3.png").size
    assert h > 4 * w  # 10 rows (classes) of 2 samples
    assert main(["demo", "--backbone", "dit", "--latent", "--out", str(tmp_path / "x")]) == 2
    assert "no latent demo for backbone 'dit'" in capsys.readouterr().err
