"""Backbones: the model families ebdiff trains, each a `Backbone` in a registry, its presets data under it.

A backbone builds a model from a preset and says what the rest of ebdiff must know about it: the data it
consumes (`image_shape`, `latent`), the classes it is conditioned on, how it is called (`eps`), example and
tracing inputs, what the pruning engine keeps consistent (`ignored_layers`, `group_kind`, `after_pruning`)
and how its size is counted (`macs_convention`, `paper_count`). Ask `backbone_of_preset(name)` or
`backbone_of(model)`; never branch on a family elsewhere.

Adding a backbone is one module and one import line here:

    @register_backbone
    class MyNet(Backbone):
        name = "mynet"
        presets = {"mynet-small": dict(width=64)}
        def build(self, preset, dropout=0.1, num_classes=None): ...
        def image_shape(self, preset): return 3, 32
        def owns(self, model): return isinstance(model, MyNetModule)
        def sample_shape(self, model): return 3, 32, 32
        def eps(self, model, x, t, cond=None): return model(x, t, cond)
"""

# isort: off
# the registry lines: each module registers its backbone when imported, in this order (the order the presets
# are listed in); a new family is one more line
from . import unet  # noqa: F401
from . import unet_cond  # noqa: F401
from . import dit  # noqa: F401
# isort: on
from .base import (BACKBONES, Backbone, ModelSpec, autocast_eps, backbone_names, backbone_of, backbone_of_config,
                   backbone_of_preset, build_from_config, build_model, count_macs_params, diffusers_classes, eps_call,
                   eps_fn, example_inputs, fixed_batch_eps, format_count, get_backbone, model_classes, preset_names,
                   register_backbone, size_of, unregister_backbone)
from .common import DiffusersLike, DiffusersUNetBackbone, FixedScaleAttnProcessor, use_fixed_scale_attention
from .unet_cond import ClassConditionalUNet

__all__ = ["BACKBONES", "Backbone", "ClassConditionalUNet", "DiffusersLike", "DiffusersUNetBackbone",
           "FixedScaleAttnProcessor", "ModelSpec", "autocast_eps", "backbone_names", "backbone_of",
           "backbone_of_config", "backbone_of_preset", "build_from_config", "build_model", "count_macs_params",
           "diffusers_classes", "eps_call", "eps_fn", "example_inputs",
           "fixed_batch_eps", "format_count", "get_backbone", "model_classes", "preset_names", "register_backbone",
           "size_of", "unregister_backbone", "use_fixed_scale_attention"]
