"""ONNX and torch.export files of a dense model and its 50% ticket: file sizes and CPU sampling time per
image through onnxruntime (and the .pt2 and eager torch beside it), against the MACs ratio.

    PYTHONPATH=src python benchmarks/export_formats.py --presets fmnist cifar10 --out benchmarks/results/export_formats_cpu

The ticket is the magnitude plan at ratio 0.5 (channels rounded to multiples of 8) on freshly initialised
weights: the time of a forward depends on the widths, not on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ebdiff.backbones import build_model, count_macs_params
from ebdiff.pruning.engine import prune
from ebdiff.runs.export_formats import FILES, write_files


def per_image(fn, batch: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / batch


def measure(model, folder: Path, batch: int, repeats: int, threads: int) -> dict:
    import onnxruntime as ort

    folder.mkdir(parents=True)
    write_files(folder, model, list(FILES))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    macs, params = count_macs_params(model)
    c, s = model.config.in_channels, model.config.sample_size
    x = torch.randn(batch, c, s, s, generator=torch.Generator().manual_seed(0))
    t = torch.full((batch,), 500)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(folder / FILES["onnx"]), opts)
    feed = {"sample": x.numpy(), "timestep": t.numpy()}
    prog = torch.export.load(str(folder / FILES["torch-export"])).module()
    with torch.no_grad():
        row = {"params": params, "macs": macs,
               "bytes": {k: os.path.getsize(folder / n) for k, n in
                         (("safetensors", "model.safetensors"), ("onnx", FILES["onnx"]),
                          ("pt2", FILES["torch-export"]))},
               "s_per_image": {"onnxruntime": per_image(lambda: sess.run(None, feed), batch, repeats),
                               "pt2": per_image(lambda: prog(x, t), batch, repeats),
                               "eager": per_image(lambda: model(x, t).sample, batch, repeats)}}
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["fmnist"])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            dense = build_model(preset).eval()
            ticket = prune(dense, "magnitude", args.ratio, multiple=8).model.eval()
            for kind, m in (("dense", dense), (f"ticket {args.ratio}", ticket)):
                row = {"preset": preset, "model": kind, **measure(m, Path(tmp) / f"{preset}-{len(rows)}", args.batch,
                                                                  args.repeats, threads)}
                print(json.dumps(row))
                rows.append(row)
    import onnxruntime

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} threads",
        "load_avg_1min": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "batch": args.batch,
        "repeats": args.repeats, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
