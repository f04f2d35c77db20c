"""Model presets: diffusers configurations, one source of truth for each size.

Pixel-space presets are `UNet2DModel`s (optionally class-conditional through diffusers' class embedding,
`model.num_classes`). Latent presets (`LATENT_PRESETS`) are class-conditional `UNet2DConditionModel`s
(the CompVis LDM layout: the class reaches the UNet as a one-token cross-attention context), wrapped with
their class-embedding table in `ClassConditionalUNet`; they train on an autoencoder's latents (latents.py).
Every model is called the same way: `model(sample, timestep, class_labels=None).sample`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

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


# Class-conditional latent presets: diffusers `UNet2DConditionModel` configurations of CompVis LDM UNets, the
# class as a one-token cross-attention context from a learned table of num_classes + 1 rows (the last one is
# the null class of classifier-free guidance). `image`: the pixel images (channels, size) the autoencoder
# turns into the UNet's latents (in_channels x sample_size^2).
LATENT_PRESETS: dict[str, dict[str, Any]] = {
    # CompVis latent-diffusion cin256-v2 (the paper's ImageNet-1K LDM, Diff-Pruning's ldm_exp): VQ-f4 latents
    # 3x64x64, model_channels 192, channel_mult 1/2/3/5, 2 res blocks, a SpatialTransformer (depth 1,
    # context 512, num_heads 1) at the 32/16/8 levels, ClassEmbedder(1001, 512). 400,920,579 UNet parameters,
    # as the original; 99.86G MACs per latent (x 6 latents: 599.2G, the paper's 598.8G; see `paper_count`).
    "ldm-imagenet256": dict(
        unet=dict(
            sample_size=64, in_channels=3, out_channels=3,
            block_out_channels=(192, 384, 576, 960),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=2, transformer_layers_per_block=1, cross_attention_dim=512,
            attention_head_dim=1,  # diffusers' legacy name: the NUMBER of heads (cin256-v2: num_heads 1)
            norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
            downsample_padding=1, use_linear_projection=False, resnet_time_scale_shift="default",
        ),
        num_classes=1000, image=(3, 256),
    ),
    # CPU tests and the latent demo: Fashion-MNIST 32x32 -> a VQ-f4 autoencoder -> 3x8x8 latents; one
    # cross-attention level with 2 heads (exercises the per-head pruning rule), 10 classes + the null class
    "ldm-tiny": dict(
        unet=dict(
            sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
            transformer_layers_per_block=1, cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
            flip_sin_to_cos=True, freq_shift=0, use_linear_projection=False,
        ),
        num_classes=10, image=(1, 32),
    ),
}


def preset_names() -> tuple[str, ...]:
    return (*PRESETS, *LATENT_PRESETS)


def is_latent_preset(name: str) -> bool:
    return name in LATENT_PRESETS


def preset_config(name: str, dropout: float = 0.1) -> dict[str, Any]:
    """The diffusers constructor arguments of a preset's UNet (a latent preset's: its `UNet2DConditionModel`)."""
    if name in LATENT_PRESETS:
        return dict(LATENT_PRESETS[name]["unet"], dropout=dropout)
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}' (known: {', '.join(preset_names())})")
    cfg = dict(_COMMON)
    cfg.update(PRESETS[name])
    cfg["dropout"] = dropout
    return cfg


def preset_classes(name: str, num_classes: int | None = None) -> int | None:
    """The number of data classes a model of this preset is conditioned on: `num_classes` when given, else the
    preset's (latent presets are class-conditional; pixel presets unconditional)."""
    if num_classes is not None:
        return int(num_classes)
    return LATENT_PRESETS[name]["num_classes"] if name in LATENT_PRESETS else None


