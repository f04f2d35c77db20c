"""Every bad input we could think of, fed to the CLI: does each end in one clear line, non-zero, with
nothing half-written? Writes a Markdown table (input, exit code, the line the user sees, traceback?).

    python benchmarks/bad_inputs_sweep.py --out benchmarks/results/bad_inputs   (~3 min on 2 cores)
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.preset=tiny", "data.limit=256", "train.batch_size=8", "train.device=cpu", "train.progress=false",
        "train.log_every=2", "train.ckpt_every=2", "sample.steps=3"]


def ebdiff(*args: str, cwd: Path) -> tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    p = subprocess.run([sys.executable, "-m", "ebdiff.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=600)
    return p.returncode, p.stderr


def _hostile_folders(w: Path, good: Path) -> dict[str, Path]:
    """Exports and runs from others that point outside themselves or carry bad plans, an image folder with an
    unreadable file, and (with the datasets package) a saved Hugging Face dataset."""
    import json

    rc, err = ebdiff("export", str(good), "--out", str(w / "export"), cwd=ROOT)
    assert rc == 0, err
    made = {}

    def edit(name: str, file: str, change) -> None:
        shutil.copytree(w / "export", w / name)
        p = w / name / file
        p.write_text(json.dumps(change(json.loads(p.read_text()))))
        made[name] = w / name

    edit("member", "ebdiff.json", lambda m: dict(m, members=["../../other-run/checkpoints/ckpt-8"]))
    edit("range", "unet/plan.json", lambda m: dict(m, plan=[["conv_in", [0, 9999]]]))
    edit("unsorted", "unet/plan.json", lambda m: dict(m, plan=[["conv_in", [3, 1]]]))
    edit("group", "unet/plan.json", lambda m: dict(m, plan=[["no.such.block", [0]]]))
    shutil.copytree(w / "export", w / "link")
    weights = w / "link" / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.move(weights, w / "elsewhere.safetensors")
    weights.symlink_to(w / "elsewhere.safetensors")
    made["link"] = w / "link"
    shutil.copytree(good, w / "regions")
    (w / "regions" / "regions.json").write_text(json.dumps({"format": 1, "T": 1000, "route": "higher-noise",
                                                            "regions": [{"t": [0, 999], "ratio": 0.5}],
                                                            "members": ["../../elsewhere"]}))
    made["regions"] = w / "regions"
    from PIL import Image

    (w / "images" / "a").mkdir(parents=True)
    for i in range(12):
        Image.fromarray(np.full((40, 40, 3), i * 20, np.uint8)).save(w / "images" / "a" / f"{i:02d}.png")
    (w / "images" / "a" / "05.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    made["images"] = w / "images"
    try:
        import datasets
    except ImportError:
        return made
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": [Image.new("L", (28, 28)) for _ in range(8)], "label": [0, 1] * 4},
                                    features=feats)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(w / "hf"))
    made["hf"] = w / "hf"
    return made


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", help="run only the cases whose name contains this")
    args = ap.parse_args()
    out, only = Path(args.out), args.only
    out.mkdir(parents=True, exist_ok=True)
    w = Path(tempfile.mkdtemp(prefix="ebdiff-bad-"))
    good = w / "good"
    rc, err = ebdiff("train", "--out", str(good), *TINY, "train.iters=4", cwd=ROOT)
    assert rc == 0, err
    (w / "file").write_text("x")
    (w / "bin.yaml").write_bytes(bytes(range(256)) * 8)
    (w / "empty.yaml").write_text("")
    (w / "list.yaml").write_text("- a\n- b\n")
    (w / "badkey.yaml").write_text("train: {iters: 10, lr: 1e-4, bogus: 1}\n")
    fm = w / "fm-trunc"
    fm.mkdir()
    src = Path("/usr/share/datasets/fashion-mnist")
    for n in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        d = (src / n).read_bytes()
        (fm / n).write_bytes(d[: len(d) // 3] if "images" in n else d)
    fm2 = w / "fm-notgz"
    fm2.mkdir()
    (fm2 / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip")
    shutil.copy(src / "train-labels-idx1-ubyte.gz", fm2)
    fm3 = w / "fm-notidx"
    fm3.mkdir()
    with gzip.open(fm3 / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x01\x02\x03\x04garbage")
    shutil.copy(src / "train-labels-idx1-ubyte.gz", fm3)
    noct = w / "nockpt"
    noct.mkdir()
    shutil.copy(good / "config.yaml", noct / "config.yaml")
    badmeta = w / "badmeta"
    shutil.copytree(good, badmeta)
    for ck in (badmeta / "checkpoints").iterdir():  # every one: --resume falls back to an older one that reads
        (ck / "meta.json").write_text("{not json")
    badstate = w / "badstate"
    shutil.copytree(good, badstate)
    for ck in (badstate / "checkpoints").iterdir():
        (ck / "state.pt").write_bytes(b"PK\x03\x04 truncated")
    badcfg = w / "badcfg"
    shutil.copytree(good, badcfg)
    (badcfg / "config.yaml").write_text("model: [")
    (w / "emptydir").mkdir()
    ro = w / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    outside = _hostile_folders(w, good)
    cache = Path(tempfile.mkdtemp(prefix="ebdiff-bad-cache-"))  # the image check's record: kept by design
    cases = [
        ("--out is an existing file", ["train", "--out", str(w / "file"), *TINY, "train.iters=2"]),
        *([("--out inside a read-only folder", ["train", "--out", str(ro / "run"), *TINY, "train.iters=2"])]
          if os.geteuid() != 0 else []),  # root writes into read-only folders anyway
        ("binary --config", ["train", "--config", str(w / "bin.yaml"), "--out", str(w / "x1")]),
        ("empty --config", ["train", "--config", str(w / "empty.yaml"), "--out", str(w / "x2")]),
        ("--config is a YAML list", ["train", "--config", str(w / "list.yaml"), "--out", str(w / "x3")]),
        ("--config with an unknown key", ["train", "--config", str(w / "badkey.yaml"), "--out", str(w / "x4")]),
        ("missing --config", ["train", "--config", str(w / "nope.yaml")]),
        ("override without '='", ["train", "--out", str(w / "x5"), "train.iters"]),
        ("unknown override key", ["train", "--out", str(w / "x5"), "train.itres=3"]),
        ("train.lr=nan", ["train", "--out", str(w / "x6"), *TINY, "train.lr=nan"]),
        ("train.lr=inf", ["train", "--out", str(w / "x6"), *TINY, "train.lr=.inf"]),
        ("Adam betas out of range", ["train", "--out", str(w / "x6"), *TINY, "train.adam_betas=[0.9,1.5]"]),
        ("negative weight decay", ["train", "--out", str(w / "x6"), *TINY, "train.weight_decay=-1"]),
        ("model.dropout=2", ["train", "--out", str(w / "x6"), *TINY, "model.dropout=2"]),
        ("data.image_size=30 (not a multiple of 4)", ["train", "--out", str(w / "x6"), *TINY, "data.image_size=30"]),
        ("train.iters=0", ["train", "--out", str(w / "x6"), *TINY, "train.iters=0"]),
        ("train.batch_size larger than the data", ["train", "--out", str(w / "x6"), *TINY, "data.limit=4"]),
        ("truncated Fashion-MNIST .gz", ["train", "--out", str(w / "x7"), *TINY, f"data.root={fm}", "train.iters=2"]),
        ("Fashion-MNIST .gz that is not gzip", ["train", "--out", str(w / "x7"), *TINY, f"data.root={fm2}"]),
        ("Fashion-MNIST .gz that is not IDX", ["train", "--out", str(w / "x7"), *TINY, f"data.root={fm3}"]),
        ("missing dataset", ["train", "--out", str(w / "x7"), *TINY, f"data.root={w / 'nowhere'}", "data.download=false"]),
        ("ta-eb with a missing dataset", ["ta-eb", "--config", "configs/demo_taeb.yaml", "--out", str(w / "x8"), *TINY,
                                          f"data.root={w / 'nowhere'}", "data.download=false"]),
        ("ta-eb with a gap between regions", ["ta-eb", "--out", str(w / "x8"), *TINY,
                                              "regions=[{t: [0, 100], ratio: 0.3}, {t: [200, 999], ratio: 0.5}]"]),
        ("--resume of a folder that does not exist", ["train", "--resume", str(w / "nope")]),
        ("--resume with a corrupt meta.json", ["train", "--resume", str(badmeta), "train.iters=6"]),
        ("--resume with a corrupt state.pt", ["train", "--resume", str(badstate), "train.iters=6"]),
        ("--resume with a broken config.yaml", ["train", "--resume", str(badcfg), "train.iters=6"]),
        ("--resume with another model.preset", ["train", "--resume", str(good), "model.preset=fmnist"]),
        ("train --out an existing run", ["train", "--out", str(good), *TINY, "train.iters=2"]),
        ("sample --batch-size 0", ["sample", str(good), "--batch-size", "0"]),
        ("sample --n 0", ["sample", str(good), "--n", "0"]),
        ("sample --steps 5000", ["sample", str(good), "--steps", "5000"]),
        ("sample --eta -1", ["sample", str(good), "--eta", "-1"]),
        ("sample a folder that is no run", ["sample", str(w)]),
        ("sample a run with a corrupt meta.json", ["sample", str(badmeta)]),
        ("eval a run without a checkpoint", ["eval", str(noct), "--n", "8"]),
        ("eval --n 1", ["eval", str(good), "--n", "1"]),
        ("eval --metric fid without Inception weights", ["eval", str(good), "--n", "8", "--metric", "fid",
                                                         "--inception-weights", str(w / "none.pth")]),
        ("report of a folder that is no run", ["report", str(w / "file")]),
        ("experiment file missing", ["experiment", str(w / "nope.yaml")]),
        ("experiment file that is empty", ["experiment", str(w / "empty.yaml")]),
        ("info --preset nope", ["info", "--preset", "nope"]),
        ("info --ratio 1.5", ["info", "--preset", "tiny", "--ratio", "1.5"]),
        ("bench --ratios 1.5", ["bench", "--preset", "tiny", "--ratios", "1.5"]),
        ("bench --modes fast on the CPU", ["bench", "--preset", "tiny", "--modes", "fast", "--device", "cpu"]),
        ("train.device=cuda without a GPU", ["train", "--out", str(w / "x9"), *TINY, "train.device=cuda"]),
        # issues 14-17: options added since the first sweep
        ("--resume a folder with no run below it", ["train", "--resume", str(w / "emptydir")]),
        ("train.grad_accum not dividing the batch", ["train", "--out", str(w / "x9"), *TINY, "train.grad_accum=3"]),
        ("train.log_with=wandbx", ["train", "--out", str(w / "x9"), *TINY, "train.log_with=wandbx"]),
        ("train.eval_every=abc", ["train", "--out", str(w / "x9"), *TINY, "train.eval_every=abc"]),
        ("train.eval_n=1", ["train", "--out", str(w / "x9"), *TINY, "train.eval_every=2", "train.eval_n=1"]),
        ("train.max_seconds=0", ["train", "--out", str(w / "x9"), *TINY, "train.max_seconds=0"]),
        ("early_bird.round_channels=0", ["train", "--out", str(w / "x9"), *TINY, "early_bird.ratio=0.5",
                                         "early_bird.round_channels=0"]),
        ("model.class_dropout on an unconditional model", ["train", "--out", str(w / "x9"), *TINY,
                                                           "model.class_dropout=0.1"]),
        ("model.autoencoder on a pixel preset", ["train", "--out", str(w / "x9"), *TINY, "model.autoencoder=/x"]),
        ("latent preset with a missing autoencoder folder", ["train", "--out", str(w / "x9"), *TINY,
                                                             "model.preset=ldm-tiny", f"model.autoencoder={w / 'noae'}"]),
        ("encode a pixel preset", ["encode", *TINY]),
        ("sample --class on an unconditional run", ["sample", str(good), "--class", "3", "--out", str(w / "s.png")]),
        ("sample --guidance -1", ["sample", str(good), "--guidance", "-1", "--out", str(w / "s.png")]),
        ("sample --scheduler nope", ["sample", str(good), "--scheduler", "nope", "--out", str(w / "s.png")]),
        ("export --out an existing file", ["export", str(good), "--out", str(w / "file")]),
        ("export a folder that is no run", ["export", str(w / "emptydir"), "--out", str(w / "exp")]),
        ("report --target without evaluation points", ["report", str(good), "--target", "30", "--out", str(w / "rep")]),
        ("demo --compare --latent", ["demo", "--compare", "--latent", "--out", str(w / "demo")]),
        ("info --round 0", ["info", "--preset", "tiny", "--ratio", "0.5", "--round", "0"]),
        # deploying and feeding: model files, folders from others, damaged checkpoints, bad images, hf datasets
        ("export --format tflite", ["export", str(good), "--out", str(w / "exp"), "--format", "tflite"]),
        ("sample an export whose ebdiff.json member leads outside", ["sample", str(outside["member"]),
                                                                     "--out", str(w / "s.png")]),
        ("sample an export whose weights are a link outside", ["sample", str(outside["link"]), "--out", str(w / "s.png")]),
        ("sample an export whose plan's channels are out of range", ["sample", str(outside["range"]),
                                                                     "--out", str(w / "s.png")]),
        ("sample an export whose plan's channels are unsorted", ["sample", str(outside["unsorted"]),
                                                                 "--out", str(w / "s.png")]),
        ("sample an export whose plan names an unknown group", ["sample", str(outside["group"]),
                                                                "--out", str(w / "s.png")]),
        ("sample a TA-EB run whose regions.json member leads outside", ["sample", str(outside["regions"]),
                                                                        "--out", str(w / "s.png")]),
        ("--resume naming a damaged checkpoint", ["train", "--resume",
                                                  str(sorted((badstate / "checkpoints").iterdir())[-1])]),
        ("image folder with an unreadable image", ["train", "--out", str(w / "x10"), *TINY, "model.preset=cifar10",
                                                   "data.name=imagefolder", f"data.root={outside['images']}",
                                                   f"data.cache_dir={cache}"]),
        ("data.name=hf with a hub name", ["train", "--out", str(w / "x10"), *TINY, "data.name=hf",
                                          "data.root=zalando-datasets/fashion_mnist"]),
        *([("data.name=hf with a missing image column", ["train", "--out", str(w / "x10"), *TINY, "data.name=hf",
                                                         f"data.root={outside['hf']}", "data.image_column=picture"]),
           ("data.name=hf with a non-image column", ["train", "--out", str(w / "x10"), *TINY, "data.name=hf",
                                                     f"data.root={outside['hf']}", "data.image_column=label"]),
           ("data.name=hf with a missing split", ["train", "--out", str(w / "x10"), *TINY, "data.name=hf",
                                                  f"data.root={outside['hf']}", "data.split=validation"])]
          if "hf" in outside else []),
    ]
    if only:
        cases = [c for c in cases if only in c[0]]
    rows = []
    for name, args in cases:
        before = {p.name for p in w.iterdir()}
        rc, err = ebdiff(*args, cwd=ROOT)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        tb = any("Traceback" in ln for ln in lines)
        shown = next((ln for ln in lines if ln.startswith("ebdiff: error:")), lines[-1] if lines else "")
        left = sorted({p.name for p in w.iterdir()} - before)
        rows.append((name, rc, shown.replace("|", "\\|").replace(str(w), "W"), tb, left))
        print(f"{rc:>3} {'TRACEBACK ' if tb else ''}{name}: {shown[:140]}", flush=True)
    ok = sum(1 for _, rc, s, tb, left in rows if rc != 0 and not tb and s.startswith("ebdiff: error:") and not left)
    lines = [f"# Bad inputs: {ok} of {len(rows)} end in one `ebdiff: error:` line, non-zero, nothing left behind",
             "", "W = a scratch folder. Command: `python benchmarks/bad_inputs_sweep.py --out DIR` (2-core CPU).", "",
             "| input | exit | what the user sees | traceback | new files left |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {rc} | {s} | {'yes' if tb else 'no'} | {', '.join(left) or '-'} |" for n, rc, s, tb, left in rows]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    ro.chmod(0o700)
    shutil.rmtree(w, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    print(f"{ok}/{len(rows)} one-line errors; table: {out / 'README.md'}")


if __name__ == "__main__":
    main()
