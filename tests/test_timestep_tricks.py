import numpy as np
import pytest
import torch
from scipy import stats

from ebdiff.config import DiffusionConfig
from ebdiff.core.diffusion import (
    Schedule,
    TimestepSampler,
    make_timestep_sampler,
    min_snr_weights,
    speed_meaningful_step,
    speed_probabilities,
    speed_weights,
)


@pytest.mark.parametrize("k", [2.0, 5.0])
def test_speed_sampling_probabilities_chi_square(k):
    p = speed_probabilities(1000, 700, k)
    assert abs(float(p.sum()) - 1) < 1e-12
    assert float(p[0]) == pytest.approx(k / (700 * k + 300)) and float(p[999]) == pytest.approx(1 / (700 * k + 300))
    s = TimestepSampler(0, 999, probs=p)
    t = s(200_000, torch.Generator().manual_seed(0))
    # chi-square over 10 bins of 100 timesteps
    obs = np.bincount(t.numpy() // 100, minlength=10)
    exp = np.array([float(p[i * 100:(i + 1) * 100].sum()) for i in range(10)]) * len(t)
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    # a clearly wrong expectation is rejected
    assert stats.chisquare(obs, np.full(10, len(t) / 10)).pvalue < 1e-6


def test_speed_inside_a_region_is_renormalised():
    p = speed_probabilities(1000, 700, 5.0)
    s = TimestepSampler(600, 799, probs=p)
    t = s(100_000, torch.Generator().manual_seed(1))
    assert t.min() >= 600 and t.max() <= 799
    below = float((t < 700).float().mean())
    assert abs(below - 5 * 100 / (5 * 100 + 100)) < 0.01  # 100 steps at weight 5 vs 100 at weight 1


def test_speed_weights_formula():
    s = Schedule.linear()
    w = speed_weights(s, 700, 0.6)
    g = np.gradient((1 - s.alphas_cumprod).numpy())[:700]
    expected = 0.4 + 0.2 * (g - g.min()) / (g.max() - g.min())
    assert np.allclose(w[:700].numpy(), expected) and torch.all(w[700:] == 1)
    assert w[:700].min() == pytest.approx(0.4) and w[:700].max() == pytest.approx(0.6)


def test_min_snr_weights_formula():
    s = Schedule.linear()
    w = min_snr_weights(s, 5.0)
    ab = s.alphas_cumprod
    snr = ab / (1 - ab)
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr)
    assert float(w[0]) < 0.01 and float(w[999]) == 1.0  # low noise down-weighted, high noise untouched


def test_speed_dual_meaningful_step_and_reflection_chi_square():
    s = Schedule.linear()
    m = speed_meaningful_step(s)
    assert m == 642  # REFERENCE.md section 5
    smp = make_timestep_sampler(DiffusionConfig(timestep_sampler="speed-dual"))
    assert smp.dual == 642
    t = smp(200_001, torch.Generator().manual_seed(2))
    half = (len(t) + 1) // 2
    first, second = t[:half], t[half:]
    assert torch.equal(second, torch.where(first[: len(second)] < m, m - first[: len(second)], first[: len(second)] - m))
    # the exact pmf of the whole batch: half from p, half from p pushed through the reflection
    p = speed_probabilities(1000, 700, 5.0).numpy()
    refl = np.zeros(1000)
    for u in range(1000):
        refl[m - u if u < m else u - m] += p[u]
    pmf = (p * half + refl * (len(t) - half)) / len(t)
    obs = np.bincount(t.numpy() // 50, minlength=20)
    exp = pmf.reshape(20, 50).sum(1) * len(t)
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    assert stats.chisquare(obs, p.reshape(20, 50).sum(1) * len(t)).pvalue < 1e-6  # not plain SpeeD


def test_speed_dual_stays_inside_a_region():
    smp = make_timestep_sampler(DiffusionConfig(timestep_sampler="speed-dual", t_min=240, t_max=460))
    t = smp(50_000, torch.Generator().manual_seed(3))
    assert t.min() >= 240 and t.max() <= 460
