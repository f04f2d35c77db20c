"""Latent class-conditional diffusers `UNet2DConditionModel`s (the CompVis LDM layout): the class reaches the
UNet as a one-token cross-attention context from a learned table (`ClassConditionalUNet`); they train on an
autoencoder's latents (latents.py)."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError
from .base import register_backbone
from .common import DiffusersLike, DiffusersUNetBackbone, construct, use_fixed_scale_attention

# Class-conditional latent presets: diffusers `UNet2DConditionModel` configurations of CompVis LDM UNets, the
# class as a one-token cross-attention context from a learned table of num_classes + 1 rows (the last one is
# the null class of classifier-free guidance). `image`: the pixel images (channels, size) the autoencoder
# turns into the UNet's latents (in_channels x sample_size^2).
PRESETS: dict[str, dict[str, Any]] = {
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
        return json.dumps(dict(self.config), indent=2, sort_keys=True, default=list) + "\n"

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        if class_labels is None:
            class_labels = torch.full((sample.shape[0],), self.num_classes, dtype=torch.long, device=sample.device)
        context = self.class_embedding(class_labels)[:, None, :]
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=return_dict)


@register_backbone
class UNetCond(DiffusersUNetBackbone):
    name = "unet-cond"
    presets = PRESETS
    latent = True
    macs_convention = (DiffusersUNetBackbone.macs_convention + "; `paper_count`: the paper's (Table 6), the UNet's "
                       "parameters without the class table and the MACs of a batch of 6 latents")

    diffusers_class = "UNet2DConditionModel"
    prunable = {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
                "mid_block_type": ("UNetMidBlock2DCrossAttn", None),
                "resnet_time_scale_shift": ("default",), "time_embedding_type": ("positional",)}

    def preset_config(self, preset: str) -> dict[str, Any]:
        return dict(PRESETS[preset]["unet"])

    def build(self, preset: str, dropout: float = 0.1, num_classes: int | None = None) -> nn.Module:
        return self.build_config(self.preset_config(preset), dropout, self.classes(preset, num_classes))

    def build_config(self, config: dict, dropout: float = 0.1, num_classes: int | None = None) -> nn.Module:
        from diffusers import UNet2DConditionModel  # imported on use: diffusers is slow to import

        unet = construct(UNet2DConditionModel, config, dropout=dropout)
        return use_fixed_scale_attention(ClassConditionalUNet(unet, num_classes))

    def check_config(self, config: dict) -> None:
        """The class reaches the UNet as one cross-attention token of a learned table: one cross_attention_dim, and
        none of diffusers' other conditionings (class, addition or encoder-projection embeddings)."""
        super().check_config(config)
        for key in ("class_embed_type", "num_class_embeds", "addition_embed_type", "encoder_hid_dim"):
            if config.get(key) is not None:
                raise ConfigError(f"model.config has {key}={config[key]!r}: ebdiff conditions a UNet2DConditionModel "
                                  "on the class through cross-attention on its own class table; set it to null")
        if not isinstance(config.get("cross_attention_dim", 1280), int):
            raise ConfigError(f"model.config has cross_attention_dim={config['cross_attention_dim']!r}: ebdiff's class "
                              "token needs one width for every block")

    def config_classes(self, config: dict, num_classes: int | None) -> int | None:
        if num_classes is None:
            raise ConfigError("model.config is a UNet2DConditionModel, which ebdiff conditions on classes: set "
                              "model.num_classes (the data's class count)")
        return num_classes

    def weights_module(self, model: nn.Module) -> nn.Module:
        return model.unet  # the class table is ebdiff's, not in a diffusers folder

    def image_shape(self, preset: str) -> tuple[int, int]:
        return tuple(PRESETS[preset]["image"])

    def latent_channels(self, preset: str) -> int:
        """The channels of the latents the preset's UNet takes (what its autoencoder must give)."""
        return PRESETS[preset]["unet"]["in_channels"]

    def classes(self, preset: str, num_classes: int | None = None) -> int | None:
        return int(PRESETS[preset]["num_classes"] if num_classes is None else num_classes)

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, ClassConditionalUNet)

    def model_classes(self, model: nn.Module) -> int | None:
        return model.num_classes

    def paper_count(self, model: nn.Module, macs: int) -> dict[str, int]:
        return {"unet_params": sum(p.numel() for p in model.unet.parameters()),
                "macs_batch6": 6 * macs}  # the counter's total for a batch is linear in it
