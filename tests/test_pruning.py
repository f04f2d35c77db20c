import pytest
import torch

from ebdiff.backbones import build_model, count_macs_params, example_inputs
from ebdiff.core.diffusion import Schedule
from ebdiff.core.masks import ChannelMask
from ebdiff.pruning.engine import PruningEngine, accumulate_taylor_grads, channel_zero_mask_, extract
from ebdiff.runs.checkpoint import load_model, save_checkpoint

RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


@pytest.fixture(scope="module")
def cifar():
    torch.manual_seed(0)
    m = build_model("cifar10")
    return m, PruningEngine(m)


def test_cifar10_mask_size(cifar):
    _, eng = cifar
    assert sum(eng.sizes) == 12_032  # the reference mask length


@pytest.mark.parametrize("ratio,params,macs", [(0.3, 19_851_157, 3_391_878_598), (0.5, 8_968_451, 1_520_366_528)])
def test_cifar10_paper_targets(cifar, ratio, params, macs):
    """The paper's 19.8M / 3.4G and 9.0M / 1.5G, exactly as before early_bird.round_channels existed (its
    default, 1, changes nothing)."""
    m, eng = cifar
    small = extract(m, eng.plan(eng.mask("magnitude", ratio)))
    assert count_macs_params(small)[::-1] == (params, macs)
    assert eng.mask("magnitude", ratio, multiple=1).distance(eng.mask("magnitude", ratio)) == 0


@pytest.mark.parametrize("preset,res", [("cifar10", 32), ("fmnist", 32), ("tiny", 32), ("celeba64", 64),
                                        ("lsun256", 64)])
def test_monotone_and_trainable_at_every_ratio(preset, res):
    torch.manual_seed(0)
    m = build_model(preset)
    eng = PruningEngine(m)
    dense_macs, dense_params = count_macs_params(m, res)  # lsun256 counted at 64x64 to save minutes
    sizes = []
    for r in RATIOS:
        small = extract(m, eng.plan(eng.mask("magnitude", r)))
        macs, params = count_macs_params(small, res)
        sizes.append((params, macs))
        c = small.config.in_channels
        x = torch.randn(2, c, res, res)
        out = small(x, torch.tensor([1, 500])).sample
        assert out.shape == x.shape
        out.square().mean().backward()
        assert all(p.grad is not None for p in small.parameters() if p.requires_grad)
    params = [p for p, _ in sizes]
    macs = [m_ for _, m_ in sizes]
    assert params == sorted(params, reverse=True) and params[0] < dense_params
    assert macs == sorted(macs, reverse=True) and macs[0] < dense_macs
    assert len(set(macs)) == len(macs)  # strictly falling


def test_mask_of_unchanged_model_is_stable():
    torch.manual_seed(0)
    m = build_model("tiny")
    eng = PruningEngine(m)
    s = Schedule.linear()
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    for crit in ("magnitude", "random", "taylor", "diff-pruning"):
        masks = []
        for _ in range(2):
            if crit in ("taylor", "diff-pruning"):
                accumulate_taylor_grads(m, s, x0, 8, 0.05 if crit == "diff-pruning" else None, seed=1)
            masks.append(eng.mask(crit, 0.5, seed=3))
            m.zero_grad(set_to_none=True)
        assert torch.equal(masks[0].bits, masks[1].bits), crit
        assert 0.3 < masks[0].pruned_fraction < 0.6


def test_criteria_differ():
    torch.manual_seed(0)
    m = build_model("tiny")
    eng = PruningEngine(m)
    s = Schedule.linear()
    accumulate_taylor_grads(m, s, torch.rand(4, 1, 32, 32) * 2 - 1, 8, seed=1)
    t = eng.mask("taylor", 0.5)
    assert eng.mask("magnitude", 0.5).distance(t) > 0
    assert eng.mask("random", 0.5, seed=1).distance(eng.mask("random", 0.5, seed=2)) > 0


