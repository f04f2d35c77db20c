"""Sizes of the model presets and of their pruned tickets (`ebdiff info`): parameters and MACs, exact,
counted on the meta device (shapes without memory or arithmetic)."""

from __future__ import annotations

import torch

from ..backbones import backbone_of_preset, build_model, count_macs_params, preset_names
from ..errors import ConfigError
from ..evaluate.report import count_text
from ..pruning.engine import PruningEngine, SizeOnly, prune


def size_rows(preset: str | None = None, ratios: list[float] | None = None, round_channels: int = 1) -> list[dict]:
    """One row per preset (`preset`, or every preset) and per pruning ratio: params, MACs and, for a ticket,
    its share of the dense model's. round_channels: the tickets' surviving channels rounded to multiples of it."""
    presets = [preset] if preset else list(preset_names())
    for r in ratios or []:
        if not 0 < r < 1:
            raise ConfigError(f"--ratio must be in (0, 1); got {r}")
    if preset and preset not in preset_names():
        raise ConfigError(f"unknown model preset '{preset}' (known: {', '.join(preset_names())})")
    if round_channels < 1:
        raise ConfigError("--round must be >= 1 (1 = the paper's ticket sizes)")
    rows = []
    for name in presets:
        # on the meta device: shapes without memory or arithmetic (the 400M-parameter LDM in seconds). The
        # counts are exact, and so are a ticket's: how many channels each group loses (the ratio rule) fixes
        # its size, whichever channels they are
        with torch.device("meta"):
            model = build_model(name)
        dense = size_row(name, None, model, None)
        rows.append(dense)
        if ratios:
            eng = PruningEngine(model)
            for r in ratios:
                small = prune(model, SizeOnly(), r, multiple=round_channels, engine=eng).model
                rows.append({**size_row(name, r, small, dense),
                             "round_channels": round_channels})
        del model
    return rows


def size_row(name: str, ratio: float | None, model, dense: dict | None) -> dict:
    """`ebdiff info`'s row of a model: params and MACs (one image, or one latent with its class); for a latent
    preset also the paper's convention (UNet params without the class table, MACs of 6 latents)."""
    macs, params = count_macs_params(model)
    row = {"preset": name, "params": params, "macs": macs, "ratio": ratio}
    row.update(backbone_of_preset(name).paper_count(model, macs))  # the paper's convention, where it differs
    if dense is not None:
        row.update(params_ratio=params / dense["params"], macs_ratio=macs / dense["macs"])
    return row


def format_sizes(rows: list[dict]) -> str:
    """The rows as `ebdiff info` prints them; latent UNet presets also in the LDM paper's convention (Table 6),
    DiT presets in the DiT paper's."""
    w = max([16] + [len(r["preset"]) for r in rows])
    lines = [f"{'preset':<{w}} {'ratio':>6} {'params':>10} {'MACs':>10} {'MACs x':>8}"]
    for r in rows:
        mx = "" if r["ratio"] is None else f"{1 / r['macs_ratio']:.2f}x"
        lines.append(f"{r['preset']:<{w}} {_ratio_text(r):>6} {count_text(r['params']):>10} "
                     f"{count_text(r['macs']):>10} {mx:>8}")
    lines += _convention_table(
        [r for r in rows if "paper_params" in r], w,
        "DiT presets, the DiT paper's convention: one timestep/class embedder (diffusers' class has one per block)\n"
        "and the multiply-adds of one latent with the attention products q k^T and attention x v (the counter "
        "above sees neither):", [("params", "paper_params", 10), ("MACs", "paper_macs", 10)])
    lines += _convention_table(
        [r for r in rows if "macs_batch6" in r], w,
        "Latent presets, the paper's convention (Table 6): the UNet's parameters without the class-embedding table, "
        "and the MACs of a batch of 6 latents, as Diff-Pruning's prune_ldm.py counts them:",
        [("UNet params", "unet_params", 12), ("MACs/latent", "macs", 12), ("MACs x 6", "macs_batch6", 10)],
        "(one latent of the preset's size with its class; torch-pruning 1.6 counts GroupNorm and LayerNorm MACs, the "
        "paper's older counter did not: ldm-imagenet256's 599.17G here vs the paper's 598.8G)")
    return "\n".join(lines)


def _ratio_text(row: dict) -> str:
    return "dense" if row["ratio"] is None else f"{row['ratio']:.3f}".rstrip("0")


def _convention_table(rows: list[dict], w: int, title: str, columns: list[tuple[str, str, int]],
                      note: str | None = None) -> list[str]:
    """The lines of a table of `rows` in a paper's counting convention: (header, row key, width) per column."""
    if not rows:
        return []
    lines = ["\n" + title, f"{'preset':<{w}} {'ratio':>6} " + " ".join(f"{h:>{n}}" for h, _, n in columns)]
    for r in rows:
        lines.append(f"{r['preset']:<{w}} {_ratio_text(r):>6} "
                     + " ".join(f"{count_text(r[k]):>{n}}" for _, k, n in columns))
    return lines + ([note] if note else [])
