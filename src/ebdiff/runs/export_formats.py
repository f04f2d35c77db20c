"""Model files that run without ebdiff: ONNX (for onnxruntime) and torch.export's `.pt2` (for
`torch.export.load`), written by `interop.export` into each member folder beside its safetensors.

Each file is the member's eps model, `eps = f(sample, timestep)` (plus `class_labels` for a
class-conditional model), float32 on the CPU, with a dynamic batch size: `sample` is (B, C, H, W),
`timestep` and `class_labels` are int64 of shape (B,). A ticket's file holds its pruned widths, so nothing
needs the pruning plan to run it. A TA-EB export writes one file per region, and the manifest's
`switch_points` route a timestep t to member `sum(t >= s for s in switch_points)`.

ONNX goes through torch's TorchScript exporter (`dynamo=False`, deprecated since torch 2.9 but kept):
it needs only the `onnx` package and writes the tiny preset in 1.8 s on 2 CPU cores, where the
torch.export-based exporter (`dynamo=True`) needs onnxscript as well and takes 8.2 s for a file that
agrees as closely with torch (both within 4e-6).
`torch.export` guards the batch size on two branches of diffusers' `Upsample2D.forward` (a
`.contiguous()` at batch >= 64 and past 2**31 elements, no-ops for the contiguous float tensors here),
which would bound the batch to 2..63 (and make the TorchScript tracer warn that it froze them); while
exporting, that method runs with the `.contiguous()` taken unconditionally, so the files take any batch
size from 1.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones import backbone_of, eps_call, example_inputs, model_classes
from ..errors import ConfigError

FOLDER = "folder"  # today's model folder, always written
FILES = {"onnx": "model.onnx", "torch-export": "model.pt2"}  # format -> file name inside a member folder
FORMATS = (FOLDER, *FILES)
NEEDS = {"onnx": ("onnx",), "torch-export": ()}  # modules a format's writer imports
ONNX_OPSET = 17
MAX_BATCH = 1 << 16  # torch.export's upper bound of the batch dimension


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """The extra file formats asked for (beyond the folder), or ConfigError for an unknown one or a missing
    exporter package. Runs before anything is written."""
    extra = []
    for f in formats:
        if f not in FORMATS:
            raise ConfigError(f"unknown export format '{f}' (known: {', '.join(FORMATS)})")
        missing = [m for m in NEEDS.get(f, ()) if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"--format {f} needs the {', '.join(missing)} package: pip install 'ebdiff[export]'")
        if f != FOLDER and f not in extra:
            extra.append(f)
    return tuple(extra)


class EpsModule(nn.Module):
    """A model as a plain tensor function: forward(sample, timestep[, class_labels]) -> eps, through its
    backbone's eps call (`Backbone.eps`)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self._eps = eps_call(unet)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None):
        return self._eps(self.unet, sample, timestep, class_labels)


def input_names(model: nn.Module) -> list[str]:
    return ["sample", "timestep"] + (["class_labels"] if model_classes(model) is not None else [])


def _inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """Example inputs of batch 2 (batch 1 would be specialised by the tracers) on the CPU, varied timesteps."""
    ex = example_inputs(model, batch=2)  # under the model's own argument names (a DiT's: hidden_states, ...)
    sample = ex.get("sample", ex.get("hidden_states"))
    labels = (torch.zeros(2, dtype=torch.long),) if model_classes(model) is not None else ()
    return sample, torch.tensor([3, 900]), *labels


