"""Issue 23, items 4 and 6: the user's own model (`model.config`: a diffusers config.json of a UNet2DModel,
UNet2DConditionModel or DiTTransformer2DModel; `model.pretrained`: a diffusers model folder) through dense training,
the Early-Bird search, prune-a-pretrained-model-then-fine-tune, TA-EB and resume; every bad input one line with
nothing written; and presets that adapt their channels and size to the data."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_args
from safetensors.torch import load_file

import ebdiff
from ebdiff.backbones import ModelSpec, backbone_of, eps_fn
from ebdiff.cli import main
from ebdiff.config import config_from_dict

EB = ["early_bird.ratio=0.5", "early_bird.check_every=2", "early_bird.queue=2", "early_bird.eta=10"]


def _args(out, *extra):
    return tiny_args(out, "data.limit=64", *extra)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny diffusers models as their folders: `unet` a UNet2DModel with its weights (1x32x32), `dit` a learned-sigma
    DiT's config.json on 10 classes, `cond` a UNet2DConditionModel's config.json (3x8x8 latents), `vq` the tiny VQ
    autoencoder (1x32x32 -> 3x8x8)."""
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel, VQModel

    from ebdiff.data.latents import TINY_VQ, save_autoencoder

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D")).save_pretrained(root / "unet")
    DiTTransformer2DModel(sample_size=32, in_channels=1, out_channels=2, patch_size=8, num_attention_heads=2,
                          attention_head_dim=8, num_layers=2, num_embeds_ada_norm=10).save_config(root / "dit")
    UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                         attention_head_dim=2, norm_num_groups=8).save_config(root / "cond")
    save_autoencoder(VQModel(**TINY_VQ), root / "vq")
    return root


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    """An image folder of 16 RGB PNGs (40x40) in two class folders."""
    from PIL import Image

    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _rgb_args(out, rgb, *extra):
    return _args(out, "data.name=imagefolder", f"data.root={rgb}", "data.num_workers=0",
                 f"data.cache_dir={rgb.parent / 'cache'}", *extra)


def _meta(run):
    return json.loads(sorted((run / "checkpoints").iterdir())[-1].joinpath("meta.json").read_text())


def _one_line(capsys) -> str:
    err = [e for e in capsys.readouterr().err.strip().splitlines() if e.startswith("ebdiff: error:")]
    assert len(err) == 1, err
    return err[0]


def test_the_class_name_picks_the_backbone(models):
    cfg = ebdiff.load_config(None, [f"model.config={models / 'unet' / 'config.json'}", "model.preset=cifar10"])
    assert cfg.model.config["_class_name"] == "UNet2DModel"  # the file's content, not its path
    spec = ModelSpec.of(cfg.model)
    assert (spec.backbone.name, spec.preset, spec.num_classes) == ("unet", None, None)  # the preset is not used
    model = spec.build()
    assert type(model).__name__ == "UNet2DModel" and list(model.config.block_out_channels) == [16, 32]
    assert ebdiff.load_config(None, [f"model.config={models / 'unet'}"]).model.config == cfg.model.config  # a folder
    inline = config_from_dict({"model": {"config": cfg.model.config}})  # or the mapping itself
    assert ModelSpec.of(inline.model).backbone.name == "unet"
    dit = ModelSpec.of(ebdiff.load_config(None, [f"model.config={models / 'dit'}"]).model)
    assert (dit.backbone.name, dit.num_classes) == ("dit", 10)
    vq = f"model.autoencoder={models / 'vq'}"
    latent = ebdiff.load_config(None, [f"model.config={models / 'dit'}", vq]).model
    assert ModelSpec.of(latent).backbone.name == "dit-latent"
    cond = ModelSpec.of(ebdiff.load_config(None, [f"model.config={models / 'cond'}", vq, "model.num_classes=4"]).model)
    assert cond.backbone.name == "unet-cond" and type(cond.build()).__name__ == "ClassConditionalUNet"
    assert ModelSpec.from_meta(cond.record()).build().unet.config.cross_attention_dim == 16  # what a checkpoint keeps


def test_unet_config_early_bird_ticket_resume_after_the_file_is_gone(models, tmp_path, has_fmnist):
    mine = tmp_path / "mine.json"
    shutil.copy(models / "unet" / "config.json", mine)
    run = tmp_path / "eb"
    assert main(["train", *_args(run, f"model.config={mine}", "train.iters=8", *EB)]) == 0
    assert json.loads((run / "ticket.json").read_text())["iteration"] == 4
    recorded = ebdiff.load_config(run / "config.yaml").model.config
    assert recorded["_class_name"] == "UNet2DModel" and recorded["block_out_channels"] == [16, 32]
    meta = _meta(run)
    assert meta["preset"] is None and meta["backbone"] == "unet" and meta["phase"] == "ticket"
    mine.unlink()  # config.yaml holds the architecture: resume, sample and load need no file
    assert main(["train", "--resume", str(run), "train.iters=10"]) == 0
    ticket = ebdiff.load(run)
    assert type(ticket).__name__ == "UNet2DModel" and ticket.conv_in.out_channels == 8
    s = json.loads((run / "summary.json").read_text())
    assert s["iterations"] == 10 and sum(p.numel() for p in ticket.parameters()) == s["ticket"]["params"]
    assert main(["sample", str(run), "--n", "2", "--steps", "3", "--out", str(tmp_path / "s.png")]) == 0


