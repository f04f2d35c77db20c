"""What the diffusers UNet backbones share: the call convention `model(sample, timestep, class_labels).sample`,
the fixed-scale attention processor, the pruning rules for diffusers' attention and GEGLU layers, and the
attributes a pruned diffusers model must have fixed."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from ..errors import ConfigError
from .base import Backbone


class DiffusersLike(nn.Module):
    """A module that composes diffusers models and answers the attributes diffusers' pipelines read off a
    model besides `config`: its dtype and device (those of its parameters)."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class FixedScaleAttnProcessor:
    """Self-attention with the softmax scale stored on the module (`attn.scale`).

    diffusers' default processor lets scaled_dot_product_attention use 1/sqrt(current head width),
    so pruning q/k silently changes the attention temperature. With this processor a pruned ticket
    keeps 1/sqrt(original width): removing a channel is then exactly zeroing it (tested), and the
    ticket starts from the function of the dense weights it came from.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        b = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        heads = attn.heads
        q = q.view(b, -1, heads, q.shape[-1] // heads).transpose(1, 2)
        k = k.view(b, -1, heads, k.shape[-1] // heads).transpose(1, 2)
        v = v.view(b, -1, heads, v.shape[-1] // heads).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask,
                                                               scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, -1, heads * v.shape[-1]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, -1, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def use_fixed_scale_attention(model: torch.nn.Module) -> torch.nn.Module:
    from diffusers.models.attention_processor import Attention

    for m in model.modules():
        if isinstance(m, Attention):
            m.set_processor(FixedScaleAttnProcessor())
    return model


class DiffusersUNetBackbone(Backbone):
    """The shared half of the diffusers UNet backbones: called as `model(sample, timestep, class_labels).sample`
    (`Backbone.eps`); `config` holds in_channels, sample_size and block_out_channels; `conv_out` (also under
    `unet.`) is never pruned; attention q/k/v groups keep their heads and GEGLU projections their pairs;
    Up/Downsample2D's channel attributes follow their convs."""

    def sample_shape(self, model: nn.Module) -> tuple[int, int, int]:
        c, s = model.config.in_channels, model.config.sample_size
        return c, s, s

    def trace_inputs(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The smallest resolution every down block accepts (the graph does not depend on it, and lsun256 traces
        16x faster at 64x64 than at 256x256); a class for a conditional model."""
        cfg = model.config
        return self.example_inputs(model, 1, min(cfg.sample_size, 2 ** len(cfg.block_out_channels)))

    def ignored_layers(self, model: nn.Module) -> list[nn.Module]:
        mods = dict(model.named_modules())
        return [mods[p + "conv_out"] for p in ("", "unet.") if p + "conv_out" in mods]

    def group_kind(self, graph, group, names: dict, modules: dict) -> tuple[str, int] | None:
        root = names[group[0].dep.target.module]
        if root.endswith("ff.net.0.proj"):  # diffusers' GEGLU: proj -> chunk(2) -> value * gelu(gate)
            return "geglu", 1
        for dep, _ in group:
            mod = dep.target.module
            name = names.get(mod, "")
            if (isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")
                    and graph.is_out_channel_pruning_fn(dep.handler)):
                attn = modules.get(name.rsplit(".", 1)[0])
                heads = int(getattr(attn, "heads", 1) or 1)
                return ("heads", heads) if heads > 1 else ("plain", 1)
        return None

    def after_pruning(self, model: nn.Module) -> None:
        """Upsample2D/Downsample2D keep their pre-pruning `channels`; set them from their conv."""
        for m in model.modules():
            if type(m).__name__ in ("Upsample2D", "Downsample2D"):
                conv = getattr(m, "conv", None)
                if isinstance(conv, nn.Conv2d):
                    m.channels = conv.in_channels
                    m.out_channels = conv.out_channels

    def size_multiple(self, preset: str) -> int:
        return self.config_io(self.preset_config(preset))[3]

    def config_io(self, config: dict) -> tuple[int, int, int, int]:
        """A UNet halves its input once per down block but the last: the size is a multiple of 2^(blocks - 1)."""
        blocks = len(config.get("block_out_channels") or (224, 448, 672, 896))  # diffusers' default: 4 blocks
        cin = int(config.get("in_channels", 3 if self.diffusers_class == "UNet2DModel" else 4))
        return cin, int(config.get("out_channels", cin)), config.get("sample_size"), 2 ** (blocks - 1)

    # The settings whose pruning is tested (the presets' and those tests/test_user_model.py prunes), key -> the
    # values ebdiff prunes correctly; others (scale-shift time conditioning, Fourier time embeddings, resnet
    # up/down sampling, other block types) couple channels the engine does not know, so a config asking for them
    # stops with one line instead of a ticket that breaks.
    prunable: ClassVar[dict[str, tuple]] = {}

    def check_config(self, config: dict) -> None:
        """What ebdiff prunes (`prunable`); epsilon prediction: out_channels = in_channels; one square sample_size."""
        for key, allowed in self.prunable.items():
            values = config.get(key, allowed[0])
            bad = [v for v in (values if isinstance(values, (list, tuple)) else [values]) if v not in allowed]
            if bad:
                raise ConfigError(f"model.config has {key} with {bad[0]!r}, which ebdiff cannot prune (it prunes "
                                  f"{', '.join(map(str, allowed))})")
        cin, cout, size, _ = self.config_io(config)
        if cout != cin:
            raise ConfigError(f"model.config has out_channels={cout} but in_channels={cin}: ebdiff trains epsilon "
                              f"prediction (the output is the input's noise), so set out_channels={cin}")
        if isinstance(size, (list, tuple)) and len(set(size)) == 1:
            config["sample_size"] = size = int(size[0])
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigError(f"model.config has sample_size={size!r}: ebdiff trains square samples, one positive "
                              "integer size")


def construct(cls, config: dict, **settings) -> nn.Module:
    """diffusers' `cls.from_config(config, **settings)`; settings it cannot build from stop with one line."""
    try:
        return cls.from_config(config, **settings)
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"model.config: diffusers cannot build a {cls.__name__} from these settings "
                          f"({type(exc).__name__}: {first})") from None