def write_onnx(model: nn.Module, path: Path) -> None:
    names = input_names(model)
    axes = {n: {0: "batch"} for n in [*names, "eps"]}
    with _batch_free_upsampling(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Constant folding")  # the exporter's note on Slice steps
        torch.onnx.export(EpsModule(model).eval(), _inputs(model), str(path), input_names=names,
                          output_names=["eps"], dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)


def _upsample_forward(self, hidden_states, output_size=None, *args, **kwargs):
    """diffusers' `Upsample2D.forward` for the UNets here (nearest x2 then a conv; no norm, no transposed
    conv) with its batch-size-dependent `.contiguous()` taken always: what `torch.export` traces."""
    if self.norm is not None or self.use_conv_transpose or not self.interpolate or output_size is not None:
        return _upsample_forward.original(self, hidden_states, output_size, *args, **kwargs)
    hidden_states = F.interpolate(hidden_states.contiguous(), scale_factor=2.0, mode="nearest")
    if self.use_conv:
        hidden_states = self.conv(hidden_states) if self.name == "conv" else self.Conv2d_0(hidden_states)
    return hidden_states


@contextlib.contextmanager
def _batch_free_upsampling():
    from diffusers.models.upsampling import Upsample2D

    _upsample_forward.original = Upsample2D.forward
    Upsample2D.forward = _upsample_forward
    try:
        yield
    finally:
        Upsample2D.forward = _upsample_forward.original


def write_pt2(model: nn.Module, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    shapes = {n: {0: batch} for n in input_names(model)}
    with _batch_free_upsampling(), torch.no_grad():
        prog = torch.export.export(EpsModule(model).eval(), _inputs(model), dynamic_shapes=shapes)
    torch.export.save(prog, str(path))


WRITERS = {"onnx": write_onnx, "torch-export": write_pt2}


def write_files(folder: Path, model: nn.Module, formats: Sequence[str]) -> None:
    """Write each format's file of one member into `folder` (named by `FILES`). The model is exported as
    float32 on the CPU, in eval mode, and left as it was."""
    if not formats:
        return
    was_training = model.training
    param = next(model.parameters())
    moved = (param.dtype, param.device) != (torch.float32, torch.device("cpu"))
    if moved:
        model.to(device="cpu", dtype=torch.float32)
    try:
        for f in formats:
            WRITERS[f](model.eval(), Path(folder) / FILES[f])
    finally:
        if moved:
            model.to(device=param.device, dtype=param.dtype)
        model.train(was_training)


def card_lines(name: str, members: Sequence[str], formats: Sequence[str], shape: Sequence[int],
               classes: int | None, latent: bool) -> list[str]:
    """The model card's section on the files of `formats` (pure): the few lines that sample with each,
    using diffusers' DDIMScheduler from the export's `scheduler/` folder and no ebdiff."""
    if not formats:
        return []
    c, h, w = shape
    ta = len(members) > 1
    pick = ("k = sum(int(t) >= s for s in switch)  # the region of t\n    " if ta else "")
    cond = ", 'class_labels': labels" if classes is not None else ""
    head = ["import json, numpy as np, torch", "from diffusers import DDIMScheduler", "",
            f"sched = DDIMScheduler.from_pretrained('{name}', subfolder='scheduler')", "sched.set_timesteps(50)"]
    if ta:
        head.append(f"man = json.load(open('{name}/ebdiff.json'))")
        head.append("members, switch = man['members'], man['switch_points']")
    if classes is not None:
        head.append(f"labels = np.arange(16, dtype=np.int64) % {classes}  # class {classes}: the null class")
    lines = ["", "## Without ebdiff", "",
             f"Each model file takes `sample` (B, {c}, {h}, {w}) float32 and `timestep` (B,) int64"
             + (", `class_labels` (B,) int64" if classes is not None else "")
             + " for any batch size B and returns the predicted noise"
             + ("; `ebdiff.json`'s `switch_points` route a timestep to its region's file" if ta else "")
             + ("; the samples are latents, which the run's autoencoder decodes" if latent else "") + "."]
    if "onnx" in formats:
        sess = (f"sess = {{m: ort.InferenceSession(f'{name}/{{m}}/{FILES['onnx']}') for m in members}}" if ta
                else f"sess = ort.InferenceSession('{name}/{members[0]}/{FILES['onnx']}')")
        run = "sess[members[k]]" if ta else "sess"
        lines += ["", "ONNX (`pip install onnxruntime diffusers`):", "", "```python", *head,
                  "import onnxruntime as ort", sess,
                  f"x = np.random.default_rng(0).standard_normal((16, {c}, {h}, {w})).astype(np.float32)",
                  "for t in sched.timesteps:",
                  f"    {pick}eps = {run}.run(None, {{'sample': x, "
                  f"'timestep': np.full(len(x), int(t), np.int64){cond}}})[0]",
                  "    x = sched.step(torch.from_numpy(eps), t, torch.from_numpy(x)).prev_sample.numpy()", "```"]
    if "torch-export" in formats:
        pt2 = FILES["torch-export"]
        progs = (f"eps_of = {{m: torch.export.load(f'{name}/{{m}}/{pt2}').module() for m in members}}" if ta
                 else f"eps_of = torch.export.load('{name}/{members[0]}/{pt2}').module()")
        fn = "eps_of[members[k]]" if ta else "eps_of"
        targs = ", torch.from_numpy(labels)" if classes is not None else ""
        lines += ["", "torch.export (`.pt2`, `pip install torch diffusers`):", "", "```python", *head, progs,
                  f"x = torch.randn(16, {c}, {h}, {w}, generator=torch.Generator().manual_seed(0))",
                  "with torch.no_grad():", "  for t in sched.timesteps:",
                  f"    {pick}eps = {fn}(x, torch.full((len(x),), int(t)){targs})",
                  "    x = sched.step(eps, t, x).prev_sample", "```"]
    return lines


def manifest_entries(got, members: Sequence[str], formats: Sequence[str]) -> dict:
    """The manifest's keys for the files (none without extra formats): each format's paths and, for TA-EB,
    the switch points of its routing. got: `interop.Loaded`."""
    if not formats:
        return {}
    entries: dict = {"files": {f: [f"{m}/{FILES[f]}" for m in members] for f in formats}}
    if got.regions is not None:
        entries["switch_points"] = got.regions.switch_points(got.route)
    return entries


def card(name: str, got, members: Sequence[str], formats: Sequence[str]) -> str:
    """The model card's text on the files (empty without extra formats). got: `interop.Loaded`."""
    m = got.models[0]
    shape = tuple(backbone_of(m).sample_shape(m))
    lines = card_lines(name, members, formats, shape, model_classes(m), bool(got.metas[0].get("latent")))
    return "\n".join(lines) + "\n" if lines else ""
