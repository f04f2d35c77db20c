"""The `Backbone` interface and the registry of backbones and their presets.

A backbone is one model family: it builds a model from a preset (its presets are data, `Backbone.presets`),
says which data the model consumes, how it is called (`eps`) and what the pruning engine must keep
consistent. Every other module asks the backbone of a preset (`backbone_of_preset`) or of a model
(`backbone_of`) instead of knowing a model family. A family built from diffusers constructor settings
(`diffusers_class`) also builds a user's config.json of that class (`model.config`) and adapts its presets to
the data; `ModelSpec` is the one answer to "which dense model does this run train": preset or config, fitted
to the data's channels and size, recorded in each checkpoint so that it rebuilds without the config file.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..errors import ConfigError

BACKBONES: dict[str, "Backbone"] = {}


class Backbone:
    """One model family. Subclasses set `name`, `presets` (preset name -> the family's settings) and `latent`,
    and implement `build`, `owns`, `image_shape` and `sample_shape`, and `eps` unless the model is called as
    diffusers' UNets are; the rest has defaults that suit a network without class conditioning, attention
    heads or layers the pruning engine must leave alone."""

    name: ClassVar[str] = ""
    presets: ClassVar[dict[str, Any]] = {}
    latent: ClassVar[bool] = False  # trains on an autoencoder's latents (the data source `latents`)
    # the folder of a one-model export, and its kind there: the model's name in diffusers' pipelines
    component: ClassVar[str] = "unet"
    # how `count_macs_params` counts (what `ebdiff info` and the run files report)
    macs_convention: ClassVar[str] = ("torch-pruning's count of one forward of one sample (multiply-accumulates), "
                                      "every parameter of the model")

    # ------------------------------------------------------------------ presets
    def build(self, preset: str, dropout: float = 0.1, num_classes: int | None = None) -> nn.Module:
        """A freshly initialised dense model of a preset, conditioned on `classes(preset, num_classes)` classes."""
        raise NotImplementedError

    def image_shape(self, preset: str) -> tuple[int, int]:
        """(channels, resolution) of the images the data loader gives a preset's run (a latent backbone's: the
        pixel images before the autoencoder)."""
        raise NotImplementedError

    def size_multiple(self, preset: str) -> int:
        """`data.image_size` must be a multiple of this (the model halves the image so many times)."""
        return 1

    def classes(self, preset: str, num_classes: int | None = None) -> int | None:
        """The number of data classes a preset's model is conditioned on: `num_classes` when given, else the
        preset's default (None: unconditional)."""
        return None if num_classes is None else int(num_classes)

    # ------------------------------------------------------------------ a model of this family
    def owns(self, model: nn.Module) -> bool:
        """Whether this backbone built `model` (what `backbone_of` asks)."""
        raise NotImplementedError

    def model_classes(self, model: nn.Module) -> int | None:
        """The number of data classes `model` is conditioned on (its null class is this index), or None."""
        n = getattr(model, "num_classes", None)
        return None if n is None else int(n)

    def sample_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """(channels, height, width) of one sample the model denoises at its own resolution."""
        raise NotImplementedError

    def eps(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor,
            cond: torch.Tensor | None = None) -> torch.Tensor:
        """The model's noise prediction for x_t at timesteps t (class labels `cond`, or None). By default the
        call of diffusers' UNets, `model(x, t, class_labels=cond).sample` (also how a model that no registered
        backbone owns is called: `eps_call`)."""
        if cond is None:
            return model(x, t).sample
        return model(x, t, class_labels=cond).sample

    def example_inputs(self, model: nn.Module, batch: int = 1, res: int | None = None) -> dict[str, torch.Tensor]:
        """One forward's keyword inputs (counting, tracing): noise at the model's resolution (or `res`), t = 1,
        and class 0 for a class-conditional model, as `sample`, `timestep`, `class_labels`."""
        c, h, w = self.sample_shape(model)
        if res:
            h = w = res
        dev = next(model.parameters()).device
        if dev.type == "meta":  # shapes only: counting and tracing a model without its memory or arithmetic
            sample = torch.empty(batch, c, h, w, device=dev)
        else:  # never touch the global RNG (exact resume)
            sample = torch.randn(batch, c, h, w, device=dev, generator=torch.Generator(device=dev).manual_seed(0))
        ex = {"sample": sample, "timestep": torch.ones((batch,), dtype=torch.long, device=dev)}
        if self.model_classes(model) is not None:
            ex["class_labels"] = torch.zeros((batch,), dtype=torch.long, device=dev)
        return ex

    def pipeline(self, meta: dict) -> str | None:
        """The diffusers pipeline class that samples a dense model of this family recorded as `meta` (its
        checkpoint's num_classes, latent, ...) from an export folder, or None: no pipeline takes it as it is."""
        return None

    def paper_count(self, model: nn.Module, macs: int) -> dict[str, int]:
        """Sizes in a paper's counting convention besides `macs_convention`'s (`ebdiff info`); none by default."""
        return {}

    # ------------------------------------------------------------------ what the pruning engine keeps consistent
    def trace_inputs(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The inputs torch-pruning traces the model with (the graph must not depend on their size)."""
        return self.example_inputs(model, 1)

    def ignored_layers(self, model: nn.Module) -> list[nn.Module]:
        """Layers whose output channels are never pruned (e.g. the output convolution)."""
        return []

    def group_kind(self, graph, group, names: dict, modules: dict) -> tuple[str, int] | None:
        """(kind, rule groups) of a torch-pruning group that this family recognises (`pruning.GroupInfo`: heads,
        geglu), or None to let the engine classify it (plain or GroupNorm-coupled)."""
        return None

    def after_pruning(self, model: nn.Module) -> None:
        """Fix attributes a pruned model keeps from its dense widths."""

    # ------------------------------------------------------------------ diffusers settings: model.config, adaptation
    # The diffusers class (`_class_name` of a config.json) whose constructor settings this family builds from: a
    # `model.config` of that class picks this backbone, and its presets adapt to the data (`ModelSpec.fit`). None:
    # a family built from its presets only, which neither takes a config nor adapts.
    diffusers_class: ClassVar[str | None] = None
    classes_key: ClassVar[str | None] = None  # the key of such a config that holds its class count, if any

    def preset_config(self, preset: str) -> dict | None:
        """A preset's diffusers constructor settings (without dropout and classes, which `build_config` sets), or
        None when the family builds its presets otherwise."""
        return None

    def build_config(self, config: dict, dropout: float = 0.1, num_classes: int | None = None) -> nn.Module:
        """A freshly initialised dense model from diffusers constructor settings (a user's config.json, or a preset
        adapted to the data), conditioned on `num_classes` classes (None: unconditional)."""
        raise ConfigError(f"backbone '{self.name}' builds its presets only")

    def config_io(self, config: dict) -> tuple[int, int, int, int]:
        """(in_channels, out_channels, sample_size, the multiple the sample size must be) of constructor settings."""
        raise NotImplementedError

    def with_io(self, config: dict, channels: int, size: int) -> dict:
        """The settings for samples of `channels` x size x size (in and out channels, sample size)."""
        return dict(config, in_channels=channels, out_channels=channels, sample_size=size)

    def check_config(self, config: dict) -> None:
        """A user's settings that ebdiff cannot train (what epsilon prediction and this family's conditioning need)
        stop with one ConfigError line naming the key."""

    def config_classes(self, config: dict, num_classes: int | None) -> int | None:
        """The classes a model of a user's settings is conditioned on: `num_classes` (model.num_classes) checked
        against the settings' own class table, else the table's."""
        return num_classes

    def weights_module(self, model: nn.Module) -> nn.Module:
        """The diffusers model inside `model` whose weights a diffusers model folder holds (model.pretrained)."""
        return model


def register_backbone(obj):
    """Register a `Backbone` (a subclass, instantiated, or an instance) under its name; returns `obj`, so it
    serves as a class decorator. Its preset names must be new."""
    bb = obj() if isinstance(obj, type) else obj
    if not bb.name:
        raise ValueError(f"{type(bb).__name__} has no name")
    taken = {p: b.name for b in BACKBONES.values() if b.name != bb.name for p in b.presets}
    clash = sorted(set(bb.presets) & set(taken))
    if clash:
        raise ValueError(f"backbone '{bb.name}': preset '{clash[0]}' is already backbone '{taken[clash[0]]}''s")
    BACKBONES[bb.name] = bb
    return obj


def unregister_backbone(name: str) -> None:
    BACKBONES.pop(name, None)


def backbone_names() -> tuple[str, ...]:
    return tuple(BACKBONES)


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone '{name}' (known: {', '.join(BACKBONES)})")
    return BACKBONES[name]


def preset_names() -> tuple[str, ...]:
    return tuple(p for b in BACKBONES.values() for p in b.presets)


def backbone_of_preset(preset: str) -> Backbone:
    for b in BACKBONES.values():
        if preset in b.presets:
            return b
    raise ConfigError(f"unknown model preset '{preset}' (known: {', '.join(preset_names())})")


def _owner(model: nn.Module) -> Backbone | None:
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper answers for the model inside
    return next((b for b in BACKBONES.values() if b.owns(model)), None)


def backbone_of(model: nn.Module) -> Backbone:
    """The backbone that built `model` (a torch.compile wrapper answers for the model inside)."""
    b = _owner(model)
    if b is None:
        raise TypeError(f"no registered backbone builds a {type(model).__name__} (known: {', '.join(BACKBONES)})")
    return b


def eps_call(model: nn.Module):
    """fn(model, x, t, cond) -> eps: the `Backbone.eps` of the model's backbone; for a module that no registered
    backbone owns (a TA-EB ensemble, a test double), the default call of diffusers' UNets."""
    return (_owner(model) or Backbone()).eps