def test_dit_config_with_learned_sigma_trains_on_the_classes(models, tmp_path, has_fmnist):
    run = tmp_path / "dit"
    assert main(["train", *_args(run, f"model.config={models / 'dit'}", "train.iters=3")]) == 0
    model = ebdiff.load(run)
    assert type(model).__name__ == "DiTTransformer2DModel" and model.config.out_channels == 2
    assert backbone_of(model).model_classes(model) == 10
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert eps_fn(model)(x, torch.tensor([5, 500]), torch.tensor([1, 2])).shape == x.shape  # the noise half
    assert main(["sample", str(run), "--n", "2", "--steps", "3", "--class", "3", "--out", str(tmp_path / "s.png")]) == 0


def test_conditional_unet_config_on_latents(models, tmp_path, has_fmnist):
    run = tmp_path / "cond"
    assert main(["train", *_args(run, f"model.config={models / 'cond'}", f"model.autoencoder={models / 'vq'}",
                                 f"data.latent_cache={tmp_path / 'lc'}", "model.num_classes=10", "train.iters=3")]) == 0
    meta = _meta(run)
    assert meta["backbone"] == "unet-cond" and meta["image_shape"] == [3, 8, 8] and meta["num_classes"] == 10
    assert type(ebdiff.load(run)).__name__ == "ClassConditionalUNet"


def test_pretrained_weights_are_the_first_iterations_and_early_bird_searches_from_them(models, tmp_path, has_fmnist):
    from ebdiff.app.assemble import make_trainer

    cfg = ebdiff.load_config(None, _args(tmp_path, f"model.pretrained={models / 'unet'}", "train.iters=6",
                                         *EB)[2:])
    assert cfg.model.config["_class_name"] == "UNet2DModel"  # the folder's config.json
    tr = make_trainer(cfg, tmp_path / "start")
    tr._start()
    folder = load_file(str(models / "unet" / "diffusion_pytorch_model.safetensors"))
    for module in (tr.state.model, tr.state.ema.module):
        sd = module.state_dict()
        assert sd.keys() == folder.keys() and all(torch.equal(sd[k], folder[k]) for k in folder)
    s = ebdiff.train(cfg, tmp_path / "eb")
    assert s["ticket_info"]["iteration"] == 4 and s["ticket"]["params"] < s["dense"]["params"]


def test_prune_a_pretrained_model_then_fine_tune(models, tmp_path, has_fmnist):
    from ebdiff.app.assemble import make_trainer
    from ebdiff.pruning.engine import make_criterion, prune
    from ebdiff.runs.interop import load_pretrained

    run = tmp_path / "pft"
    args = _args(run, f"prune.from_run={models / 'unet'}", "prune.ratio=0.5", "train.iters=3")
    assert main(["train", *args]) == 0
    s = json.loads((run / "summary.json").read_text())
    pf = s["pruned_from"]
    assert pf["checkpoint"] == "diffusers" and pf["method"] == "prune-finetune" and s["time_s"]["dependency_s"] == 0
    assert s["ticket"]["params"] < 0.4 * s["dense"]["params"]
    # the model it fine-tunes is the pretrained model pruned (its kept channels keep their weights)
    cfg = ebdiff.load_config(None, args[2:])
    tr = make_trainer(cfg, tmp_path / "start")
    tr._start()
    want = prune(load_pretrained(ModelSpec.of(cfg.model).build(), models / "unet"), make_criterion("magnitude"), 0.5)
    got = tr.state.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.model.state_dict().items())
    assert main(["train", "--resume", str(run), "train.iters=4"]) == 0


def test_taeb_branches_take_the_user_model_and_its_weights(models, tmp_path, has_fmnist):
    run = tmp_path / "ta"
    args = _args(run, f"model.pretrained={models / 'unet'}", "train.iters=4", "taeb.launch=sequential", *EB[1:],
                 "regions=[{t: [0, 520], ratio: 0.3}, {t: [480, 999], ratio: 0.6}]")
    assert main(["ta-eb", "--config", "configs/demo_taeb.yaml", *args]) == 0
    a = json.loads((run / "taeb.json").read_text())
    assert len(a["branches"]) == 2 and all(b["ticket_found"] for b in a["branches"])
    for k in range(2):
        meta = _meta(run / f"region-{k}")
        assert meta["backbone"] == "unet" and meta["identity"]["model.pretrained"] == str(models / "unet")
    model = ebdiff.load(run)
    assert [type(m).__name__ for m in model.unets] == ["UNet2DModel"] * 2
    assert main(["sample", str(run), "--n", "2", "--steps", "3", "--out", str(tmp_path / "s.png")]) == 0


