"""Issue 17: class conditioning and latent diffusion (a tiny VQ autoencoder with random weights, the ldm-tiny
UNet): the latent cache, conditional training and sampling, classifier-free guidance, exact tickets of the
conditional UNet, TA-EB on it, and the sizes of the paper's ImageNet LDM."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_args
from safetensors.torch import load_file

from ebdiff.backbones import build_model, eps_fn, example_inputs
from ebdiff.cli import main
from ebdiff.core.masks import ChannelMask
from ebdiff.core.regions import RegionRouter, RegionSet
from ebdiff.core.sampling import Conditioned, class_rows, conditioned, generate
from ebdiff.data.datasets import ImageData
from ebdiff.data.latents import TINY_VQ, LatentCache, encode_dataset, load_autoencoder, save_autoencoder
from ebdiff.errors import ConfigError, DataError
from ebdiff.pruning.engine import PruningEngine, channel_zero_mask_, extract


@pytest.fixture(scope="module")
def vq(tmp_path_factory):
    """A tiny VQ autoencoder (1x32x32 -> 3x8x8) with random weights, as a diffusers folder."""
    from diffusers import VQModel

    torch.manual_seed(0)
    return save_autoencoder(VQModel(**TINY_VQ), tmp_path_factory.mktemp("ae") / "vq")


def latent_args(out, vq, cache, *extra):
    return [*tiny_args(out), "model.preset=ldm-tiny", f"model.autoencoder={vq}", f"data.latent_cache={cache}",
            "data.limit=64", "model.dropout=0", "diffusion.beta_schedule=scaled_linear", "diffusion.beta_start=0.0015",
            "diffusion.beta_end=0.0195", "model.latent_scale=std", *extra]


def test_latent_cache_write_read_and_resume(vq, tmp_path):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (50, 1, 32, 32), dtype=torch.uint8)
    labels = torch.arange(50) % 10
    data = ImageData(images, labels, name="toy")
    ae = load_autoencoder(str(vq))
    assert ae.kind == "vq" and ae.factor == 4 and ae.latent_channels == 3 and ae.default_scale() == 1.0
    folder = tmp_path / "cache"
    ident = {"toy": 1}
    cache = encode_dataset(data, ae, folder, ident, shard_size=16, device="cpu", batch=7, progress=False)
    assert cache.manifest["shards"] == [f"shard-{k:05d}.npy" for k in range(4)] and len(cache) == 50
    assert cache.shape == (3, 8, 8)
    direct = ae.encode(images.float() / 127.5 - 1)
    idx = torch.tensor([49, 0, 17, 33, 16, 5])  # across shards, any order
    x, y = cache.read(idx)
    assert torch.equal(y, labels[idx])
    assert torch.allclose(x, direct[idx].half().float(), atol=1e-6)  # stored as float16
    cache.scale = 2.0
    assert torch.allclose(cache.read(idx)[0], 2 * x)
    # an interrupted encoding: shard 2 lost, no manifest; the rerun encodes shard 2 only
    stamps = {f: (folder / f).stat().st_mtime_ns for f in ("shard-00000.npy", "shard-00003.npy")}
    before = np.load(folder / "shard-00002.npy")
    (folder / "shard-00002.npy").unlink()
    (folder / "manifest.json").unlink()
    with pytest.raises(DataError, match="no readable manifest"):
        LatentCache(folder)
    again = encode_dataset(data, ae, folder, ident, shard_size=16, device="cpu", batch=16, progress=False)
    assert {f: (folder / f).stat().st_mtime_ns for f in stamps} == stamps
    assert np.array_equal(np.load(folder / "shard-00002.npy"), before)
    assert torch.equal(again.read(torch.arange(50))[0], cache.read(torch.arange(50))[0] / 2)
    # a complete cache of the same identity is found, not re-encoded
    t = (folder / "manifest.json").stat().st_mtime_ns
    encode_dataset(data, ae, folder, ident, shard_size=16, device="cpu", progress=False)
    assert (folder / "manifest.json").stat().st_mtime_ns == t


def test_missing_autoencoder_is_one_line(tmp_path, capsys):
    assert main(["encode", "model.preset=ldm-imagenet256", f"model.autoencoder={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "VQ-f4" in err and "CompVis/ldm-celebahq-256" in err
    assert main(["train", "--out", str(tmp_path / "r"), "model.preset=ldm-tiny", "train.device=cpu"]) == 2
    assert "set model.autoencoder=PATH" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="latent presets"):
        from ebdiff.config import load_config

        load_config(None, ["model.autoencoder=/x"])


def _wiggle(m):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-zero biases everywhere
    return m.eval()


def test_classifier_free_guidance_scale_one_is_the_conditional_model():
    for preset, kw in (("ldm-tiny", {}), ("tiny", {"num_classes": 10})):
        m = _wiggle(build_model(preset, dropout=0.0, **kw))
        f = eps_fn(m)
        shape = (3, 8, 8) if preset == "ldm-tiny" else (1, 32, 32)
        x, t = torch.randn(4, *shape), torch.tensor([5, 500, 900, 999])
        y = torch.tensor([0, 3, 9, 3])
        with torch.no_grad():
            cond, null = f(x, t, y), f(x, t, torch.full_like(y, 10))
            g1 = Conditioned(f, y, 1.0, 10)(x, t)
            g3 = Conditioned(f, y, 3.0, 10)(x, t)
        assert torch.allclose(g1, cond, atol=1e-5) and (cond - null).abs().max() > 1e-3
        assert torch.allclose(g3, null + 3 * (cond - null), atol=1e-5)
        assert torch.allclose(Conditioned(f, y, 0.0, 10)(x, t), null, atol=1e-5)
        # through a whole sampler: guidance 1 samples what the conditional model samples
        kw_gen = dict(sampler="ddim", steps=4, batch_size=3, seed=1, clamp=False, labels=torch.arange(5) % 10)
        from ebdiff.core.diffusion import Schedule

        a = generate(f, 5, shape, Schedule.linear(), guidance=None, **kw_gen)
        b = generate(f, 5, shape, Schedule.linear(), guidance=1.0, null_class=10, **kw_gen)
        assert torch.allclose(a, b, atol=1e-4)
    assert conditioned(f, None) is f
    assert class_rows(10, 25)[1] == 3 and class_rows(10, 25)[0].tolist()[:7] == [0, 0, 0, 1, 1, 1, 2]
    labels, row = class_rows(1000, 4)
    assert row is None and labels.tolist() == [0, 1, 2, 3]


def test_router_passes_the_classes_to_each_region_model():
    a, b = _wiggle(build_model("ldm-tiny", 0.0)), _wiggle(build_model("ldm-tiny", 0.0))
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(1.1)
    router = RegionRouter([eps_fn(a), eps_fn(b)], RegionSet.from_config([{"t": [0, 499], "ratio": 0.3},
                                                                         {"t": [500, 999], "ratio": 0.5}]))
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([10, 700, 20, 900]), torch.tensor([1, 2, 3, 10])
    with torch.no_grad():
        out = router(x, t, y)  # a mixed batch: split by region, labels with it
        want = torch.cat([eps_fn(a)(x[[0, 2]], t[[0, 2]], y[[0, 2]]), eps_fn(b)(x[[1, 3]], t[[1, 3]], y[[1, 3]])])
        assert torch.allclose(out[[0, 2, 1, 3]], want, atol=1e-5)
        g = Conditioned(router, y, 2.0, 10)
        step = g.at(700)  # what the samplers call: the region model of the step, labels bound
        assert torch.allclose(step(x, torch.full((4,), 700)), Conditioned(eps_fn(b), y, 2.0, 10)(x, torch.full((4,), 700)))


def _only(eng, mask, keep):
    idx = [i if keep(info) else torch.empty(0, dtype=torch.long) for i, info in zip(mask.indices(), eng.info)]
    return ChannelMask.from_indices(eng.sizes, idx)


@pytest.mark.parametrize("preset,kw", [("ldm-tiny", {}), ("tiny", {"num_classes": 10})])
def test_conditional_ticket_is_the_channel_zeroed_dense_model(preset, kw):
    """Removing channels equals zeroing them in the dense model, on the groups where that is exact (no norm
    after the removed channels): attention q/k/v (per head, fixed softmax scale), GEGLU pairs, the timestep
    embedding (with a pixel model's class embedding coupled to it). The class table and the context width stay."""
    m = _wiggle(build_model(preset, 0.0, **kw))
    eng = PruningEngine(m)
    kinds = {i.kind for i in eng.info}
    full = eng.mask("magnitude", 0.5)
    exact = (lambda i: i.kind in ("heads", "geglu") or "time_embedding" in i.name)
    if preset == "ldm-tiny":
        assert {"heads", "geglu", "norm"} <= kinds
    mask = _only(eng, full, exact)
    assert mask.bits.sum() > 0
    small = extract(m, eng.plan(mask)).eval()
    masked = build_model(preset, 0.0, **kw).eval()
    masked.load_state_dict(m.state_dict())
    channel_zero_mask_(masked, PruningEngine(masked), mask)
    ex = example_inputs(m, 3)
    ex["timestep"], ex["class_labels"] = torch.tensor([3, 300, 900]), torch.tensor([1, 5, 10])
    with torch.no_grad():
        a, b, dense = small(**ex).sample, masked(**ex).sample, m(**ex).sample
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
    assert (a - dense).abs().max() > 1e-2  # the pruning did change the function
    ticket = extract(m, eng.plan(full))  # the whole 50% ticket
    if preset == "ldm-tiny":
        assert ticket.class_embedding.weight.shape == (11, 32)
        assert {mod.in_features for n, mod in ticket.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))} == {32}
        heads = {mod.heads for n, mod in ticket.named_modules() if n.endswith("attn1")}
        assert heads == {2}
    with torch.no_grad():
        assert ticket(**ex).sample.shape == ex["sample"].shape


