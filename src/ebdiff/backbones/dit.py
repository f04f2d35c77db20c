"""Diffusion transformers: diffusers' `DiTTransformer2DModel` (Peebles & Xie's DiT), class-conditional through
adaLN-Zero, predicting epsilon (the presets: out_channels = in_channels; a user's learned-sigma config, out_channels
= 2 x in_channels, keeps its variance half, which is neither trained nor used: `eps` takes the noise half).

The class: the label embedding has num_classes + 1 rows, the last one the null class of classifier-free guidance.
DiT always takes a label, so an unconditional model (a pixel preset without `model.num_classes`) is one with a
single class whose every call gets the null class: the unconditional branch of a conditional DiT, and the row
classifier-free guidance would use. diffusers' own label dropout (10% per block, drawn from the global RNG in
each block separately) is switched off: ebdiff's training step drops labels itself, once per sample.

Pruning (`PruningEngine`): torch-pruning traces the fixed-scale attention processor's scaled_dot_product_attention
as one element-wise op, so q, k, v and the output projection's input fall into one group rooted at `to_v`; the
engine cuts it per head (every head loses the same channels' count, never a whole head; q, k and v lose the
same indices: q and k must, and v follows the group torch-pruning gives), with the softmax scale fixed at the
dense head width (`FixedScaleAttnProcessor`): removing a channel is zeroing it. The MLP's hidden channels
(`ff.net.0.proj`, a plain tanh-GELU, not a GEGLU) are a plain group. Left whole: the residual width (one group
through the patch embedding, every block's adaLN modulation and the final layer, `proj_out_1`), the final
projection `proj_out_2` (its widths are the patches' pixels) and the per-block timestep embedders (the
conditioning vector c; per-sample, not per-token, arithmetic, and the DiT paper shares one embedder)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError
from .base import Backbone, register_backbone
from .common import construct, use_fixed_scale_attention

# hidden = heads x head_dim; MLP ratio 4 (diffusers' default); `image`: the pixel images a latent preset's
# autoencoder encodes (its latents are in_channels x sample_size^2); `classes`: the default class count.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the demo: Fashion-MNIST 1x32x32, 8x8 = 64 tokens of 4x4 patches, 0.39M parameters, 12.97M MACs
    "dit-tiny": dict(dit=dict(sample_size=32, in_channels=1, patch_size=4, num_attention_heads=4,
                              attention_head_dim=16, num_layers=4)),
    # CIFAR-10 pixels: patch 2, hidden 384, depth 12, 6 heads (the DDIM fork's configs/cifar10_dit.yml)
    "dit-s2-cifar10": dict(dit=dict(sample_size=32, in_channels=3, patch_size=2, num_attention_heads=6,
                                    attention_head_dim=64, num_layers=12)),
    # CPU tests of the latent path: Fashion-MNIST 32x32 -> the tiny VQ-f4 autoencoder -> 3x8x8 latents, 16 tokens
    "dit-latent-tiny": dict(dit=dict(sample_size=8, in_channels=3, patch_size=2, num_attention_heads=4,
                                     attention_head_dim=16, num_layers=2), classes=10, image=(1, 32)),
    # the DiT paper's ImageNet 256 models on sd-vae-ft-ema latents 4x32x32
    "dit-b2-imagenet256": dict(dit=dict(sample_size=32, in_channels=4, patch_size=2, num_attention_heads=12,
                                        attention_head_dim=64, num_layers=12), classes=1000, image=(3, 256)),
    "dit-xl2-imagenet256": dict(dit=dict(sample_size=32, in_channels=4, patch_size=2, num_attention_heads=16,
                                         attention_head_dim=72, num_layers=28), classes=1000, image=(3, 256)),
}


class DiT(Backbone):
    """What the pixel and the latent DiT backbones share (everything but their presets and `latent`)."""

    component = "transformer"  # DiTPipeline's name for it
    macs_convention = (Backbone.macs_convention + " (diffusers' DiT: every block has its own timestep and class "
                       "embedder, and the attention products are not counted); `paper_count`: the DiT paper's, "
                       "one shared embedder and the attention products of one latent added")

    classes_key = "num_embeds_ada_norm"
    diffusers_class = "DiTTransformer2DModel"

    def preset_config(self, preset: str) -> dict[str, Any]:
        cfg = dict(PRESETS[preset]["dit"])
        return dict(cfg, out_channels=cfg["in_channels"])

    def build(self, preset: str, dropout: float = 0.1, num_classes: int | None = None) -> nn.Module:
        return self.build_config(self.preset_config(preset), dropout, num_classes)

    def build_config(self, config: dict, dropout: float = 0.1, num_classes: int | None = None) -> nn.Module:
        """A DiT conditioned on `num_classes` (None: 1 class, whose every call gets the null class)."""
        from diffusers import DiTTransformer2DModel  # imported on use: diffusers is slow to import

        model = construct(DiTTransformer2DModel, config, dropout=dropout, num_embeds_ada_norm=num_classes or 1)
        for block in model.transformer_blocks:  # ebdiff's step drops labels (classifier-free guidance), once
            block.norm1.emb.class_embedder.dropout_prob = 0.0
        model.num_classes = num_classes  # None: unconditional (every call gets the null class)
        return use_fixed_scale_attention(model)

    def config_io(self, config: dict) -> tuple[int, int, int, int]:
        """diffusers' defaults: 4 channels in, out_channels None = in_channels; the size a multiple of the patch."""
        cin = int(config.get("in_channels", 4))
        cout = config.get("out_channels")
        return cin, cin if cout is None else int(cout), config.get("sample_size", 32), int(config.get("patch_size", 2))

    def with_io(self, config: dict, channels: int, size: int) -> dict:
        """A learned-sigma DiT keeps its 2 x channels outputs."""
        cin, cout, _, _ = self.config_io(config)
        return dict(config, in_channels=channels, out_channels=channels * cout // cin, sample_size=size)

    def check_config(self, config: dict) -> None:
        """Epsilon prediction: out_channels = in_channels, or 2 x in_channels (a learned-sigma DiT, as the DiT
        paper's: the noise is the first half, the variance half is kept but neither trained nor used); adaLN-Zero
        conditioning (norm_type ada_norm_zero, the class table num_embeds_ada_norm); a square sample size."""
        cin, cout, size, patch = self.config_io(config)
        if cout not in (cin, 2 * cin):
            raise ConfigError(f"model.config has out_channels={cout} but in_channels={cin}: ebdiff trains epsilon "
                              f"prediction, so out_channels must be {cin} (or {2 * cin}: noise and learned variance)")
        if config.get("activation_fn", "gelu-approximate") in ("geglu", "geglu-approximate", "swiglu"):
            raise ConfigError(f"model.config has activation_fn={config['activation_fn']!r}, which ebdiff cannot prune "
                              "in a DiT (its MLP channels are pruned as plain channels, not as value/gate pairs)")
        if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
            raise ConfigError(f"model.config has norm_type={config['norm_type']!r}: ebdiff conditions a DiT through "
                              "adaLN-Zero (norm_type ada_norm_zero)")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1 or size % patch:
            raise ConfigError(f"model.config has sample_size={size!r}: ebdiff trains square samples, one positive "
                              f"integer size that is a multiple of patch_size={patch}")

    def config_classes(self, config: dict, num_classes: int | None) -> int | None:
        """num_embeds_ada_norm classes (1 or none: unconditional), or model.num_classes, which must agree with it."""
        table = config.get("num_embeds_ada_norm")
        if table is None or num_classes is None:
            return num_classes if num_classes is not None else (table if table and table > 1 else None)
        if table != num_classes:
            raise ConfigError(f"model.config has num_embeds_ada_norm={table} classes but model.num_classes="
                              f"{num_classes}: set num_embeds_ada_norm={num_classes} in the config, or "
                              f"model.num_classes={table}")
        return num_classes

    def image_shape(self, preset: str) -> tuple[int, int]:
        p = PRESETS[preset]
        return tuple(p["image"]) if "image" in p else (p["dit"]["in_channels"], p["dit"]["sample_size"])

    def size_multiple(self, preset: str) -> int:
        return PRESETS[preset]["dit"]["patch_size"]

    def latent_channels(self, preset: str) -> int:
        """The channels of the latents a latent preset's DiT takes (what its autoencoder must give)."""
        return PRESETS[preset]["dit"]["in_channels"]

    def classes(self, preset: str, num_classes: int | None = None) -> int | None:
        n = PRESETS[preset].get("classes") if num_classes is None else num_classes
        return None if n is None else int(n)

    def owns(self, model: nn.Module) -> bool:
        return type(model).__name__ == "DiTTransformer2DModel"

    def sample_shape(self, model: nn.Module) -> tuple[int, int, int]:
        c, s = model.config.in_channels, model.config.sample_size
        return c, s, s

    def labels(self, model: nn.Module, cond: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """The class labels of a call: `cond`, or the null class (row num_embeds_ada_norm) for every sample."""
        if cond is not None:
            return cond
        null = int(model.config.num_embeds_ada_norm)
        return torch.full((x.shape[0],), null, dtype=torch.long, device=x.device)

    def eps(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor,
            cond: torch.Tensor | None = None) -> torch.Tensor:
        out = model(x, t, class_labels=self.labels(model, cond, x)).sample
        return out if out.shape[1] == x.shape[1] else out[:, : x.shape[1]]  # a learned-sigma DiT: the noise half

    def example_inputs(self, model: nn.Module, batch: int = 1, res: int | None = None) -> dict[str, torch.Tensor]:
        """`Backbone.example_inputs` under DiT's argument names, always with a label (the null class when
        unconditional)."""
        ex = super().example_inputs(model, batch, res)
        sample = ex.pop("sample")
        return {"hidden_states": sample, "timestep": ex["timestep"],
                "class_labels": self.labels(model, ex.get("class_labels"), sample)}

    def pipeline(self, meta: dict) -> str | None:
        """diffusers' DiTPipeline for a latent model (its `vae` decodes the latents); a pixel model has no
        pipeline: DiTPipeline always decodes with a `vae`, and a pixel model has no autoencoder to give it."""
        return "DiTPipeline" if meta.get("latent") else None

    # ------------------------------------------------------------------ pruning
    def ignored_layers(self, model: nn.Module) -> list[nn.Module]:
        """proj_out_1 (drops the residual-width group with it), proj_out_2 and the per-block timestep embedders."""
        mods = [model.proj_out_1, model.proj_out_2]
        for b in model.transformer_blocks:
            te = b.norm1.emb.timestep_embedder
            mods += [te.linear_1, te.linear_2]
        return mods

    def group_kind(self, graph, group, names: dict, modules: dict) -> tuple[str, int] | None:
        """The attention group (rooted at to_v, holding to_q and to_k): heads; the MLP: plain."""
        name = names[group[0].dep.target.module]
        if name.endswith("attn1.to_v"):
            heads = int(modules[name.rsplit(".", 1)[0]].heads)
            return ("heads", heads) if heads > 1 else ("plain", 1)
        return ("plain", 1) if name.endswith("ff.net.0.proj") else None

    def paper_count(self, model: nn.Module, macs: int) -> dict[str, int]:
        """The DiT paper's convention: one timestep/class embedder (diffusers repeats it in every block) and the
        multiply-adds of one latent, with the two attention products (q k^T and attention x v, N^2 x width
        each per block) that the counter does not see."""
        blocks = model.transformer_blocks
        emb = sum(p.numel() for p in blocks[0].norm1.emb.parameters())
        emb_macs = sum(m.in_features * m.out_features for m in blocks[0].norm1.emb.modules()
                       if isinstance(m, nn.Linear))
        c, h, w = self.sample_shape(model)
        tokens = (h // model.config.patch_size) * (w // model.config.patch_size)
        attn = sum(2 * tokens * tokens * b.attn1.to_v.out_features for b in blocks)
        return {"paper_params": sum(p.numel() for p in model.parameters()) - (len(blocks) - 1) * emb,
                "paper_macs": macs - (len(blocks) - 1) * emb_macs + attn}


@register_backbone
class PixelDiT(DiT):
    name = "dit"
    presets = {k: v for k, v in PRESETS.items() if "image" not in v}


@register_backbone
class LatentDiT(DiT):
    """The latent presets (the data source `latents`); a model of either answers to `PixelDiT` (`backbone_of`):
    a model is the same family whatever it was trained on."""

    name = "dit-latent"
    presets = {k: v for k, v in PRESETS.items() if "image" in v}
    latent = True

    def owns(self, model: nn.Module) -> bool:
        return False