class _Identity(torch.nn.Module):
    """pred = a * x_t: its loss falls from ~|x0|^2 + 1 at t = 0 towards 0 at t = T - 1."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t):
        from types import SimpleNamespace
        return SimpleNamespace(sample=self.a * x)


def test_diff_pruning_stops_when_loss_falls_below_threshold():
    m = _Identity()
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    full = accumulate_taylor_grads(m, Schedule.linear(), x0, 50, None, seed=0)
    g_full = m.a.grad.clone()
    diff = accumulate_taylor_grads(m, Schedule.linear(), x0, 50, diff_threshold=0.05, seed=0)
    assert full["timesteps_used"] == 50
    assert 0 < diff["timesteps_used"] < 50
    assert not torch.equal(g_full, m.a.grad)


def _only(eng, names, ratio=0.5):
    """A mask that prunes only the groups whose root module is in `names`."""
    full = eng.mask("magnitude", ratio)
    idx = [i if info.name in names else torch.empty(0, dtype=torch.long)
           for i, info in zip(full.indices(), eng.info)]
    return ChannelMask.from_indices(eng.sizes, idx)


@pytest.mark.parametrize("roots", [("time_embedding.linear_1",), ("down_blocks.1.attentions.0.to_v",)])
def test_extraction_equals_masked_dense_where_exact(roots):
    """Groups without GroupNorm: zeroing the pruned channels is exactly what removing them does."""
    torch.manual_seed(0)
    m = build_model("tiny").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-zero biases everywhere
    eng = PruningEngine(m)
    names = [i.name for i in eng.info]
    assert all(r in names for r in roots), names
    mask = _only(eng, roots)
    assert mask.bits.sum() > 0
    small = extract(m, eng.plan(mask)).eval()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in m.parameters())
    masked = build_model("tiny").eval()
    masked.load_state_dict(m.state_dict())
    channel_zero_mask_(masked, PruningEngine(masked), mask)
    ex = example_inputs(m, 3)
    ex["timestep"] = torch.tensor([3, 300, 900])
    with torch.no_grad():
        a, b = small(**ex).sample, masked(**ex).sample
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()


def test_extraction_keeps_surviving_weights():
    torch.manual_seed(0)
    m = build_model("tiny")
    eng = PruningEngine(m)
    mask = eng.mask("magnitude", 0.5)
    small = extract(m, eng.plan(mask))
    info = {i.name: idx for i, idx in zip(eng.info, mask.indices())}
    name = "down_blocks.0.resnets.0.conv1"
    keep = [c for c in range(m.get_submodule(name).out_channels) if c not in set(info[name].tolist())]
    w_small = small.get_submodule(name).weight
    w_dense = m.get_submodule(name).weight[keep]
    conv_in_keep = [c for c in range(16) if c not in set(info["conv_in"].tolist())]
    assert torch.equal(w_small, w_dense[:, conv_in_keep])


def test_reload_round_trip(tmp_path):
    torch.manual_seed(0)
    m = build_model("tiny")
    eng = PruningEngine(m)
    plan = eng.plan(eng.mask("magnitude", 0.6))
    small = extract(m, plan).eval()
    ck = save_checkpoint(tmp_path, 7, small, small, {"preset": "tiny", "dropout": 0.1, "plan": plan}, None)
    loaded, meta = load_model(ck)
    ex = example_inputs(small, 2)
    with torch.no_grad():
        assert torch.equal(small(**ex).sample, loaded(**ex).sample)
    assert meta["iteration"] == 7
    import json
    assert "plan" in json.loads((ck / "meta.json").read_text())


def test_engine_on_frozen_copy_finds_the_same_groups():
    """The EMA copy has requires_grad=False; tracing must still find every group (mask_source=ema)."""
    import copy

    torch.manual_seed(0)
    m = build_model("tiny")
    a = PruningEngine(m)
    frozen = copy.deepcopy(m).eval().requires_grad_(False)
    b = PruningEngine(frozen)
    assert a.sizes == b.sizes and [i.name for i in a.info] == [i.name for i in b.info]
    assert torch.equal(a.mask("magnitude", 0.5).bits, b.mask("magnitude", 0.5).bits)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert [i.name for i in a.info] == sorted(i.name for i in a.info)


def test_cifar10_ticket_channels_rounded_on_request(cifar):
    """early_bird.round_channels=8 or 16 gives every group a multiple of it (GroupNorm-coupled groups of
    cifar10 already keep multiples of 32)."""
    m, eng = cifar
    scores = eng.scores("magnitude")
    for mult in (8, 16):
        for ratio in (0.3, 0.5, 0.8):
            mask = eng.mask_from_scores(scores, ratio, mult)
            kept = [size - len(idx) for size, idx in zip(eng.sizes, mask.indices())]
            assert all(k % mult == 0 and k >= mult for k in kept), (mult, ratio, kept)
    # the 30% ticket's non-GroupNorm groups (attention values, time embedding, shortcuts) were not multiples of 8
    plain = eng.mask_from_scores(scores, 0.3)
    assert any((s - len(i)) % 8 for s, i in zip(eng.sizes, plain.indices()))
