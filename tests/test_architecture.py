"""The seams of issue 13: the Early-Bird search and the diffusion loss work without a trainer, a
criterion and a sampler register in a few lines, and modules only use each other's public names."""

import ast
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_args

from ebdiff.backbones import build_model, eps_fn
from ebdiff.cli import main
from ebdiff.core.diffusion import DiffusionLoss, Schedule, TimestepSampler, min_snr_weights
from ebdiff.core.earlybird import EarlyBirdDetector
from ebdiff.pruning.engine import CRITERIA, Criterion, PruningEngine, ScoreProbe, make_criterion, register_criterion
from ebdiff.training.search import DRAWN, MISSED, EarlyBirdSearch

SRC = Path(__file__).resolve().parents[1] / "src" / "ebdiff"


def _search(criterion="magnitude", **kw):
    return EarlyBirdSearch(make_criterion(criterion), 0.5, EarlyBirdDetector(eta=0.1, queue=3), check_every=2, **kw)


def test_search_without_a_trainer_draws_saves_and_resumes():
    torch.manual_seed(0)
    model = build_model("tiny")
    s = _search()
    assert not s.due(1) and s.due(2)
    assert s.check(2, model) is None and s.check(4, model) is None  # the queue is not full yet
    ticket = s.check(6, model)  # an unchanged model: identical masks, drawn at the first full queue
    assert ticket is not None and ticket.iteration == 6 and ticket.check == 2 and ticket.max_distance == 0.0
    assert s.status == DRAWN and not s.due(8)
    plan = s.plan(ticket.mask)
    assert sum(len(i) for _, i in plan) == int(ticket.mask.bits.sum())
    # state round trip: a restored search continues exactly as the original
    a, b = _search(), _search()
    for it in (2, 4):
        a.check(it, model)
    b.load_state_dict(a.state_dict())
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ta, tb = a.check(6, model), b.check(6, model)
    assert ta is None and tb is None  # the masks moved
    assert a.detector.history[2:] == b.detector.history[2:] and a.detector.history[2] > 0.1
    assert a.detector.checks == b.detector.checks == 3 and b.iterations == [2, 4, 6]


def test_search_rounds_the_ticket_channels_when_asked():
    """early_bird.round_channels reaches the search's masks: every group keeps a multiple of it."""
    from ebdiff.config import EarlyBirdConfig

    torch.manual_seed(0)
    model = build_model("tiny")
    s = EarlyBirdSearch.from_config(EarlyBirdConfig(ratio=0.7, round_channels=16), check_every=2)
    mask = s.mask_of(model)
    kept = [size - len(idx) for size, idx in zip(mask.sizes, mask.indices())]
    assert all(k % 16 == 0 for k in kept) and s.round_channels == 16
    plain = _search().mask_of(model)  # ratio 0.5, no rounding: the 16-channel groups keep 8
    assert any(size - len(idx) == 8 for size, idx in zip(plain.sizes, plain.indices()))


def test_search_budget_miss_and_extract_anyway():
    model = build_model("tiny")
    s = _search(max_search_iters=2, on_miss="continue-dense")
    s.detector = EarlyBirdDetector(eta=1e-9, queue=2)
    assert s.check(2, model) is None and s.status == MISSED and not s.due(4)
    s = _search(max_search_iters=2, on_miss="extract-anyway")
    t = s.check(2, model)
    assert t is not None and t.found is False and t.iteration == 2 and s.status == DRAWN


def test_search_with_a_gradient_criterion_on_the_ema_copy():
    torch.manual_seed(0)
    model = build_model("tiny")
    ema = build_model("tiny").requires_grad_(False)
    probe = ScoreProbe(torch.rand(2, 1, 32, 32) * 2 - 1, DiffusionLoss(Schedule.linear()), timesteps=3)
    with pytest.raises(ValueError, match="ScoreProbe"):
        _search("taylor")
    s = _search("taylor", mask_source="ema", probe=probe)
    s.check(2, model, ema)
    m = s.masks[-1]
    assert 0.3 < m.pruned_fraction < 0.6
    assert all(not p.requires_grad and p.grad is None for p in ema.parameters())  # left as it was
    assert all(p.grad is None for p in model.parameters())


def test_diffusion_loss_without_a_trainer():
    s = Schedule.linear()
    torch.manual_seed(0)
    x0, noise = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    ab = s.alphas_cumprod
    xt = ab[t].sqrt().float().view(-1, 1, 1, 1) * x0 + (1 - ab[t]).sqrt().float().view(-1, 1, 1, 1) * noise
    loss = DiffusionLoss(s)
    assert torch.allclose(loss.noised(x0, t, noise), xt)
    zero = lambda x, tt: torch.zeros_like(x)  # noqa: E731
    assert torch.allclose(loss(zero, x0, noise, t), noise.pow(2).mean())
    assert torch.allclose(DiffusionLoss(s, reduction="sum")(zero, x0, noise, t), noise.pow(2).sum() / 4)
    w = min_snr_weights(s)
    weighted = DiffusionLoss(s, weights=w)(zero, x0, noise, t)
    assert torch.allclose(weighted, (noise.pow(2).mean((1, 2, 3)) * w[t].float()).mean())
    perfect = lambda x, tt: noise  # noqa: E731
    assert loss(perfect, x0, noise, t) == 0
    # the loss's timestep sampler is the run's (a TA-EB region here)
    from ebdiff.config import DiffusionConfig

    ranged = DiffusionLoss.from_config(DiffusionConfig(t_min=240, t_max=460))
    ts = ranged.timesteps(64, generator=torch.Generator().manual_seed(0))
    assert isinstance(ranged.timesteps, TimestepSampler) and ts.min() >= 240 and ts.max() <= 460
    # a UNet through eps_fn
    m = build_model("tiny", dropout=0.0)
    x = torch.rand(2, 1, 32, 32)
    assert loss(eps_fn(m), x, torch.randn_like(x), torch.tensor([3, 700])).ndim == 0


