"""Where the GPU step's `direct_copy_kernel_cuda` copies come from, without a GPU (issue 14, item 4).

Traces the compiled training step's forward and backward the way inductor receives them (AOTAutograd
with inductor's decompositions and min-cut partitioner, bf16 autocast, channels_last parameters and
inputs) on the CPU, with mkldnn off so that CPU convolutions choose their memory format by the same rule
as cuDNN (input or weight channels_last -> channels_last). Then, for every convolution and convolution
backward, it replays what PyTorch's cuDNN path does with the traced strides (aten/src/ATen/native/
Convolution.cpp and cudnn/ConvShared.cpp):

  forward   input.contiguous(fmt), weight.contiguous(fmt)       fmt = cudnn_conv_suggest_memory_format
  backward  input.contiguous(fmt)                                (when the weight gradient is needed)
            grad_output.to(input.suggest_memory_format())
            grad_output.contiguous(fmt'), weight.contiguous(fmt') (data gradient), input/grad_output (weight gradient)

Each `.contiguous`/`.to` that has to move data is one copy kernel outside Triton. With inductor's layout
optimisation off, inductor keeps every convolution input at exactly these traced strides (graph.py:
`need_fixed_layout`), so the count is what the GPU step launches. It also prints inductor's heuristic
(`GraphLowering.decide_layout_opt`, GPU branch) and why it refuses channels_last for this model.

    python benchmarks/layout_copies.py [--preset cifar10] [--batch 2] [--fp32] [--nocl] [--json F]
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import sys

import torch
from torch._functorch.aot_autograd import aot_function
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.decomposition import select_decomp_table
from torch._prims_common import suggest_memory_format

from ebdiff.backbones import build_model
from ebdiff.core.diffusion import DiffusionLoss, Schedule

CL, NCHW = torch.channels_last, torch.contiguous_format


def cudnn_format(a: torch.Tensor, b: torch.Tensor) -> torch.memory_format:
    """cudnn_conv_suggest_memory_format: channels_last when either tensor suggests it (4-D)."""
    return CL if CL in (suggest_memory_format(a), suggest_memory_format(b)) else NCHW


def layout(v) -> str:
    if not isinstance(v, torch.Tensor) or v.ndim != 4:
        return "-"
    a, b = v.is_contiguous(), v.is_contiguous(memory_format=CL)
    return "both" if a and b else ("nchw" if a else ("nhwc" if b else "strided"))


def trace(preset: str, batch: int, bf16: bool, cl: bool):
    """(forward graph, backward graph) as inductor would receive them."""
    torch.backends.mkldnn.enabled = False  # CPU convolutions then pick formats like cuDNN (thnn rule)
    model = build_model(preset, dropout=0.1).train()
    names = [n for n, _ in model.named_parameters()]
    bnames = [n for n, _ in model.named_buffers()]
    params = []
    for _, p in model.named_parameters():
        q = p.detach().clone()
        if cl and q.ndim == 4:
            q = q.contiguous(memory_format=CL)
        params.append(q.requires_grad_(True))
    bufs = [b for _, b in model.named_buffers()]
    loss = DiffusionLoss(Schedule.linear())
    c, s = model.config.in_channels, model.config.sample_size
    x0, noise = torch.randn(batch, c, s, s), torch.randn(batch, c, s, s)
    if cl:
        x0, noise = x0.contiguous(memory_format=CL), noise.contiguous(memory_format=CL)
    t = torch.randint(0, 1000, (batch,))
    graphs = {}

    def capture(kind):
        def compiler(gm, _inputs):
            graphs[kind] = gm
            return gm
        return compiler

    def step(plist, blist, sab, s1mab, x0, t, noise):
        state = dict(zip(names, plist))
        state.update(zip(bnames, blist))
        obj = copy.copy(loss)
        obj.sqrt_ab, obj.sqrt_1mab = sab, s1mab  # inputs, not constants, for AOTAutograd
        return obj(lambda xt, tt: torch.func.functional_call(model, state, (xt, tt)).sample, x0, noise, t)

    f = aot_function(step, fw_compiler=capture("fw"), bw_compiler=capture("bw"),
                     partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
    if bf16:  # autocast around the whole traced call (AOTAutograd refuses autocast changes inside it)
        torch.set_autocast_enabled("cpu", True)
        torch.set_autocast_dtype("cpu", torch.bfloat16)
        torch.set_autocast_cache_enabled(False)
    try:
        f(params, bufs, loss.sqrt_ab, loss.sqrt_1mab, x0, t, noise).backward()
    finally:
        torch.set_autocast_enabled("cpu", False)
    return graphs["fw"], graphs["bw"]


def count_copies(fw, bw) -> tuple[dict, dict]:
    copies, shapes = collections.Counter(), collections.Counter()
    for n in fw.graph.nodes:
        if n.target is torch.ops.aten.convolution.default:
            x, w = n.args[0].meta["val"], n.args[1].meta["val"]
            fmt = cudnn_format(x, w)
            copies["forward: input.contiguous(fmt)"] += not x.is_contiguous(memory_format=fmt)
            copies["forward: weight.contiguous(fmt)"] += not w.is_contiguous(memory_format=fmt)
            shapes[f"fw conv in={layout(x)} w={layout(w)} k={tuple(w.shape[2:])}"] += 1
    for n in bw.graph.nodes:
        if n.target is torch.ops.aten.convolution_backward.default:
            go, x, w = (a.meta["val"] for a in n.args[:3])
            mask = n.args[-1]
            xc = x
            if mask[1] and not x.is_contiguous(memory_format=cudnn_format(x, w)):
                copies["backward: input.contiguous(fmt)"] += 1
                xc = x.contiguous(memory_format=cudnn_format(x, w))
            goc = go
            if suggest_memory_format(go) != suggest_memory_format(xc):
                copies["backward: grad_output.to(input.suggest_memory_format())"] += 1
                goc = go.contiguous(memory_format=suggest_memory_format(xc))
            if mask[0]:
                fmt = cudnn_format(goc, w)
                copies["backward (data grad): grad_output.contiguous(fmt)"] += not goc.is_contiguous(memory_format=fmt)
                copies["backward (data grad): weight.contiguous(fmt)"] += not w.is_contiguous(memory_format=fmt)
            if mask[1]:
                fmt = cudnn_format(xc, goc)
                copies["backward (weight grad): grad_output.contiguous(fmt)"] += not goc.is_contiguous(memory_format=fmt)
                copies["backward (weight grad): input.contiguous(fmt)"] += not xc.is_contiguous(memory_format=fmt)
            shapes[f"bw conv go={layout(go)} in={layout(x)} w={layout(w)} k={tuple(w.shape[2:])}"] += 1
    return dict(copies), dict(shapes)


def layout_heuristic(fw) -> dict:
    from torch._inductor.graph import GraphLowering

    convs = [n for n in fw.graph.nodes if n.target is torch.ops.aten.convolution.default]

    def w(n):
        return n.args[1].meta["val"]

    in_out = [tuple(w(n).shape) for n in convs if w(n).size(0) * 2 <= w(n).size(1) and w(n).size(2) > 1]
    return {"convolutions": len(convs), "in_ge_2x_out_and_k_gt_1": len(in_out), "examples": sorted(set(in_out)),
            "decide_layout_opt": GraphLowering.decide_layout_opt(fw, is_inference=False)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cifar10")
    ap.add_argument("--batch", type=int, default=2, help="layouts do not depend on it; 2 keeps the trace fast")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--nocl", action="store_true", help="NCHW parameters and inputs (no channels_last)")
    ap.add_argument("--json")
    args = ap.parse_args()
    fw, bw = trace(args.preset, args.batch, not args.fp32, not args.nocl)
    copies, shapes = count_copies(fw, bw)
    heur = layout_heuristic(fw)
    out = {"preset": args.preset, "bf16": not args.fp32, "channels_last": not args.nocl, "torch": torch.__version__,
           "copies": copies, "copies_total": sum(copies.values()), "convolutions": shapes, "layout_heuristic": heur}
    print(f"{args.preset}, bf16={not args.fp32}, channels_last={not args.nocl}: "
          f"{out['copies_total']} layout copies per step outside Triton")
    for k, v in copies.items():
        print(f"  {v:4d}  {k}")
    print("convolutions by traced layout:")
    for k, v in sorted(shapes.items(), key=lambda kv: -kv[1]):
        print(f"  {v:4d}  {k}")
    print(f"inductor's layout optimisation: decide_layout_opt = {heur['decide_layout_opt']} "
          f"({heur['in_ge_2x_out_and_k_gt_1']} of {heur['convolutions']} convolutions have in >= 2 x out channels "
          f"and k > 1, e.g. {heur['examples'][:2]}: 'Skip layout opt because some convolutions have smaller "
          "out_channel')")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
