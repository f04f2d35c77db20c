"""`ebdiff demo`: EB-Diff-Train on Fashion-MNIST at demo scale (minutes on a CPU), as library calls.

- `run_demo`: search, extract, train the ticket, sample (latent=True: in the latent space of a small VQ
  autoencoder trained first, class-conditional with classifier-free guidance; backbone="dit": the
  class-conditional `dit-tiny` transformer on the pixels, one grid row per class);
- `run_demo_compare`: dense and Early-Bird trained for the same time each, evaluated during training, the
  report with the quality-vs-time curves and both grids, and one line saying which is better.
"""

from __future__ import annotations

from pathlib import Path

from ..backbones import ModelSpec
from ..config import Config, bundled_configs, load_config
from ..data.datasets import load_dataset
from ..data.latents import train_autoencoder
from ..errors import ConfigError
from ..evaluate.evaluate import sample_run
from ..evaluate.quality_curves import verdict
from ..runs.checkpoint import latest_checkpoint, read_json
from ..training.distributed import resolve_device
from .assemble import train
from .experiment import load_experiment, run_experiment

DEMO_CONFIG = "demo.yaml"  # bundled (config.bundled_configs)
DEMO_COMPARE = "demo_compare.yaml"  # bundled, in experiments/
DEMO_LATENT_CONFIG = "demo_latent.yaml"
# (backbone, latent) -> the bundled config and the default run folder of that demo
DEMOS = {("unet", False): (DEMO_CONFIG, "runs/demo"), ("unet", True): (DEMO_LATENT_CONFIG, "runs/demo-latent"),
         ("dit", False): ("demo_dit.yaml", "runs/demo-dit")}
DEMO_AUTOENCODER_STEPS = 600
DEMO_COMPARE_SECONDS = 60.0


def demo_autoencoder(cfg: Config, folder: Path, log=print) -> None:
    """The latent demo's autoencoder: a small VQ model trained on the demo's images, once (OUT/autoencoder)."""
    if (folder / "config.json").is_file():
        return
    data = load_dataset(cfg.data, ModelSpec.of(cfg.model).image_shape()[1])
    log(f"training the demo's VQ autoencoder (1x32x32 -> 3x8x8) on {len(data)} images -> {folder}")
    r = train_autoencoder(data.images, folder, steps=DEMO_AUTOENCODER_STEPS)
    log(f"autoencoder: {r['steps']} steps in {r['seconds']:.0f} s, reconstruction MSE {r['reconstruction_mse']:.4f}")


def run_demo(out: str | Path | None = None, overrides: list[str] | None = None, latent: bool = False,
             log=print, backbone: str = "unet") -> tuple[dict, dict, Path]:
    """Train the demo (resumed when `out` holds it) and sample it: (training summary, sampling info, out).
    Default out: runs/demo (runs/demo-latent with latent=True, runs/demo-dit with backbone="dit")."""
    if (backbone, latent) not in DEMOS:
        raise ConfigError(f"no {'latent ' if latent else ''}demo for backbone '{backbone}' (demos: "
                          + ", ".join(f"{b}{' --latent' if lat else ''}" for b, lat in DEMOS) + ")")
    name, default_out = DEMOS[backbone, latent]
    out = Path(out or default_out)
    resume = latest_checkpoint(out) is not None
    config = bundled_configs() / name
    cfg = load_config(out / "config.yaml" if resume else config, overrides or [])
    if latent and cfg.model.autoencoder is None:
        cfg.model.autoencoder = str(out / "autoencoder")
        demo_autoencoder(cfg, Path(cfg.model.autoencoder), log)
    summary = train(cfg, out, resume=resume)
    return summary, sample_run(out, None, resolve_device("auto"), n=cfg.sample.n), out


def run_demo_compare(out: str | Path | None = None, seconds: float | None = None,
                     overrides: list[str] | None = None, log=print) -> dict:
    """Dense and Early-Bird for `seconds` of training each (default 60), evaluated every quarter of it:
    {report (report.md), verdict (one line: which reached the better quality in that time), out}."""
    seconds = DEMO_COMPARE_SECONDS if seconds is None else seconds
    if not seconds > 0:
        raise ConfigError(f"--seconds must be positive; got {seconds}")
    extra = [f"train.max_seconds={seconds:g}", f"train.eval_every={seconds / 4:g}s", *(overrides or [])]
    exp = load_experiment(bundled_configs() / "experiments" / DEMO_COMPARE, out=out, extra=extra)
    log(f"ebdiff demo --compare: dense and Early-Bird (magnitude 50%), {seconds:g} s of training each, "
        f"evaluated every {seconds / 4:g} s of training -> {exp.out}")
    rec = run_experiment(exp, device="auto")
    rep = read_json(Path(rec["report"]).parent / "report.json") if rec["report"] else None
    ttq = (rep or {}).get("time_to_quality")
    if not ttq:
        raise ConfigError(f"{exp.out}: no evaluation points were written (train.eval_every)")
    names = [m.name for m in exp.methods]
    methods = {r["name"]: r["method"] for r in rep["runs"]}
    return {"report": Path(rec["report"]), "out": exp.out,
            "verdict": verdict(ttq, names[0], names[1], rep["metric"], {n: methods.get(n, n) for n in names})}
