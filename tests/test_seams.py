"""The seams for what users bring: a backbone and a dataset registered in a few lines each (here, in the
test only) train densely, run an Early-Bird search with ticket extraction, sample and reload through the
public API, without any other module knowing them."""

import contextlib
import json
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ebdiff
from ebdiff.backbones import Backbone, backbone_of, eps_fn, register_backbone, unregister_backbone
from ebdiff.core.diffusion import Schedule
from ebdiff.core.sampling import generate
from ebdiff.data.datasets import Dataset, ImageData, register_dataset, unregister_dataset
from ebdiff.evaluate.evaluate import sample_checkpoint


class BlobNet(nn.Module):
    """Three convolutions, the timestep as an extra input channel: not a diffusers UNet."""

    def __init__(self, width: int):
        super().__init__()
        self.inp, self.mid, self.out = nn.Conv2d(2, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1), \
            nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, sample, timestep, class_labels=None):
        t = (timestep.float() / 1000).reshape(-1, 1, 1, 1).expand(sample.shape[0], 1, *sample.shape[2:])
        return self.out(F.silu(self.mid(F.silu(self.inp(torch.cat([sample, t], 1))))))


class Blobs(Backbone):
    name = "test-blobs"
    presets = {"blob": dict(width=16)}

    def build(self, preset, dropout=0.1, num_classes=None):
        return BlobNet(**self.presets[preset])

    def image_shape(self, preset):
        return 1, 8

    def owns(self, model):
        return isinstance(model, BlobNet)

    def sample_shape(self, model):
        return 1, 8, 8

    def eps(self, model, x, t, cond=None):
        return model(x, t)

    def ignored_layers(self, model):
        return [model.out]


def blob_images(dcfg, size, progress=True):
    """64 random 1x8x8 blobs, no labels."""
    g = torch.Generator().manual_seed(0)
    return ImageData((torch.rand(64, 1, size, size, generator=g) * 255).to(torch.uint8))


@contextlib.contextmanager
def registered_blobs():
    register_backbone(Blobs)
    register_dataset(Dataset("test-blobs", blob_images))
    try:
        yield
    finally:
        unregister_backbone("test-blobs")
        unregister_dataset("test-blobs")


@pytest.fixture
def blobs():
    with registered_blobs():
        yield


def test_a_registered_backbone_and_dataset_train_search_sample_and_load(tmp_path, blobs):
    cfg = ebdiff.load_config(None, [
        "model.preset=blob", "data.name=test-blobs", "train.iters=10", "train.batch_size=8", "train.device=cpu",
        "train.progress=false", "train.log_every=2", "train.ckpt_every=5", "sample.steps=3", "sample.n=4",
        "sample.batch_size=4", "early_bird.ratio=0.5", "early_bird.check_every=2", "early_bird.queue=2",
        "early_bird.eta=10"])
    dense = ebdiff.train(replace(cfg, early_bird=type(cfg.early_bird)()), tmp_path / "dense")
    assert dense["dense_iterations"] == 10 and (tmp_path / "dense" / "config.yaml").is_file()

    run = tmp_path / "eb"
    ebdiff.train(cfg, run)
    ticket = json.loads((run / "ticket.json").read_text())
    assert ticket["iteration"] == 4  # eta 10: the first full queue of masks counts as settled
    small = ebdiff.load(run)
    assert isinstance(small, BlobNet) and backbone_of(small).name == "test-blobs"
    assert small.mid.out_channels == 8 and small.inp.out_channels == 8 and small.out.out_channels == 1

    x = generate(eps_fn(small), 4, (1, 8, 8), Schedule.from_config(cfg.diffusion), steps=3)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    y, info = sample_checkpoint(run, "cpu", progress=False)
    assert y.shape == (4, 1, 8, 8) and info["size"]["params"] == sum(p.numel() for p in small.parameters())


def test_registered_names_are_valid_settings_until_unregistered():
    from ebdiff.backbones import backbone_of_preset, preset_names
    from ebdiff.config import choices
    from ebdiff.errors import ConfigError

    with registered_blobs():
        assert "blob" in preset_names() and "test-blobs" in choices()["data.name"]
        assert backbone_of_preset("blob").name == "test-blobs"
    assert "blob" not in preset_names() and "test-blobs" not in choices()["data.name"]
    with pytest.raises(ConfigError, match="unknown model preset 'blob' .known: cifar10, "):
        backbone_of_preset("blob")