def diffusers_classes() -> list[str]:
    """The diffusers classes a `model.config` may name (those of the registered backbones)."""
    return sorted({b.diffusers_class for b in BACKBONES.values() if b.diffusers_class})


def backbone_of_config(config: dict, latent: bool) -> Backbone:
    """The backbone of a user's diffusers config: its `_class_name`, trained on latents (model.autoencoder set) or
    pixels. A class no registered backbone builds stops with one line naming it and the ones ebdiff can prune."""
    name = config.get("_class_name")
    if not name:
        raise ConfigError("model.config has no _class_name (a diffusers config.json names its class, e.g. "
                          f"\"_class_name\": \"UNet2DModel\"; ebdiff prunes {', '.join(diffusers_classes())})")
    family = [b for b in BACKBONES.values() if b.diffusers_class == name]
    if not family:
        raise ConfigError(f"model.config is a {name}, which ebdiff cannot prune (it prunes "
                          f"{', '.join(diffusers_classes())})")
    for b in family:
        if b.latent == latent:
            return b
    if latent:
        raise ConfigError(f"model.config is a {name}, which ebdiff trains on pixels: unset model.autoencoder")
    raise ConfigError(f"model.config is a {name}, which ebdiff trains on an autoencoder's latents: set "
                      "model.autoencoder=PATH (a diffusers VQModel or AutoencoderKL folder)")