class DiffusersLike(nn.Module):
    """A module that composes diffusers models and answers the attributes diffusers' pipelines read off a
    model besides `config`: its dtype and device (those of its parameters)."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class ClassConditionalUNet(DiffusersLike):
    """A diffusers `UNet2DConditionModel` with its class-embedding table (LDM's ClassEmbedder): the label
    picks a row, which is the one-token cross-attention context. Rows 0..num_classes-1 are the classes, row
    num_classes the null class (classifier-free guidance; also what `class_labels=None` means). Called like
    every ebdiff model, `model(sample, timestep, class_labels).sample`; `config` is the UNet's plus num_classes."""

    def __init__(self, unet: nn.Module, num_classes: int):
        super().__init__()
        self.unet = unet
        self.num_classes = int(num_classes)
        self.class_embedding = nn.Embedding(self.num_classes + 1, unet.config.cross_attention_dim)

    @property
    def config(self):
        from diffusers.configuration_utils import FrozenDict

        return FrozenDict({**dict(self.unet.config), "_class_name": type(self).__name__,
                           "num_classes": self.num_classes})

    def to_json_string(self) -> str:
        import json

        return json.dumps(dict(self.config), indent=2, sort_keys=True, default=list) + "\n"

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        if class_labels is None:
            class_labels = torch.full((sample.shape[0],), self.num_classes, dtype=torch.long, device=sample.device)
        context = self.class_embedding(class_labels)[:, None, :]
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=return_dict)


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


def build_model(name: str, dropout: float = 0.1, num_classes: int | None = None) -> torch.nn.Module:
    """A freshly initialised dense model of a preset. num_classes: condition on that many classes (None: the
    preset's own, i.e. unconditional for pixel presets); the table gets one more row, the null class."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    classes = preset_classes(name, num_classes)
    if classes is not None and classes < 1:
        raise ConfigError(f"model.num_classes must be at least 1; got {classes}")
    cfg = preset_config(name, dropout)
    if name in LATENT_PRESETS:
        return use_fixed_scale_attention(ClassConditionalUNet(UNet2DConditionModel(**cfg), classes))
    if classes is not None:  # diffusers' class embedding, added to the timestep embedding
        cfg["num_class_embeds"] = classes + 1
    return use_fixed_scale_attention(UNet2DModel(**cfg))


def build_from_config(mcfg) -> torch.nn.Module:
    """The dense model a `model` config section describes (preset, dropout, num_classes)."""
    return build_model(mcfg.preset, mcfg.dropout, mcfg.num_classes)


def model_classes(model: torch.nn.Module) -> int | None:
    """The number of data classes a model is conditioned on (its null class is this index), or None."""
    cfg = model.config
    if "num_classes" in cfg:
        return int(cfg["num_classes"])
    n = cfg.get("num_class_embeds")
    return None if n is None else int(n) - 1


def preset_shape(name: str) -> tuple[int, int]:
    """(channels, resolution) of a preset's images (a latent preset's pixel images, before the autoencoder)."""
    if name in LATENT_PRESETS:
        return tuple(LATENT_PRESETS[name]["image"])
    p = preset_config(name)
    return p["in_channels"], p["sample_size"]


def example_inputs(model: torch.nn.Module, batch: int = 1, res: int | None = None) -> dict[str, torch.Tensor]:
    """One forward's inputs (counting, tracing): noise at the model's resolution, t = 1, and for a
    class-conditional model class 0."""
    c = model.config.in_channels
    s = res or model.config.sample_size
    dev = next(model.parameters()).device
    if dev.type == "meta":  # shapes only: counting and tracing a model without its memory or arithmetic
        sample = torch.empty(batch, c, s, s, device=dev)
    else:  # never touch the global RNG (exact resume)
        sample = torch.randn(batch, c, s, s, device=dev, generator=torch.Generator(device=dev).manual_seed(0))
    ex = {
        "sample": sample,
        "timestep": torch.ones((batch,), dtype=torch.long, device=dev),
    }
    if model_classes(model) is not None:
        ex["class_labels"] = torch.zeros((batch,), dtype=torch.long, device=dev)
    return ex


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


def eps_fn(model: torch.nn.Module):
    """Wrap a model as the eps-model callable the samplers take: f(x, t) -> eps, or f(x, t, cond) -> eps for
    class labels `cond` (the one path conditions take; `sampling.conditioned` supplies them)."""

    def f(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None:
            return model(x, t).sample
        return model(x, t, class_labels=cond).sample

    f.model = model  # what `evaluate.compile_eps` compiles
    return f
