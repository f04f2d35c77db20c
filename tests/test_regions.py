import pytest
import torch

from ebdiff.core.diffusion import Schedule, TimestepSampler
from ebdiff.core.regions import RegionError, RegionRouter, RegionSet
from ebdiff.core.sampling import ddim_sample, ddim_timesteps, ddpm_sample

PAPER = [{"t": [0, 260], "ratio": 0.3}, {"t": [240, 460], "ratio": 0.6}, {"t": [440, 999], "ratio": 0.8}]


def test_paper_regions_and_boundaries_helper():
    a = RegionSet.from_config(PAPER, 1000)
    b = RegionSet.from_boundaries([250, 450], [0.3, 0.6, 0.8], T=1000, overlap=0.02)
    assert a == b
    c = RegionSet.from_boundaries([250, 450], [0.3, 0.6, 0.8], T=1000, overlap=0.0)
    assert [(r.lo, r.hi) for r in c.regions] == [(0, 249), (250, 449), (450, 999)]


@pytest.mark.parametrize("items,T,needle", [
    ([{"t": [0, 200], "ratio": 0.3}, {"t": [240, 999], "ratio": 0.6}], 1000, "gap"),
    ([{"t": [240, 999], "ratio": 0.6}, {"t": [0, 260], "ratio": 0.3}], 1000, "start at t = 0"),
    ([{"t": [0, 500], "ratio": 0.3}, {"t": [0, 999], "ratio": 0.6}], 1000, "sorted"),
    ([{"t": [0, 500], "ratio": 1.0}, {"t": [480, 999], "ratio": 0.6}], 1000, "ratio"),
    ([{"t": [0, 500], "ratio": 0.0}, {"t": [480, 999], "ratio": 0.6}], 1000, "ratio"),
    ([{"t": [0, 500], "ratio": 0.3}, {"t": [480, 999], "ratio": 0.6}], 500, "exceeds T-1"),
    ([{"t": [0, 500], "ratio": 0.3}, {"t": [480, 900], "ratio": 0.6}], 1000, "end at t = T-1"),
    ([{"t": [0, 500], "ratio": 0.3}, {"t": [480], "ratio": 0.6}], 1000, "[lo, hi]"),
    ([{"t": [0, 999], "ratio": 0.3, "speed": 2}], 1000, "unknown key"),
    ([], 1000, "at least one"),
])
def test_bad_region_sets(items, T, needle):
    with pytest.raises(RegionError) as e:
        RegionSet.from_config(items, T)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_region_set_in_config_is_one_line():
    from ebdiff.config import load_config
    from ebdiff.errors import ConfigError

    with pytest.raises(ConfigError, match="gap"):
        load_config(None, ["regions=[{t: [0, 100], ratio: 0.3}, {t: [200, 999], ratio: 0.5}]"])


def test_region_samplers_stay_inside_and_cover():
    g = torch.Generator().manual_seed(0)
    for r in RegionSet.from_config(PAPER).regions:
        t = TimestepSampler(r.lo, r.hi)(20_000, g)
        assert t.min() >= r.lo and t.max() <= r.hi
        assert set(t.tolist()) == set(range(r.lo, r.hi + 1))
        half = t[:10_000]
        assert torch.equal(half + t[10_000:], torch.full((10_000,), r.lo + r.hi))  # antithetic in the region


def test_routing_at_boundaries_and_overlaps():
    rs = RegionSet.from_config(PAPER)
    hn = [rs.route(t, "higher-noise") for t in range(1000)]
    mid = [rs.route(t, "midpoint") for t in range(1000)]
    # reference rule: t < 240 -> 0, 240 <= t < 440 -> 1, t >= 440 -> 2
    assert hn == [0] * 240 + [1] * 200 + [2] * 560
    # midpoint: the overlaps [240, 260] and [440, 460] split at 250 and 450
    assert mid == [0] * 250 + [1] * 200 + [2] * 550
    for t in range(1000):  # every routed region holds t
        for rule, k in (("higher-noise", hn[t]), ("midpoint", mid[t])):
            assert rs[k].lo <= t <= rs[k].hi