@dataclass(frozen=True)
class ModelSpec:
    """The dense model a run trains, decided once from its `model` config section: a preset of a backbone, or a
    user's diffusers config (`model.config`, already read into a mapping) of the backbone its `_class_name`
    picks. `model_config`: the diffusers constructor settings that replace the preset's (a user's config, or a
    preset adapted to the data by `fit`); None: the preset as it is. `num_classes`: the classes the model is
    conditioned on, resolved (None: unconditional). `record()` is what a checkpoint's meta.json keeps of it and
    `from_meta` rebuilds it, without the config file or the data."""

    backbone: Backbone
    preset: str | None  # None: a user's config
    model_config: dict | None = None
    dropout: float = 0.1
    num_classes: int | None = None

    @classmethod
    def of(cls, mcfg) -> "ModelSpec":
        """The model of a `model` config section (or anything with its attributes: preset, and optionally config,
        dropout, num_classes, autoencoder)."""
        config, dropout = getattr(mcfg, "config", None), getattr(mcfg, "dropout", 0.1)
        n = getattr(mcfg, "num_classes", None)
        if n is not None and n < 1:
            raise ConfigError(f"model.num_classes must be at least 1; got {n}")
        if config is None:
            bb = backbone_of_preset(mcfg.preset)
            return cls(bb, mcfg.preset, None, dropout, bb.classes(mcfg.preset, n))
        if not isinstance(config, dict):
            raise ConfigError(f"model.config must be a path or a mapping; got {config!r}")
        try:
            bb = backbone_of_config(config, getattr(mcfg, "autoencoder", None) is not None)
            settings = {k: v for k, v in config.items() if not k.startswith("_")}
            bb.check_config(settings)
            return cls(bb, None, settings, dropout, bb.config_classes(settings, n))
        except ConfigError as e:  # a pretrained folder's config: name the setting the user gave
            pretrained, text = getattr(mcfg, "pretrained", None), str(e)
            if pretrained is None or not text.startswith("model.config "):
                raise
            raise ConfigError(f"model.pretrained={pretrained}: its config.json {text.removeprefix('model.config ')}"
                              ) from None

    @classmethod
    def from_meta(cls, meta: dict) -> "ModelSpec":
        """The model a checkpoint's (or an export's plan.json's) meta describes (`record`)."""
        settings = meta.get("model_config")
        if settings is None:
            bb = backbone_of_preset(meta["preset"])
            classes = bb.classes(meta["preset"], meta.get("num_classes"))
            return cls(bb, meta["preset"], None, meta.get("dropout", 0.1), classes)
        bb = get_backbone(meta["backbone"]) if meta.get("backbone") else backbone_of_preset(meta["preset"])
        return cls(bb, meta.get("preset"), dict(settings), meta.get("dropout", 0.1), meta.get("num_classes"))

    def record(self) -> dict:
        """What rebuilds this model (meta.json, an export's plan.json): preset, dropout, classes and, when the
        preset's architecture is replaced, the backbone and its constructor settings."""
        out = {"preset": self.preset, "dropout": self.dropout, "num_classes": self.num_classes}
        if self.model_config is not None:
            out.update(backbone=self.backbone.name, model_config=self.model_config)
        return out

    @property
    def label(self) -> str:
        """How error lines name the model: `model.preset=NAME` or `model.config (a CLASS)`."""
        if self.preset is not None:
            return f"model.preset={self.preset}"
        return f"model.config (a {self.backbone.diffusers_class})"

    @property
    def latent(self) -> bool:
        return self.backbone.latent

    @property
    def classes_setting(self) -> str:
        """The setting that gives the class count (error lines): model.num_classes, or a model.config's class key."""
        key = self.backbone.classes_key
        given = self.preset is None and key is not None and self.model_config.get(key) is not None
        return f"model.config's {key}" if given else "model.num_classes"

    def image_shape(self, factor: int | None = None) -> tuple[int | None, int | None]:
        """(channels, resolution) of the images the data loader gives by default: the preset's, or a pixel config's
        in_channels and sample_size; a latent config's pixel size is its sample_size x the autoencoder's `factor`
        (its channels: the autoencoder's, None here)."""
        if self.preset is not None:
            return self.backbone.image_shape(self.preset)
        cin, _, size, _ = self.backbone.config_io(self.model_config)
        if self.latent:
            return None, None if factor is None else size * factor
        return cin, size

    def size_multiple(self) -> int:
        if self.preset is not None:
            return self.backbone.size_multiple(self.preset)
        return self.backbone.config_io(self.model_config)[3]

    def fit(self, shape, what: str, factor: int = 1) -> "ModelSpec":
        """This model for samples of `shape` (C, H, W) given by `what` (e.g. "data.name=cifar10"): a preset
        adapted to their channels and size where they differ from the preset's (in and out channels, sample
        size), a user's config checked against them. What cannot fit stops with one line naming the setting to
        change. factor: pixels per sample pixel (a latent model's autoencoder), for the data.image_size hint."""
        c, h = int(shape[0]), int(shape[1])
        bb, kind = self.backbone, "latents" if self.latent else "images"
        if self.preset is not None:
            base = bb.preset_config(self.preset)
            if base is None:  # a family built from presets only: the data must fit the preset
                want = bb.latent_channels(self.preset) if self.latent else bb.image_shape(self.preset)[0]
                if c != want:
                    raise ConfigError(f"{self.label} takes {want}-channel {kind} but {what} gives {c} channels, and "
                                      f"its backbone '{bb.name}' cannot adapt: choose a model.preset for {c} channels")
                return self
            cin, _, size, multiple = bb.config_io(base)
            if (cin, size) == (c, h):
                return self
            if h % multiple:
                raise ConfigError(f"{self.label} cannot take {h}x{h} {kind} from {what}: their size must be a "
                                  f"multiple of {multiple}; set data.image_size to a multiple of {multiple * factor}")
            return replace(self, model_config=bb.with_io(base, c, h))
        cin, _, size, _ = bb.config_io(self.model_config)
        if cin != c:
            raise ConfigError(f"{self.label} has in_channels={cin} but {what} gives {c}-channel {kind}: set "
                              f"in_channels and out_channels to {c} in the config")
        if size != h:
            raise ConfigError(f"{self.label} has sample_size={size} but {what} gives {h}x{h} {kind}: set "
                              f"sample_size={h} in the config, or data.image_size={size * factor}")
        return self

    def build(self) -> nn.Module:
        """A freshly initialised dense model."""
        if self.model_config is None:
            return self.backbone.build(self.preset, self.dropout, self.num_classes)
        return self.backbone.build_config(self.model_config, self.dropout, self.num_classes)


