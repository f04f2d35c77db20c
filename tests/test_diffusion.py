import math

import torch

from ebdiff.core.diffusion import Schedule, TimestepSampler, eps_loss, q_sample


def test_linear_schedule_closed_form():
    s = Schedule.linear(1000, 1e-4, 0.02)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    for t in (0, 500, 999):
        expected = math.prod(1 - b for b in betas[: t + 1])
        assert abs(float(s.alphas_cumprod[t]) - expected) < 1e-12
    assert abs(float(s.alphas_cumprod[0]) - (1 - 1e-4)) < 1e-15
    assert 4.0e-5 < float(s.alphas_cumprod[999]) < 4.1e-5  # the well-known DDPM value ~4.04e-5


def test_schedule_matches_diffusers():
    from diffusers import DDPMScheduler

    d = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    s = Schedule.linear()
    assert torch.allclose(s.alphas_cumprod.float(), d.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)


def test_q_sample_and_loss():
    s = Schedule.linear()
    x0 = torch.ones(2, 1, 4, 4)
    noise = torch.zeros_like(x0)
    t = torch.tensor([0, 999])
    xt = q_sample(s, x0, t, noise)
    assert torch.allclose(xt[0], torch.full_like(xt[0], float(s.alphas_cumprod[0].sqrt())))
    pred = torch.ones(2, 1, 4, 4)
    assert eps_loss(pred, noise, "mean").item() == 1.0
    assert eps_loss(pred, noise, "sum").item() == 16.0


def test_antithetic_pairs_and_range():
    g = torch.Generator().manual_seed(0)
    t = TimestepSampler(0, 999)(128, g)
    assert torch.equal(t[:64] + t[64:], torch.full((64,), 999))
    r = TimestepSampler(240, 460)(10_000, g)
    assert r.min() >= 240 and r.max() <= 460 and len(set(r.tolist())) == 221
    u = TimestepSampler(0, 9, antithetic=False)(5000, g)
    assert set(u.tolist()) == set(range(10))
