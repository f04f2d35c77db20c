import torch

from ebdiff.core.diffusion import Schedule
from ebdiff.core.sampling import ddim_sample, ddim_timesteps, ddpm_sample, generate

MU, SD = 0.3, 0.5


def gaussian_eps(schedule):
    """The exact eps-predictor for data x0 ~ N(MU, SD^2) per pixel."""
    abar = schedule.alphas_cumprod

    def f(x, t):
        ab = abar[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return (1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * SD**2 + 1 - ab)

    return f


def test_spacings():
    assert ddim_timesteps(1000, 100, "uniform") == list(range(0, 1000, 10))
    tr = ddim_timesteps(1000, 100, "trailing")
    assert tr[0] == 9 and tr[-1] == 999 and len(tr) == 100
    q = ddim_timesteps(1000, 100, "quad")
    assert q[0] == 0 and q[-1] == 800 and all(a <= b for a, b in zip(q, q[1:]))


def test_ddim_eta1_1000_steps_matches_ddpm_in_distribution():
    s = Schedule.linear()
    f = gaussian_eps(s)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    x1 = ddim_sample(f, torch.randn(4000, 1, 2, 2, generator=g1, dtype=torch.float64), s,
                     ddim_timesteps(1000, 1000, "uniform"), eta=1.0, generator=g1)
    x2 = ddpm_sample(f, torch.randn(4000, 1, 2, 2, generator=g2, dtype=torch.float64), s,
                     variance="fixedsmall", clip_x0=False, generator=g2)
    for x in (x1, x2):
        assert abs(x.mean().item() - MU) < 0.02
        assert abs(x.std().item() - SD) < 0.02
    assert abs(x1.mean().item() - x2.mean().item()) < 0.025
    assert abs(x1.std().item() - x2.std().item()) < 0.02


def test_ddim_deterministic_and_correct():
    s = Schedule.linear()
    f = gaussian_eps(s)
    x0 = torch.randn(8000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = ddim_sample(f, x0.clone(), s, ddim_timesteps(1000, 100, "trailing"))
    b = ddim_sample(f, x0.clone(), s, ddim_timesteps(1000, 100, "trailing"))
    assert torch.equal(a, b)
    assert abs(a.mean().item() - MU) < 0.02 and abs(a.std().item() - SD) < 0.02


def test_generate_is_seeded_and_batched():
    s = Schedule.linear()
    f = lambda x, t: torch.zeros_like(x)  # noqa: E731
    a = generate(f, 10, (1, 4, 4), s, steps=5, batch_size=4, seed=3)
    b = generate(f, 10, (1, 4, 4), s, steps=5, batch_size=4, seed=3)
    c = generate(f, 10, (1, 4, 4), s, steps=5, batch_size=4, seed=4)
    assert a.shape == (10, 1, 4, 4) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_bf16_sampling_path_is_close_to_fp32():
    from ebdiff.backbones import autocast_eps, build_model, eps_fn

    torch.manual_seed(0)
    m = build_model("tiny").eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        ref = eps_fn(m)(x, t)
        low = autocast_eps(eps_fn(m), "cpu")(x, t)
    assert low.dtype == torch.float32 and not torch.equal(low, ref)
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


def test_fixed_batch_eps_pads_without_changing_rows():
    from ebdiff.backbones import build_model, eps_fn, fixed_batch_eps

    torch.manual_seed(0)
    f = eps_fn(build_model("tiny").eval())
    seen = []

    def spy(x, t):
        seen.append(x.shape[0])
        return f(x, t)

    x, t = torch.randn(3, 1, 32, 32), torch.tensor([5, 500, 999])
    with torch.no_grad():
        ref = f(x, t)
        out = fixed_batch_eps(spy, 4)(x, t)
        full = fixed_batch_eps(spy, 4)(torch.randn(4, 1, 32, 32), torch.tensor([1, 2, 3, 4]))
    assert seen == [4, 4] and out.shape == ref.shape and full.shape[0] == 4
    assert torch.allclose(out, ref, atol=1e-5)


def test_sample_compile_auto_policy():
    from ebdiff.config import SampleConfig
    from ebdiff.evaluate.evaluate import COMPILE_MIN_CALLS, sample_compile_mode

    long_job = SampleConfig(n=10_000, batch_size=256, steps=100)  # 40 batches x 100 steps
    assert sample_compile_mode(long_job, "cuda") == "reduce-overhead"
    assert sample_compile_mode(long_job, "cpu") == "none"
    assert sample_compile_mode(SampleConfig(n=64, steps=100), "cuda") == "none"  # 100 calls: not worth a compile
    assert sample_compile_mode(SampleConfig(n=256 * 20, batch_size=256, steps=100), "cuda") == "reduce-overhead"
    assert 20 * 100 >= COMPILE_MIN_CALLS
    assert sample_compile_mode(SampleConfig(compile="default"), "cpu") == "default"