def test_conditional_latent_training_resumes_exactly_and_samples_by_class(vq, tmp_path, has_fmnist):
    cache = tmp_path / "latents"
    eb = ["early_bird.ratio=0.5", "early_bird.check_every=2", "early_bird.queue=2", "early_bird.eta=0.9",
          "model.class_dropout=0.5", "train.ckpt_every=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *latent_args(a, vq, cache, "train.iters=8", *eb)]) == 0
    assert main(["train", *latent_args(b, vq, cache, "train.iters=6", *eb)]) == 0  # after the ticket (iteration 4)
    assert main(["train", "--resume", str(b), "train.iters=8"]) == 0
    wa, wb = (load_file(str(r / "checkpoints" / "ckpt-000000008" / "model.safetensors")) for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    meta = json.loads((a / "checkpoints" / "ckpt-000000008" / "meta.json").read_text())
    assert meta["phase"] == "ticket" and meta["num_classes"] == 10 and meta["image_shape"] == [3, 8, 8]
    assert meta["latent"]["kind"] == "vq" and meta["latent"]["scale"] > 0 and meta["latent"]["image_shape"] == [1, 32, 32]
    assert len(list(cache.iterdir())) == 1  # one cache, shared by both runs
    # sampling decodes to pixels, one row per class; guidance and classes
    out = tmp_path / "s.png"
    assert main(["sample", str(a), "--n", "6", "--steps", "3", "--class", "2", "--class", "7", "--guidance", "2",
                 "--out", str(out)]) == 0
    imgs = np.load(tmp_path / "s.npz")["images"]
    assert imgs.shape == (6, 32, 32, 1)
    assert main(["sample", str(a), "--n", "2", "--steps", "3", "--class", "10", "--out", str(out)]) == 2
    # a dense-then-prune baseline of the conditional latent model
    d = tmp_path / "d"
    assert main(["train", *latent_args(d, vq, cache, "train.iters=2")]) == 0
    assert main(["train", *latent_args(tmp_path / "p", vq, cache, "train.iters=2", f"prune.from_run={d}",
                                       "prune.ratio=0.5")]) == 0


EVAL = ("train.eval_every=3", "train.eval_n=8", "train.eval_steps=2", "train.eval_classifier_epochs=1")


def test_taeb_two_regions_on_the_conditional_latent_model(vq, tmp_path, has_fmnist, monkeypatch):
    monkeypatch.setenv("EBDIFF_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "ta"
    args = latent_args(run, vq, tmp_path / "latents", "train.iters=6", "early_bird.check_every=2", "data.limit=256",
                       "early_bird.queue=2", "early_bird.eta=0.9", "taeb.launch=sequential", "model.class_dropout=0.2",
                       "regions=[{t: [0, 499], ratio: 0.3}, {t: [500, 999], ratio: 0.6}]", *EVAL)
    assert main(["ta-eb", *args]) == 0
    # evaluation during training: each branch snapshots its conditional latent EMA model, the ensemble is scored
    ens = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("event") == "eval"]
    assert ens and all(r["ensemble"] and np.isfinite(r["value"]) for r in ens)
    a = json.loads((run / "taeb.json").read_text())
    assert [b["ticket_found"] for b in a["branches"]] == [True, True]
    assert a["branches"][0]["params"] > a["branches"][1]["params"]
    # the ensemble samples by class with guidance, routed per step, decoded to pixels; eval on the decoded images
    assert main(["sample", str(run), "--n", "4", "--steps", "4", "--guidance", "1.5", "--out", str(tmp_path / "g.png")]) == 0
    assert np.load(tmp_path / "g.npz")["images"].shape == (4, 32, 32, 1)
    assert main(["eval", str(run), "--n", "16", "--steps", "3", "--classifier-epochs", "1"]) == 0
    e = json.loads((run / "eval.json").read_text())
    assert e["metrics"]["fd"]["name"] == "FD-FMNIST" and np.isfinite(e["metrics"]["fd"]["value"])
    # a single conditional latent run evaluates itself during training on decoded, class-balanced samples
    one = tmp_path / "one"
    assert main(["train", *latent_args(one, vq, tmp_path / "latents", "train.iters=2", "data.limit=256", *EVAL)]) == 0
    pts = [r for r in map(json.loads, (one / "metrics.jsonl").read_text().splitlines()) if r.get("event") == "eval"]
    assert [r["iter"] for r in pts] == [2] and pts[0]["metric"] == "FD-FMNIST" and np.isfinite(pts[0]["value"])


def test_info_sizes_of_the_papers_imagenet_ldm(capsys):
    """ldm-imagenet256 against the paper's Table 6: dense 400.9M params / 598.8G MACs within 1%, the Early-Bird
    ticket at ratio 0.535 at 92.8M / 141.7G within 3% (UNet parameters without the class table; MACs of 6
    latents, the convention of Diff-Pruning's prune_ldm.py that the paper's numbers come from)."""
    assert main(["info", "--preset", "ldm-imagenet256", "--ratio", "0.535", "--json"]) == 0
    dense, ticket = json.loads(capsys.readouterr().out)
    assert dense["unet_params"] == 400_920_579  # the original LDM UNetModel's count
    assert dense["params"] - dense["unet_params"] == 1001 * 512  # the class table
    assert dense["macs"] == 99_862_346_880  # one 3x64x64 latent with its class
    assert abs(dense["unet_params"] / 400.9e6 - 1) < 0.01 and abs(dense["macs_batch6"] / 598.8e9 - 1) < 0.01
    assert abs(ticket["unet_params"] / 92.8e6 - 1) < 0.03 and abs(ticket["macs_batch6"] / 141.7e9 - 1) < 0.03