def test_bad_user_models_are_one_line_and_write_nothing(models, rgb, tmp_path, has_fmnist, capsys):
    unet = json.loads((models / "unet" / "config.json").read_text())
    files = {}
    for name, change in (("unknown", {"_class_name": "UNet3DConditionModel"}), ("outc", {"out_channels": 2}),
                         ("table", {"num_class_embeds": 6}), ("shift", {"resnet_time_scale_shift": "scale_shift"})):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps({**unet, **change}))
    out = tmp_path / "out"
    cases = [
        ([f"model.config={files['unknown']}"], ["UNet3DConditionModel", "cannot prune", "UNet2DModel"]),
        ([f"model.config={files['outc']}"], ["out_channels=2", "epsilon"]),
        ([f"model.config={files['shift']}"], ["resnet_time_scale_shift", "'scale_shift'", "cannot prune"]),
        (["model.config=" + str(tmp_path / "nowhere.json")], ["not found"]),
        ([f"model.pretrained={models / 'dit'}"], ["has no weights", "diffusion_pytorch_model.safetensors"]),
        ([f"model.config={models / 'unet'}", "data.image_size=64"], ["sample_size=32", "64x64"]),
        ([f"model.config={files['table']}"], ["has class 9", "num_class_embeds"]),
        ([f"model.config={models / 'dit'}", "model.num_classes=5"], ["num_embeds_ada_norm=10", "model.num_classes=5"]),
        ([f"model.config={models / 'cond'}"], ["latents", "model.autoencoder"]),
        ([f"model.pretrained={models / 'unet'}", f"model.config={models / 'unet'}"], ["leave model.config unset"]),
    ]
    odd = tmp_path / "odd"  # a pretrained folder of a class ebdiff cannot prune: the line names model.pretrained
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({**unet, "_class_name": "UNet3DConditionModel"}))
    (odd / "diffusion_pytorch_model.safetensors").write_bytes((models / "unet" / "diffusion_pytorch_model.safetensors")
                                                               .read_bytes())
    cases.append(([f"model.pretrained={odd}"], [f"model.pretrained={odd}: its config.json is a UNet3DConditionModel",
                                                "cannot prune"]))
    for extra, words in cases:
        assert main(["train", *_args(out, *extra)]) == 2, extra
        line = _one_line(capsys)
        assert all(w in line for w in words), (extra, line)
        assert not out.exists(), extra
    assert main(["train", *_rgb_args(out, rgb, f"model.config={models / 'unet'}")]) == 2  # 1 channel, RGB data
    line = _one_line(capsys)
    assert "in_channels=1" in line and "3-channel" in line and not out.exists()
    # resume: the architecture is part of the run's identity
    run = tmp_path / "run"
    assert main(["train", *_args(run, f"model.config={models / 'unet'}", "train.iters=2")]) == 0
    assert main(["train", "--resume", str(run), f"model.config={files['table']}"]) == 2
    assert "model.config" in _one_line(capsys)


def test_presets_adapt_to_the_data_channels_and_size(rgb, tmp_path, capsys):
    from ebdiff.app.info import size_rows

    run = tmp_path / "tiny"
    assert main(["train", *_rgb_args(run, rgb, "model.preset=tiny", "train.iters=2")]) == 0
    meta = _meta(run)
    assert meta["preset"] == "tiny" and meta["image_shape"] == [3, 32, 32] and meta["model_config"]["in_channels"] == 3
    model = ebdiff.load(run)
    assert (model.config.in_channels, model.config.out_channels, model.conv_out.out_channels) == (3, 3, 3)
    assert main(["train", "--resume", str(run), "train.iters=3"]) == 0
    assert size_rows("tiny")[0]["params"] == 280_177  # `ebdiff info`: the preset on its own data (1 channel)
    dit = tmp_path / "dit"
    assert main(["train", *_rgb_args(dit, rgb, "model.preset=dit-tiny", "data.image_size=16", "train.iters=2")]) == 0
    m = ebdiff.load(dit)
    assert (m.config.in_channels, m.config.out_channels, m.config.sample_size) == (3, 3, 16)
    assert m.pos_embed.height == 4  # the positional embedding of 4x4 patches of 16x16 images
    bad = tmp_path / "bad"
    assert main(["train", *_rgb_args(bad, rgb, "model.preset=dit-tiny", "data.image_size=18")]) == 2
    line = _one_line(capsys)
    assert "data.image_size=18" in line and "multiple of 4" in line and not bad.exists()


def test_state_misfit_names_the_first_offender_and_counts_them():
    """The one tensor-by-tensor fit check behind checkpoints (load_weights) and pretrained folders."""
    from ebdiff.runs.checkpoint import state_misfit

    want = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    assert state_misfit(want, dict(want), "there", "missing there") is None
    assert state_misfit(want, {"a": torch.zeros(5), "b": torch.zeros(3), "d": torch.zeros(1)}, "in the file",
                        "missing from the file") == ("tensor 'a' has shape [5] in the file but [2] in the model", 3)
    assert state_misfit(want, {"a": torch.zeros(2), "b": torch.zeros(3)}, "there", "missing there") == (
        "tensor 'c' is missing there", 1)
    assert state_misfit(want, {**want, "z": torch.zeros(1)}, "there", "missing there") == (
        "tensor 'z' is not in the model", 1)
