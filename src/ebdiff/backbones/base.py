"""The `Backbone` interface and the registry of backbones and their presets.

A backbone is one model family: it builds a model from a preset (its presets are data, `Backbone.presets`),
says which data the model consumes, how it is called (`eps`) and what the pruning engine must keep
consistent. Every other module asks the backbone of a preset (`backbone_of_preset`) or of a model
(`backbone_of`) instead of knowing a model family.
"""

from __future__ import annotations

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
    """The dense model a `model` config section describes (preset, dropout, num_classes)."""
    return build_model(mcfg.preset, mcfg.dropout, mcfg.num_classes)


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
