"""Model presets: diffusers `UNet2DModel` configurations, one source of truth for each size."""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError

_COMMON: dict[str, Any] = dict(
    layers_per_block=2,
    norm_num_groups=32,
    norm_eps=1e-6,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    act_fn="silu",
    attention_head_dim=None,
    center_input_sample=False,
    time_embedding_type="positional",
)

PRESETS: dict[str, dict[str, Any]] = {
    # google/ddpm-cifar10-32: 35.75M params / 6.06G MACs
    "cifar10": dict(
        sample_size=32, in_channels=3, out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    # 78.70M / 23.92G
    "celeba64": dict(
        sample_size=64, in_channels=3, out_channels=3,
        block_out_channels=(128, 256, 256, 256, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    # 113.67M / 248.69G
    "lsun256": dict(
        sample_size=256, in_channels=3, out_channels=3,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    # 32x32 grey images: the cifar10 architecture at half width (a quarter of the MACs)
    "fmnist": dict(
        sample_size=32, in_channels=1, out_channels=1,
        block_out_channels=(64, 128, 128, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    # CPU tests and the demo (0.28M params, 65M MACs): same block types, one resnet per block, 8 norm groups
    "tiny": dict(
        sample_size=32, in_channels=1, out_channels=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    ),
}


def preset_config(name: str, dropout: float = 0.1) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}' (known: {', '.join(PRESETS)})")
    cfg = dict(_COMMON)
    cfg.update(PRESETS[name])
    cfg["dropout"] = dropout
    return cfg


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


def build_model(name: str, dropout: float = 0.1) -> torch.nn.Module:
    """A freshly initialised dense model of a preset."""
    from diffusers import UNet2DModel

    return use_fixed_scale_attention(UNet2DModel(**preset_config(name, dropout)))


def preset_shape(name: str) -> tuple[int, int]:
    """(channels, resolution) of a preset's images."""
    p = preset_config(name)
    return p["in_channels"], p["sample_size"]


def example_inputs(model: torch.nn.Module, batch: int = 1, res: int | None = None) -> dict[str, torch.Tensor]:
    c = model.config.in_channels
    s = res or model.config.sample_size
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(0)  # never touch the global RNG (exact resume)
    return {
        "sample": torch.randn(batch, c, s, s, device=dev, generator=g),
        "timestep": torch.ones((batch,), dtype=torch.long, device=dev),
    }


def format_count(x: float) -> str:
    """12345678 -> '12.35M' (params, MACs)."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def count_macs_params(model: torch.nn.Module, res: int | None = None) -> tuple[int, int]:
    """MACs of one 1-image forward (at the preset's resolution unless `res`) and the parameter count,
    counted the Torch-Pruning way."""
    import contextlib
    import io

    import torch_pruning as tp

    was_training = model.training
    model.eval()
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # tp prints a batch-size warning
        macs, params = tp.utils.count_ops_and_params(model, example_inputs(model, 1, res))
    model.train(was_training)
    return int(macs), int(params)


def size_of(model: torch.nn.Module) -> dict[str, int]:
    """{"params", "macs"} of a model (`count_macs_params`), as run files record them."""
    macs, params = count_macs_params(model)
    return {"params": params, "macs": macs}


def autocast_eps(fn, device_type: str):
    """An eps callable evaluated under bf16 autocast, returning fp32 (the sampling fast path)."""

    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = fn(x, t)
        return out.float()

    return f


def fixed_batch_eps(fn, batch: int):
    """An eps callable that pads a smaller batch (the last one of a job) with zeros up to `batch` rows
    and returns only the real rows, so that a compiled model sees one shape and records one CUDA graph.
    Rows are independent in the UNet (GroupNorm, no batch statistics): padding changes no result."""

    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if m >= batch:
            return fn(x, t)
        x = torch.cat([x, x.new_zeros((batch - m, *x.shape[1:]))])
        t = torch.cat([t, t[:1].expand(batch - m)])
        return fn(x, t)[:m]

    return f


def eps_fn(model: torch.nn.Module):
    """Wrap a UNet2DModel as the eps-model callable the samplers take: f(x, t) -> eps."""

    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t).sample

    f.model = model  # what `evaluate.compile_eps` compiles
    return f
