"""Figures and run reports: Hamming-distance heatmaps (the paper's Figures 2 and 4), sample grids, and
`ebdiff report`: the paper-style table, time to quality (quality-vs-training-time curves), loss curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..backbones import format_count
from ..errors import ConfigError
from ..files import atomic_save, atomic_write_json, read_json
from .curves import read_curve
from .quality_curves import read_quality_curve, time_to_quality


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_hamming(dm: np.ndarray, path: Path, mark: int | None = None, title: str = "",
                 iterations: list[int] | None = None) -> None:
    """Pairwise mask distances as a heatmap; `mark` outlines the check where the ticket was drawn."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4))
    n = dm.shape[0]
    im = ax.imshow(dm if n else np.zeros((1, 1)), cmap="viridis_r", vmin=0, vmax=max(float(dm.max()) if n else 1, 1e-6),
                   origin="upper", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="normalised Hamming distance")
    if mark is not None and n:
        ax.add_patch(plt.Rectangle((mark - 0.5, mark - 0.5), 1, 1, fill=False, ec="red", lw=2))
        ax.axhline(mark, color="red", lw=0.6, ls="--")
        ax.axvline(mark, color="red", lw=0.6, ls="--")
    ax.set_xlabel("check")
    ax.set_ylabel("check")
    ax.set_title(title or "mask distance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_search_artifacts(run_dir: Path, search, ticket: dict | None, title: str = "") -> None:
    """An Early-Bird search's files in its run folder: masks.npz (every mask, its iteration and cost),
    hamming.npy / hamming.png (pairwise mask distances, the ticket's check outlined), ticket.json."""
    from ..core.masks import distance_matrix

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    st = search.state_dict()

    def _masks(p):
        with open(p, "wb") as f:
            np.savez(f, masks=st["masks"].numpy(), sizes=np.array(st["sizes"], np.int64),
                     iterations=np.array(st["iterations"], np.int64), check_seconds=np.array(st["check_seconds"]))

    atomic_save(run_dir / "masks.npz", _masks)
    dm = distance_matrix(search.masks).numpy()

    def _dm(p):
        with open(p, "wb") as f:
            np.save(f, dm)

    atomic_save(run_dir / "hamming.npy", _dm)
    mark = ticket["check"] if ticket and ticket.get("found") else None
    plot_hamming(dm, run_dir / "hamming.png", mark=mark, title=title)
    if ticket is not None:
        atomic_write_json(run_dir / "ticket.json", ticket)


def save_grid(images_u8: np.ndarray, path: Path, nrow: int | None = None) -> None:
    """NHWC uint8 images -> one PNG grid."""
    from PIL import Image

    n, h, w, c = images_u8.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    pad = 2
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images_u8[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# ---------------------------------------------------------------------- run reports
def _config_section(run: Path, section: str) -> dict:
    """One section of a run's config.yaml as a plain dict ({} if unreadable)."""
    import yaml

    try:
        return (yaml.safe_load((run / "config.yaml").read_text()) or {}).get(section) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _timestep_tricks(run: Path) -> str:
    """'SpeeD', 'SpeeD-dual', 'Min-SNR' (or a combination) from a run's config.yaml; '' for neither."""
    d = _config_section(run, "diffusion")
    parts = []
    if str(d.get("timestep_sampler", "")).startswith("speed") or d.get("loss_weighting") == "speed":
        parts.append("SpeeD-dual" if d.get("timestep_sampler") == "speed-dual" else "SpeeD")
    if d.get("loss_weighting") == "min-snr":
        parts.append("Min-SNR")
    return " + ".join(parts)


def _metric_fields(e: dict, run: Path) -> dict:
    """The first metric of an eval.json (FD-<dataset> or FID) and its KID; without an eval.json, the
    run's last evaluation point during training (`metric_source` says which)."""
    m = next(iter(e.get("metrics", {}).values()), None) or {}
    if m:
        return {"metric_name": m.get("name"), "metric": m.get("value"), "kid": m.get("kid"), "metric_source": "eval"}
    pts, name = read_quality_curve(run)
    if pts:
        last = max(pts, key=lambda p: p.train_s)
        return {"metric_name": name, "metric": last.value, "kid": None, "metric_source": "curve"}
    return {"metric_name": None, "metric": None, "kid": None, "metric_source": None}


def describe_run(run: Path) -> dict:
    """The numbers a report row needs, from a run folder's summary.json / eval.json / ticket.json."""
    run = Path(run)
    e = read_json(run / "eval.json") or {}
    a = read_json(run / "taeb.json")
    if a is not None:  # a TA-EB run: weighted size, longest branch
        b = a["branches"]
        ratios = "/".join(str(int(round(x["region"]["ratio"] * 100))) for x in b)
        tricks = _timestep_tricks(run)
        by_t = (a.get("weightings") or {}).get("timesteps") or {}
        return {"run": str(run), "name": run.name, "method": f"TA-EB {ratios}%" + (f" + {tricks}" if tricks else ""),
                "params": a["weighted_params"], "macs": a["weighted_macs"], **_metric_fields(e, run),
                "params_by_timesteps": by_t.get("params"), "macs_by_timesteps": by_t.get("macs"),
                "iterations": max(x["dense_iterations"] + x["ticket_iterations"] for x in b),
                "dense_iterations": "/".join(str(x["dense_iterations"]) for x in b),
                "ticket_iterations": "/".join(str(x["ticket_iterations"]) for x in b),
                "train_s": a["taeb_train_s"], "train_s_one_device": a.get("sum_train_s"), "ticket_iter": None,
                "ticket_iters": [x["ticket_iteration"] for x in b], "taeb": True}
    s = read_json(run / "summary.json") or {}
    t = read_json(run / "ticket.json")
    size = s.get("ticket") or s.get("dense") or {}
    pf = s.get("pruned_from")
    if pf:
        pct = int(round(pf["ratio"] * 100))
        method = f"Scratch {pct}%" if pf["reinit"] else f"prune+finetune {pf['criterion']} {pct}%"
    elif t:
        method = (f"EB {t['criterion']} {int(round(t['ratio'] * 100))}%" if t.get("found", True)
                  else f"EB {int(round(t['ratio'] * 100))}% (no ticket)")
    elif _config_section(run, "early_bird").get("ratio") is not None:  # an Early-Bird run still searching
        eb = _config_section(run, "early_bird")
        method = f"EB {eb.get('criterion', 'magnitude')} {int(round(eb['ratio'] * 100))}% (no ticket yet)"
    else:
        method = "dense"
    speed = _timestep_tricks(run)
    if speed:
        method += f" + {speed}"
    return {"run": str(run), "name": run.name, "method": method,
            "params": e.get("params", size.get("params")), "macs": e.get("macs", size.get("macs")),
            **_metric_fields(e, run), "iterations": s.get("iterations"), "dense_iterations": s.get("dense_iterations"),
            "ticket_iterations": s.get("ticket_iterations"),
            "train_s": (s.get("time_s") or {}).get("train_total"),
            "ticket_iter": t.get("iteration") if t else None}


def _size(x, unit: float, suffix: str, nd: int) -> str:
    return "-" if x is None else f"{x / unit:.{nd}f}{suffix}"


def _reached(t: float | None, best) -> str:
    if t is not None:
        return f"{t:.1f} s"
    return "not reached" + (f" (best {best['value']:.2f})" if best else "")


def _time_to_quality(rows: list[dict], ref: dict | None, out: Path, plt, target: float | None,
                     interpolate: bool) -> tuple[list[str], dict | None]:
    """The report's time-to-quality section and figure (quality_curves.png) from the runs' evaluation
    points during training; ([], None) when no run has any."""
    curves, metric = {}, None
    for r in rows:
        pts, name = read_quality_curve(Path(r["run"]))
        if pts:
            curves[r["name"]], metric = pts, metric or name
    if not curves:
        return [], None
    ref_name = ref["name"] if ref and ref["name"] in curves else next(iter(curves))
    ttq = time_to_quality(curves, ref_name, target, interpolate, {r["name"]: r["train_s"] for r in rows})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, pts in curves.items():
        ax.plot([p.train_s for p in pts], [p.value for p in pts], marker="o", ms=3, lw=1.2, label=name)
    goals = [(ttq["reference_final"], f"{ref_name} final")] + ([(target, "target")] if target is not None else [])
    for value, label in goals:
        ax.axhline(value, ls="--", lw=0.8, color="grey")
        ax.annotate(label, (ax.get_xlim()[0], value), fontsize=7, va="bottom", color="grey")
    ax.set_xlabel("training time, s (evaluation excluded)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    ax.set_title("quality during training", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "quality_curves.png", dpi=120)
    plt.close(fig)
    how = ("linear interpolation between the two evaluated points around the crossing" if interpolate
           else "the first evaluated point at or below it")
    f = lambda x, nd=2: "-" if x is None else f"{x:.{nd}f}"  # noqa: E731
    head = f"time to {ref_name}'s final {metric} {ttq['reference_final']:.2f}"
    cols = ["run", "points", f"final {metric} (at s)", "best (at s)", head, "speed-up at equal quality"]
    if target is not None:
        cols += [f"time to {metric} {target:g}", f"speed-up at {target:g}"]
    cols += ["train time s", "paper's speed-up (train time ratio)"]
    lines = ["## Time to quality", "",
             f"{metric} during training (`train.eval_every`; training time excludes evaluation). A run reaches a "
             f"target at {how}; nothing is extrapolated. Speed-up at equal quality = {ref_name}'s time to the "
             f"target / the run's. The paper's speed-up compares whole training times (equal iteration budgets, "
             f"whatever quality each ends at).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in ttq["rows"]:
        fin, best = row["final"], row["best"]
        cells = [row["name"], str(row["points"]), f"{fin['value']:.2f} ({fin['train_s']:.1f})",
                 f"{best['value']:.2f} ({best['train_s']:.1f})", _reached(row["to_reference_s"], best),
                 f(row["speedup_at_reference"]) + ("x" if row["speedup_at_reference"] else "")]
        if target is not None:
            cells += [_reached(row["to_target_s"], best),
                      f(row["speedup_at_target"]) + ("x" if row["speedup_at_target"] else "")]
        cells += [f(row["train_s"], 1), f(row["paper_speedup"]) + ("x" if row["paper_speedup"] else "")]
        lines.append("| " + " | ".join(cells) + " |")
    taeb = [r["name"] for r in rows if r.get("taeb") and r["name"] in curves]
    if taeb:
        lines += ["", f"TA-EB ({', '.join(taeb)}): the ensemble is scored after training at each evaluation point of "
                  "its branches (point k routes each branch's k-th snapshot; a finished branch gives its last); its "
                  "time is the longest of those branches' times."]
    lines += ["", "![quality during training](quality_curves.png)", ""]
    return lines, ttq


def _results_table(rows: list[dict], ref: dict | None, mname: str) -> list[str]:
    """The paper-style table (Markdown lines) with its notes on TA-EB sizes and curve-read quality."""
    f = lambda x, nd=2: "-" if x is None else f"{x:.{nd}f}"  # noqa: E731
    lines = ["# ebdiff report", "",
             f"Reference for speed-up: `{ref['name'] if ref else 'none'}` (training wall-clock time, same machine).", "",
             f"| run | method | params | MACs | {mname} | KID | iterations (dense + ticket) | ticket at | train time s | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, m = _size(r["params"], 1e6, "M", 2), _size(r["macs"], 1e9, "G", 3)
        if r.get("params_by_timesteps") is not None:  # TA-EB: both weightings
            p += f" / {_size(r['params_by_timesteps'], 1e6, 'M', 2)}"
            m += f" / {_size(r['macs_by_timesteps'], 1e9, 'G', 3)}"
        its = f"{r['dense_iterations']} + {r['ticket_iterations']}" if r["iterations"] is not None else "-"
        at = r["ticket_iter"] if r["ticket_iter"] is not None else "/".join(map(str, r.get("ticket_iters") or [])) or "-"
        q = f(r["metric"], 3) + ("*" if r["metric_source"] == "curve" else "")
        t, up = f(r["train_s"], 1), f"{f(r['speedup'])}x"
        if r.get("train_s_one_device"):  # TA-EB: one device per branch / all branches on one device
            t += f" / {r['train_s_one_device']:.1f}"
            up += f" / {f(r.get('speedup_one_device'))}x"
        lines.append(f"| {r['name']} | {r['method']} | {p} | {m} | {q} | {f(r['kid'], 4)} | {its} | {at} | {t} | {up} |")
    lines.append("")
    if any(r.get("train_s_one_device") for r in rows):
        lines += ["TA-EB train time and speed-up `A / B`: A with one device per branch (its longest branch, what the "
                  "paper's TA-EB speed-ups count), B with every branch on one device (the branches' device-seconds "
                  "together, what a single-device user pays).", ""]
    if any(r.get("params_by_timesteps") is not None for r in rows):
        lines += ["TA-EB params / MACs: `A / B` = A weighted by the sampling steps the run's sampler visits "
                  "(`taeb.json` weighted_params), B weighted by the timesteps each region serves, uniform over T "
                  "(what the paper's Table 4 reports).", ""]
    if any(r["metric_source"] == "curve" for r in rows):
        lines += [f"`*`: no eval.json; the {mname} of the run's last evaluation point during training.", ""]
    return lines


def _quality_vs_time(rows: list[dict], out: Path, plt, mname: str) -> list[str]:
    """Metric vs relative training time (the paper's Figure 1), when any run has both."""
    pts = [r for r in rows if r["metric"] is not None and r["speedup"]]
    if not pts:
        return []
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for r in pts:
        ax.scatter(1 / r["speedup"], r["metric"])
        ax.annotate(r["name"], (1 / r["speedup"], r["metric"]), fontsize=7)
    ax.set_xlabel("relative training time (reference = 1)")
    ax.set_ylabel(mname)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_time.png", dpi=120)
    plt.close(fig)
    return ["![quality vs time](quality_vs_time.png)", ""]


def _loss_curves(rows: list[dict], out: Path, plt) -> list[str]:
    """Every run's (every TA-EB branch's) training loss, the ticket's iteration dotted."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for r in rows:
        curves = ([(r["name"], Path(r["run"]))] if not r.get("taeb") else
                  [(f"{r['name']}/{d.name}", d) for d in sorted(Path(r["run"]).glob("region-*"))])
        for label, d in curves:
            curve = read_curve(d)
            its, losses = list(curve), list(curve.values())
            if its:
                ax.plot(its, losses, label=label, lw=1)
                if r["ticket_iter"]:
                    ax.axvline(r["ticket_iter"], ls=":", lw=0.8, color=ax.lines[-1].get_color())
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)
    return ["![loss curves](loss_curves.png)", ""]


def _image_panels(rows: list[dict], out: Path, plt) -> list[str]:
    """The runs' newest heatmaps and sample grids, side by side (heatmaps.png, samples.png)."""
    lines = []
    for kind, pattern in (("heatmaps", "hamming*.png"), ("samples", "samples_*.png")):
        imgs = [(r["name"], sorted(Path(r["run"]).glob(pattern))) for r in rows]
        imgs = [(n, p[-1]) for n, p in imgs if p]
        if not imgs:
            continue
        cols = min(4, len(imgs))
        rows_ = -(-len(imgs) // cols)
        fig, axes = plt.subplots(rows_, cols, figsize=(3.2 * cols, 3.4 * rows_), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (n, p) in zip(axes.flat, imgs):
            ax.imshow(plt.imread(p), cmap="gray")
            ax.set_title(n, fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{kind}.png", dpi=120)
        plt.close(fig)
        lines += [f"![{kind}]({kind}.png)", ""]
    return lines


def write_report(runs: list[Path], out: Path, reference: Path | None = None, target: float | None = None,
                 interpolate: bool = False) -> Path:
    """Markdown report + PNG figures: the table, time to quality (curves, time to the reference's final
    quality and to `target`), metric vs relative time, heatmaps, loss curves, sample grids; and
    report.json with the same numbers. A run that has not finished (no summary.json or taeb.json) stops with
    one line before anything is written."""
    for r in map(Path, runs):
        if not ((r / "summary.json").is_file() or (r / "taeb.json").is_file()):
            raise ConfigError(f"{r} has no summary.json or taeb.json: not a finished ebdiff run")
    plt = pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [describe_run(r) for r in runs]
    ref = describe_run(reference) if reference else next((r for r in rows if r["method"] == "dense"), None)
    for r in rows:
        r["speedup"] = (ref["train_s"] / r["train_s"]) if ref and ref["train_s"] and r["train_s"] else None
        if r.get("train_s_one_device"):  # TA-EB: also every branch on one device (device-seconds)
            r["speedup_one_device"] = ref["train_s"] / r["train_s_one_device"] if ref and ref["train_s"] else None
    mname = next((r["metric_name"] for r in rows if r["metric_name"]), "quality")
    lines = _results_table(rows, ref, mname)
    ttq_lines, ttq = _time_to_quality(rows, ref, out, plt, target, interpolate)
    lines += ttq_lines + _quality_vs_time(rows, out, plt, mname) + _loss_curves(rows, out, plt)
    lines += _image_panels(rows, out, plt)
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    atomic_write_json(out / "report.json", {"reference": ref["name"] if ref else None, "metric": mname,
                                            "runs": rows, "time_to_quality": ttq})
    return md


def report_tables(md_text: str) -> str:
    """A report's tables (the paper-style table, time to quality) with their headings, as the CLI prints them."""
    return "".join(block + "\n\n" for block in md_text.split("\n\n") if block.startswith(("|", "## ")))


def count_text(x: float | None) -> str:
    """A parameter or MAC count as the summaries print it (`backbones.format_count`), "-" when unknown."""
    return "-" if x is None else format_count(x)


def format_train_summary(s: dict) -> str:
    """The training summary the CLI prints after a run (summary.json's sizes, ticket, times)."""
    t = s["time_s"]
    lines = ["\n== ebdiff train summary =="]
    lines.append(f"run folder         {s['run_dir']}")
    lines.append(f"iterations         {s['iterations']} (dense {s['dense_iterations']}, ticket {s['ticket_iterations']})")
    d = s.get("dense") or {}
    lines.append(f"dense model        {count_text(d.get('params'))} params, {count_text(d.get('macs'))} MACs")
    info = s.get("ticket_info")
    if s.get("ticket") and info is not None and info.get("found", True):
        tk = s["ticket"]
        lines.append(f"ticket             {count_text(tk['params'])} params, {count_text(tk['macs'])} MACs "
              f"(drawn at iteration {info['iteration']}, check {info['check']}, "
              f"max distance {info['max_distance'] if info['max_distance'] is None else round(info['max_distance'], 4)})")
        lines.append(f"search cost        {info['search_seconds']:.1f} s dense training + checks, "
              f"{info['check_seconds_mean'] * 1e3:.1f} ms per check (mean)")
    elif info is not None and not info.get("found", True):
        lines.append(f"ticket             none drawn by iteration {info['iteration']}")
    pf = s.get("pruned_from")
    if pf:
        tk = s["ticket"]
        pretrained = pf.get("checkpoint") == "diffusers"  # a diffusers model folder: its training time is unknown
        at = "its pretrained weights" if pretrained else f"iteration {pf['iteration']}"
        lines.append(f"pruned model       {count_text(tk['params'])} params, {count_text(tk['macs'])} MACs ({pf['method']}, "
              f"{pf['criterion']} p={pf['ratio']}, from {pf['run']} at {at})")
        dense = "pretrained (not counted)" if pretrained else f"dense run {t['dependency_s']:.1f}"
        lines.append(f"training time      {t['train_total']:.1f} s = {dense} + prune "
              f"{t['extract_s']:.1f} + {'training' if pf['reinit'] else 'fine-tuning'} {t['sparse_s']:.1f}; "
              f"wall {t['wall_s']:.1f} s")
    else:
        lines.append(f"training time      {t['train_total']:.1f} s (dense {t['dense_s']:.1f}, checks {t['check_s']:.1f}, "
              f"extract {t['extract_s']:.1f}, ticket {t['sparse_s']:.1f}); wall {t['wall_s']:.1f} s")
    if s.get("stopped") == "max_seconds":
        lines.append(f"stopped by         train.max_seconds (its own training time, {t['own_total']:.1f} s)")
    if t.get("eval_s"):
        lines.append(f"evaluation         {t['eval_s']:.1f} s during training (not counted as training; points in "
              f"metrics.jsonl)")
    lines.append(f"device             {s['device']} x {s['processes']}")
    return "\n".join(lines)
