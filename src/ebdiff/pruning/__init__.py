"""Structured pruning: the only door to torch-pruning.

`engine` traces a model once (`PruningEngine`), scores its channel groups with a registered `Criterion`
(magnitude, Taylor, Diff-Pruning, random), turns scores into a `ChannelMask` at a ratio, and cuts a
physically smaller copy (`prune`, `cut`, `extract`); a `Plan` replays the cut onto a fresh model
(`apply_plan`) so that checkpoints are plain safetensors. What must stay consistent inside a model
family (attention heads, paired channels, layers left whole) is asked of its backbone.
"""