def test_router_calls_exactly_one_model_per_step():
    rs = RegionSet.from_config(PAPER)
    seen = []

    def make(k):
        def f(x, t):
            seen.append((k, int(t[0])))
            return torch.full_like(x, float(k))
        return f

    router = RegionRouter([make(0), make(1), make(2)], rs, "higher-noise")
    for t in (0, 239, 240, 259, 260, 261, 439, 440, 460, 999):
        seen.clear()
        out = router(torch.zeros(2, 1, 2, 2), torch.full((2,), t))
        assert len(seen) == 1 and seen[0][0] == rs.route(t, "higher-noise") and out[0, 0, 0, 0] == seen[0][0]
    # mixed timesteps in one batch are split by region
    out = router(torch.zeros(3, 1, 1, 1), torch.tensor([5, 300, 900]))
    assert out.flatten().tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(RegionError):
        RegionRouter([make(0)], rs)
    with pytest.raises(RegionError):
        RegionRouter([make(0), make(1), make(2)], rs, "nearest")


def test_router_of_identical_models_samples_bit_for_bit():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)

    def f(x, t):
        return net(x) * (t.float().view(-1, 1, 1, 1) / 1000)

    s = Schedule.linear()
    router = RegionRouter([f, f, f], RegionSet.from_config(PAPER))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ddim_sample(f, x.clone(), s, ddim_timesteps(1000, 20, "quad"))
        b = ddim_sample(router, x.clone(), s, ddim_timesteps(1000, 20, "quad"))
        assert torch.equal(a, b)
        c = ddpm_sample(f, x.clone(), s, generator=torch.Generator().manual_seed(2))
        d = ddpm_sample(router, x.clone(), s, generator=torch.Generator().manual_seed(2))
        assert torch.equal(c, d)


def test_weighted_macs_hand_computed():
    rs = RegionSet.from_config(PAPER)
    # DDIM 10 steps, uniform spacing: t = 0, 100, ..., 900 -> regions 0,0,0,1,1,2,2,2,2,2 (higher-noise)
    ts = ddim_timesteps(1000, 10, "uniform")
    assert rs.steps_per_region(ts) == [3, 2, 5]
    assert rs.weighted([100.0, 40.0, 10.0], ts) == (3 * 100 + 2 * 40 + 5 * 10) / 10
    # midpoint changes nothing here (no visited t inside an overlap)
    assert rs.weighted([100.0, 40.0, 10.0], ts, "midpoint") == 43.0
    assert rs.weighted([1.0, 2.0, 3.0], [250], "higher-noise") == 2.0
    assert rs.weighted([1.0, 2.0, 3.0], [250], "midpoint") == 2.0
    assert rs.weighted([1.0, 2.0, 3.0], [245], "midpoint") == 1.0


def test_samplers_route_by_the_python_step_without_reading_the_device_tensor(monkeypatch):
    """The samplers pick the region model from the step's int (RegionRouter.at): no t.tolist(), which on
    a GPU is a host-device sync per step. Wrapping each region model (map) keeps that routing."""
    rs = RegionSet.from_config(PAPER)
    seen = []

    def make(k):
        def f(x, t):
            seen.append((k, int(t[0])))
            return torch.zeros_like(x)
        return f

    router = RegionRouter([make(0), make(1), make(2)], rs).map(lambda m: (lambda x, t: m(x, t) + 0))
    monkeypatch.setattr(RegionRouter, "__call__", lambda *a: pytest.fail("routed through t.tolist()"))
    steps = ddim_timesteps(1000, 20, "quad")
    with torch.no_grad():
        ddim_sample(router, torch.zeros(2, 1, 2, 2), Schedule.linear(), steps)
    assert [t for _, t in seen] == steps[::-1]
    assert all(k == rs.route(t, "higher-noise") for k, t in seen)
    assert router.calls == [sum(rs.route(t, "higher-noise") == k for t in steps) for k in range(3)]
