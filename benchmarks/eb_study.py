"""When does the Early-Bird ticket appear? One dense run, every criterion, ratio and mask source.

The dense trajectory does not depend on the search, so one dense training run serves every setting:
at each check the script computes the masks of all (criterion, ratio) pairs on the online and on the
EMA weights, then replays the Early-Bird detector over each sequence. For each setting it reports the
check/iteration where the ticket is drawn (as a fraction of the training budget), and the ticket's
mask distance from the mask at initialisation and from the mask of the longest-trained model.

    python benchmarks/eb_study.py --out benchmarks/results/eb_study_cpu --preset tiny --iters 1000 \
        --check-every 25 --batch 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ebdiff.app.assemble import train
from ebdiff.backbones import build_model
from ebdiff.config import load_config
from ebdiff.core.diffusion import DiffusionLoss
from ebdiff.core.earlybird import EarlyBirdDetector
from ebdiff.core.masks import distance_matrix, hamming
from ebdiff.evaluate.report import plot_hamming
from ebdiff.pruning.engine import PruningEngine, ScoreProbe, criterion_names, make_criterion
from ebdiff.training.hooks import RunContext


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--check-every", type=int, default=25)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--ema", type=float, default=0.9999)
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--eta", type=float, default=0.1)
    ap.add_argument("--queue", type=int, default=5)
    ap.add_argument("--taylor-timesteps", type=int, default=8)
    ap.add_argument("--taylor-batch", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ratios = [float(r) for r in a.ratios.split(",")]
    cfg = load_config(None, [f"model.preset={a.preset}", f"train.iters={a.iters}", f"train.batch_size={a.batch}",
                             f"train.lr={a.lr}", f"train.ema_decay={a.ema}", f"train.device={a.device}",
                             "train.log_every=50", f"train.ckpt_every={a.iters}", *a.overrides])
    seqs: dict[tuple, list] = {}
    iters: list[int] = []
    cost = {"online": [], "ema": []}
    state = {}

    def masks_of(model: torch.nn.Module, engine: PruningEngine, x0: torch.Tensor) -> dict:
        """Every criterion's masks at every ratio, scored as the trainer's Early-Bird search scores them."""
        probe = ScoreProbe(x0, DiffusionLoss.from_config(cfg.diffusion, x0.device), a.taylor_timesteps,
                           seed=cfg.train.seed)
        res = {}
        for crit in criterion_names():
            scores = engine.scores(make_criterion(crit, seed=cfg.train.seed), probe)
            for r in ratios:
                res[(crit, r)] = engine.mask_from_scores(scores, r)
        return res

    def record(trainer: RunContext, it: int) -> None:
        if "engines" not in state:
            state["engines"] = {"online": PruningEngine(trainer.state.model),
                                "ema": PruningEngine(trainer.state.ema.module)}
            state["x0"] = trainer.data.head(a.taylor_batch).to(trainer.device)
        iters.append(it)
        for src, model in (("online", trainer.state.model), ("ema", trainer.state.ema.module)):
            t0 = time.perf_counter()
            for key, m in masks_of(model, state["engines"][src], state["x0"]).items():
                seqs.setdefault((src, *key), []).append(m)
            cost[src].append(time.perf_counter() - t0)

    def callback(trainer: RunContext) -> None:
        if trainer.state.iteration == 1 and not iters:
            # mask at initialisation: the same seed and preset give the trainer's initial weights
            torch.manual_seed(cfg.train.seed)
            init = build_model(cfg.model.preset, cfg.model.dropout).to(trainer.device)
            eng = PruningEngine(init)
            x0 = trainer.data.head(a.taylor_batch).to(trainer.device)
            state["init"] = masks_of(init, eng, x0)
        if trainer.state.iteration % a.check_every == 0:
            record(trainer, trainer.state.iteration)

    t0 = time.perf_counter()
    summary = train(cfg, out / "dense", callbacks=[callback])
    wall = time.perf_counter() - t0
    np.savez_compressed(out / "masks_all.npz", iterations=np.array(iters),
                        **{"-".join(map(str, k)): torch.stack([m.bits for m in v]).numpy() for k, v in seqs.items()},
                        **{"init-" + "-".join(map(str, k)): m.bits.numpy() for k, m in state["init"].items()})
    rows = []
    for (src, crit, r), masks in sorted(seqs.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        det = EarlyBirdDetector(eta=a.eta, queue=a.queue)
        hit = None
        for i, m in enumerate(masks):
            t = det.update(m)
            if t is not None and hit is None:
                hit = i
        final = masks[-1]
        init = state["init"][(crit, r)]
        row = {"source": src, "criterion": crit, "ratio": r,
               "ticket_check": hit, "ticket_iter": iters[hit] if hit is not None else None,
               "budget_fraction": iters[hit] / a.iters if hit is not None else None,
               "d_init": hamming(masks[hit], init) if hit is not None else None,
               "d_final": hamming(masks[hit], final) if hit is not None else None,
               "d_init_final": hamming(init, final),
               "min_consecutive_d": min((hamming(x, y) for x, y in zip(masks, masks[1:])), default=None)}
        rows.append(row)
        dm = distance_matrix(masks).numpy()
        tag = f"{src}_{crit}_{r}"
        np.save(out / f"hamming_{tag}.npy", dm)
        plot_hamming(dm, out / f"hamming_{tag}.png", mark=hit, title=f"{crit} p={r} ({src})")
    res = {"args": vars(a), "iterations_checked": iters, "rows": rows, "dense_summary": summary,
           "wall_s": wall, "mask_cost_s_mean": {k: float(np.mean(v)) for k, v in cost.items()}}
    (out / "eb_study.json").write_text(json.dumps(res, indent=2, default=str))
    lines = [f"# Early-Bird study: preset {a.preset}, {a.iters} iterations, batch {a.batch}, lr {a.lr}, "
             f"EMA {a.ema}, check every {a.check_every} its, eta {a.eta}, queue {a.queue}", "",
             "| source | criterion | ratio | ticket at iter | fraction of budget | d(ticket, init) | "
             "d(ticket, final) | d(init, final) |", "|---|---|---|---|---|---|---|---|"]
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['source']} | {r['criterion']} | {r['ratio']} | {r['ticket_iter'] or 'none'} | "
                     f"{f(r['budget_fraction'])} | {f(r['d_init'])} | {f(r['d_final'])} | {f(r['d_init_final'])} |")
    (out / "eb_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
