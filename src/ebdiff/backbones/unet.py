"""Pixel-space diffusers `UNet2DModel`s, optionally class-conditional through diffusers' class embedding
(`num_class_embeds` = classes + 1, the last row the null class), added to the timestep embedding."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..errors import ConfigError
from .base import register_backbone
from .common import DiffusersUNetBackbone, construct, use_fixed_scale_attention

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


@register_backbone
class UNet(DiffusersUNetBackbone):
    name = "unet"
    presets = PRESETS
    classes_key = "num_class_embeds"
    diffusers_class = "UNet2DModel"
    prunable = {"down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("UpBlock2D", "AttnUpBlock2D"),
                "mid_block_type": ("UNetMidBlock2D", None), "resnet_time_scale_shift": ("default",),
                "time_embedding_type": ("positional", "learned"), "downsample_type": ("conv",),
                "upsample_type": ("conv",)}

    def pipeline(self, meta: dict) -> str | None:
        """DDIMPipeline calls `unet(sample, t)`: unconditional models only."""
        return "DDIMPipeline" if meta.get("num_classes") is None and not meta.get("latent") else None

    def preset_config(self, preset: str) -> dict[str, Any]:
        return {**_COMMON, **PRESETS[preset]}

    def build(self, preset: str, dropout: float = 0.1, num_classes: int | None = None) -> nn.Module:
        return self.build_config(self.preset_config(preset), dropout, num_classes)

    def build_config(self, config: dict, dropout: float = 0.1, num_classes: int | None = None) -> nn.Module:
        from diffusers import UNet2DModel  # imported on use: diffusers is slow to import

        # diffusers' class embedding, added to the timestep embedding: the classes and the null class
        return use_fixed_scale_attention(construct(UNet2DModel, config, dropout=dropout, num_class_embeds=(
            None if num_classes is None else num_classes + 1)))

    def check_config(self, config: dict) -> None:
        super().check_config(config)
        if config.get("class_embed_type") is not None:
            raise ConfigError(f"model.config has class_embed_type={config['class_embed_type']!r}: ebdiff conditions a "
                              "UNet2DModel on classes through num_class_embeds only; set class_embed_type to null")

    def config_classes(self, config: dict, num_classes: int | None) -> int | None:
        table = config.get("num_class_embeds")
        if table is None:
            return num_classes
        if not isinstance(table, int) or table < 2:
            raise ConfigError(f"model.config has num_class_embeds={table!r}: ebdiff's class table holds the classes "
                              "and the null class of guidance (its last row), so at least 2 rows")
        if num_classes is not None and num_classes != table - 1:
            raise ConfigError(f"model.config has num_class_embeds={table} ({table - 1} classes and the null class of "
                              f"guidance) but model.num_classes={num_classes}: set num_class_embeds={num_classes + 1} "
                              f"in the config, or model.num_classes={table - 1}")
        return table - 1

    def image_shape(self, preset: str) -> tuple[int, int]:
        p = PRESETS[preset]
        return p["in_channels"], p["sample_size"]

    def owns(self, model: nn.Module) -> bool:
        return type(model).__name__ == "UNet2DModel"

    def model_classes(self, model: nn.Module) -> int | None:
        n = model.config.get("num_class_embeds")
        return None if n is None else int(n) - 1