@pytest.fixture
def first_channels():
    """A test-only criterion, registered in a few lines: it prunes the first channels of every group."""

    @register_criterion
    class FirstChannels(Criterion):
        name = "first-channels"

        def __call__(self, engine, probe=None):
            return [torch.arange(i.size, dtype=torch.float) for i in engine.info]

    yield FirstChannels
    del CRITERIA["first-channels"]


def test_registered_criterion_runs_an_early_bird_search(tmp_path, has_fmnist, first_channels):
    run = tmp_path / "fc"
    eb = ["early_bird.ratio=0.5", "early_bird.criterion=first-channels", "early_bird.check_every=2",
          "early_bird.queue=2"]
    assert main(["train", *tiny_args(run, "train.iters=6", *eb)]) == 0
    t = json.loads((run / "ticket.json").read_text())
    assert t["criterion"] == "first-channels" and t["iteration"] == 4  # identical masks: the first full queue
    meta = json.loads(next((run / "checkpoints").glob("ckpt-*/meta.json")).read_text())
    eng = PruningEngine(build_model("tiny"))
    for (name, idx), info in zip(meta["plan"], eng.info):
        assert name == info.name
        per = info.size // info.gn_groups  # the lowest-scored channels of each norm group: its first ones
        k = len(idx) // info.gn_groups
        assert idx == [g * per + j for g in range(info.gn_groups) for j in range(k)]


def test_unknown_criterion_is_refused_with_the_registered_names(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "x"), "early_bird.ratio=0.5", "early_bird.criterion=l3"]) == 2
    err = capsys.readouterr().err
    assert "magnitude, taylor, diff-pruning, random" in err


def test_registered_sampler_is_a_valid_setting():
    from ebdiff.config import load_config
    from ebdiff.core.sampling import SAMPLERS, generate, register_sampler
    from ebdiff.errors import ConfigError

    @register_sampler("x0-zero", lambda T, steps, spacing: [0])
    def zero_sampler(model, x, schedule, timesteps, *, generator=None):
        return torch.zeros_like(x)

    try:
        assert load_config(None, ["sample.sampler=x0-zero"]).sample.sampler == "x0-zero"
        out = generate(lambda x, t: x, 3, (1, 2, 2), Schedule.linear(), sampler="x0-zero", eta=0.5)
        assert out.shape == (3, 1, 2, 2) and out.abs().max() == 0
    finally:
        del SAMPLERS["x0-zero"]
    with pytest.raises(ConfigError, match="sample.sampler"):
        load_config(None, ["sample.sampler=x0-zero"])


def autograd_nodes_reachable(root, skip: tuple = ()) -> tuple[int, int]:
    """(autograd nodes, objects) reachable from `root` through gc referents, not entering `skip` types."""
    import gc

    seen, stack, nodes = set(), [root], 0
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, skip):
            continue
        seen.add(id(o))
        if isinstance(o, torch.autograd.graph.Node):
            nodes += 1
            continue
        stack.extend(gc.get_referents(o))
    return nodes, len(seen)


def test_the_pruning_engine_keeps_no_autograd_graph_alive():
    """A traced engine must not hold autograd nodes: they would keep the parameters' AccumulateGrad
    nodes (made on the default stream) alive, and a later CUDA-graph capture of the training step fails
    (cudaErrorStreamCaptureImplicit, seen on an H200 in an Early-Bird run with train.cuda_graph)."""
    import types

    skip = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)  # the engine, not all of torch
    nodes, seen = autograd_nodes_reachable(PruningEngine(build_model("tiny")), skip)
    assert nodes == 0
    assert seen > 1000  # the walk did reach the graph


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("ebdiff")):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{path.name}: from {'.' * node.level}{node.module or ''} import {a.name}")
                if node.module is None:  # `from . import checkpoint as ck`
                    modules.add(a.asname or a.name)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.name}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .trainer import _resolve_device\nfrom . import report as r\nr._plt()\n")
    assert _private_uses(bad) == ["bad.py: from .trainer import _resolve_device", "bad.py: r._plt"]
    assert [f for p in sorted(SRC.glob("*.py")) for f in _private_uses(p)] == []


def test_after_the_ticket_nothing_keeps_an_autograd_graph_or_the_dense_model(tmp_path, has_fmnist):
    """What a later CUDA-graph capture needs (train.cuda_graph through an Early-Bird extraction): after the
    extraction the trainer reaches no autograd node (loss tensors, the pruning engine, wrappers), and the
    dense model it trained before is gone (accelerate used to keep every model it prepared)."""
    import gc
    import types
    import weakref

    from conftest import tiny_args

    from ebdiff.app.assemble import train
    from ebdiff.config import load_config

    seen_dense, checked = [], []

    def probe(tr):
        st = tr.state
        if st.phase == "dense" and not seen_dense:
            seen_dense.append(weakref.ref(st.model))
        if st.phase == "ticket" and not checked:
            gc.collect()
            skip = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)  # not all of torch
            checked.append((*autograd_nodes_reachable(tr, skip), seen_dense[0]() is None))

    args = tiny_args(tmp_path / "r", "train.iters=6", "early_bird.ratio=0.5", "early_bird.check_every=2",
                     "early_bird.max_search_iters=4", "early_bird.on_miss=extract-anyway")
    cfg = load_config(None, [a for a in args if "=" in a and not a.startswith("--")])
    train(cfg, tmp_path / "r", callbacks=[probe])
    nodes, reached, dense_gone = checked[0]
    assert nodes == 0 and reached > 1000
    assert dense_gone