# ---------------------------------------------------------------------- any backbone's model
def build_model(name: str, dropout: float = 0.1, num_classes: int | None = None) -> nn.Module:
    """A freshly initialised dense model of a preset. num_classes: condition on that many classes (None: the
    preset's own, i.e. unconditional for pixel presets); the table gets one more row, the null class."""
    bb = backbone_of_preset(name)
    classes = bb.classes(name, num_classes)
    if classes is not None and classes < 1:
        raise ConfigError(f"model.num_classes must be at least 1; got {classes}")
    return bb.build(name, dropout, classes)


def build_from_config(mcfg) -> nn.Module:
    """The dense model a `model` config section describes (preset or model.config, dropout, num_classes), before
    it is fitted to any data (`ModelSpec.fit`)."""
    return ModelSpec.of(mcfg).build()


def model_classes(model: nn.Module) -> int | None:
    """The number of data classes a model is conditioned on (its null class is this index), or None."""
    return backbone_of(model).model_classes(model)


def example_inputs(model: nn.Module, batch: int = 1, res: int | None = None) -> dict[str, torch.Tensor]:
    """One forward's inputs (counting, tracing): `Backbone.example_inputs` of the model's backbone."""
    return backbone_of(model).example_inputs(model, batch, res)


def format_count(x: float) -> str:
    """12345678 -> '12.35M' (params, MACs)."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def count_macs_params(model: nn.Module, res: int | None = None) -> tuple[int, int]:
    """MACs of one 1-image forward (at the preset's resolution unless `res`) and the parameter count,
    counted the Torch-Pruning way (`Backbone.macs_convention`)."""
    import contextlib
    import io

    import torch_pruning as tp  # imported on use: torch-pruning is slow to import

    was_training = model.training
    model.eval()
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # tp prints a batch-size warning
        macs, params = tp.utils.count_ops_and_params(model, example_inputs(model, 1, res))
    model.train(was_training)
    return int(macs), int(params)


def size_of(model: nn.Module) -> dict[str, int]:
    """{"params", "macs"} of a model (`count_macs_params`), as run files record them."""
    macs, params = count_macs_params(model)
    return {"params": params, "macs": macs}


def autocast_eps(fn, device_type: str):
    """An eps callable evaluated under bf16 autocast, returning fp32 (the sampling fast path)."""

    def f(x: torch.Tensor, t: torch.Tensor, *cond) -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = fn(x, t, *cond)
        return out.float()

    return f


def fixed_batch_eps(fn, batch: int):
    """An eps callable that pads a smaller batch (the last one of a job) with zeros up to `batch` rows
    and returns only the real rows, so that a compiled model sees one shape and records one CUDA graph.
    Rows are independent in the UNet (GroupNorm, no batch statistics): padding changes no result."""

    def f(x: torch.Tensor, t: torch.Tensor, *cond) -> torch.Tensor:
        m = x.shape[0]
        if m >= batch:
            return fn(x, t, *cond)
        x = torch.cat([x, x.new_zeros((batch - m, *x.shape[1:]))])
        t = torch.cat([t, t[:1].expand(batch - m)])
        cond = [c if c is None else torch.cat([c, c[:1].expand(batch - m)]) for c in cond]
        return fn(x, t, *cond)[:m]

    return f


def eps_fn(model: nn.Module):
    """Wrap a model as the eps-model callable the samplers take: f(x, t) -> eps, or f(x, t, cond) -> eps for
    class labels `cond` (the one path conditions take; `sampling.conditioned` supplies them), through its
    backbone's `eps`."""
    call = eps_call(model)

    def f(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return call(model, x, t, cond)

    f.model = model  # what `evaluate.compile_eps` compiles
    return f
