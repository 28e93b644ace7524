"""Step math against independent references: torch.distributions.Normal, diffusers' Euler step, closed forms."""

import math

import pytest
import torch
from torch.distributions import Normal

from genalign import sde


def _normal_mean_logp(x, mean, std):
    """Reference: Normal log-density averaged over non-batch elements."""
    std_b = std.reshape(-1, *([1] * (x.ndim - 1))).expand_as(x)
    return Normal(mean, std_b).log_prob(x).flatten(1).mean(1)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g)
    v = torch.randn(3, 4, 5, 5, generator=g)
    return x, v


def test_flow_sde_step_matches_closed_form_and_normal(batch):
    x, v = batch
    s, s_next, a = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.0]), 0.7
    out = sde.flow_sde_step(v, x, s, s_next, a, generator=torch.Generator().manual_seed(1))
    sig_t = a * torch.sqrt(s / (1 - s))
    dt = (s_next - s).view(-1, 1, 1, 1)
    mean = x + (v + (sig_t**2 / (2 * s)).view(-1, 1, 1, 1) * (x + (1 - s).view(-1, 1, 1, 1) * v)) * dt
    std = sig_t * torch.sqrt(s - s_next)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, std)
    torch.testing.assert_close(out.log_prob, _normal_mean_logp(out.prev_sample, mean, std))
    assert out.log_prob.shape == (3,)


def test_flow_sde_sum_reduction_is_true_density(batch):
    x, v = batch
    out = sde.flow_sde_step(v, x, 0.6, 0.4, 0.8, reduction="sum")
    ref = Normal(out.mean, out.std.view(-1, 1, 1, 1).expand_as(x)).log_prob(out.prev_sample).flatten(1).sum(1)
    torch.testing.assert_close(out.log_prob, ref)


def test_flow_sde_sigma_one_uses_next_sigma_in_denominator(batch):
    x, v = batch
    out = sde.flow_sde_step(v, x, 1.0, 0.9, 0.7)
    expected_std = 0.7 * math.sqrt(1.0 / (1 - 0.9)) * math.sqrt(0.1)
    torch.testing.assert_close(out.std, torch.full((3,), expected_std))
    assert torch.isfinite(out.log_prob).all()


def test_scoring_a_given_sample_does_not_resample(batch):
    x, v = batch
    target = torch.randn_like(x)
    out = sde.flow_sde_step(v, x, 0.5, 0.4, 0.7, prev_sample=target)
    assert out.prev_sample is target
    torch.testing.assert_close(out.log_prob, _normal_mean_logp(target, out.mean, out.std))


def test_noise_level_zero_equals_diffusers_euler(batch):
    from diffusers import FlowMatchEulerDiscreteScheduler

    x, v = batch
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(6)
    for i, t in enumerate(sched.timesteps):
        ref = sched.step(v, t, x, return_dict=False)[0]
        s, s_next = sched.sigmas[i], sched.sigmas[i + 1]
        for step in (sde.flow_sde_step, sde.cps_step):
            out = step(v, x, s, s_next, 0.0)
            torch.testing.assert_close(out.prev_sample, ref, rtol=1e-5, atol=1e-6)
            assert torch.all(out.log_prob == 0) and torch.all(out.std == 0)


def test_cps_step_against_normal(batch):
    x, v = batch
    s, s_next, a = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.7, 0.4, 0.1]), 0.8
    out = sde.cps_step(v, x, s, s_next, a, generator=torch.Generator().manual_seed(3))
    std = s_next * math.sin(a * math.pi / 2)
    x0 = x - s.view(-1, 1, 1, 1) * v
    x1 = x + (1 - s).view(-1, 1, 1, 1) * v
    mean = (1 - s_next).view(-1, 1, 1, 1) * x0 + torch.sqrt(s_next**2 - std**2).view(-1, 1, 1, 1) * x1
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, std)
    torch.testing.assert_close(out.log_prob, _normal_mean_logp(out.prev_sample, mean, std))


def test_cps_last_step_is_deterministic(batch):
    x, v = batch
    out = sde.cps_step(v, x, 0.2, 0.0, 0.8)
    assert torch.all(out.std == 0)
    torch.testing.assert_close(out.prev_sample, x - 0.2 * v)


def test_ddim_step_against_normal_and_diffusers(batch):
    from diffusers import DDIMScheduler

    x, eps = batch
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    sched.set_timesteps(10)
    t, t_prev = int(sched.timesteps[2]), int(sched.timesteps[3])
    ab, ab_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[t_prev]
    out = sde.ddim_step(eps, x, ab, ab_prev, 1.0, generator=torch.Generator().manual_seed(0))
    var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    torch.testing.assert_close(out.std, torch.sqrt(var).expand(3))
    torch.testing.assert_close(out.log_prob, _normal_mean_logp(out.prev_sample, out.mean, out.std))
    # diffusers' DDIM with eta=1 and our noise gives the same sample
    noise = (out.prev_sample - out.mean) / out.std.view(-1, 1, 1, 1)
    ref = sched.step(eps, t, x, eta=1.0, variance_noise=noise, return_dict=False)[0]
    torch.testing.assert_close(out.prev_sample, ref, rtol=1e-4, atol=1e-5)
    # eta = 0 is deterministic DDIM
    det = sde.ddim_step(eps, x, ab, ab_prev, 0.0)
    torch.testing.assert_close(det.prev_sample, sched.step(eps, t, x, eta=0.0, return_dict=False)[0], rtol=1e-4, atol=1e-5)


def test_gaussian_kl_closed_form():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    std = torch.tensor([0.5, 1.0, 2.0, 0.1])
    kl = sde.gaussian_kl(a, b, std)
    # independent reference: KL of factorised Normals, averaged over elements
    s = std.view(-1, 1, 1).expand_as(a)
    ref = torch.distributions.kl_divergence(Normal(a, s), Normal(b, s)).flatten(1).mean(1)
    torch.testing.assert_close(kl, ref)
    assert torch.all(sde.gaussian_kl(a, a, std) == 0)


def test_per_sample_and_scalar_sigmas_agree(batch):
    x, v = batch
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    scalar = sde.flow_sde_step(v, x, 0.5, 0.4, 0.7, generator=g1)
    per = sde.flow_sde_step(v, x, torch.full((3,), 0.5), torch.full((3,), 0.4), 0.7, generator=g2)
    torch.testing.assert_close(scalar.prev_sample, per.prev_sample)
    # mixed steps in one batch equal separate calls
    s, s_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.1])
    mixed = sde.flow_sde_step(v, x, s, s_next, 0.7, prev_sample=x * 0.9)
    for i in range(3):
        one = sde.flow_sde_step(v[i:i + 1], x[i:i + 1], s[i], s_next[i], 0.7, prev_sample=x[i:i + 1] * 0.9)
        torch.testing.assert_close(mixed.log_prob[i:i + 1], one.log_prob)


@pytest.mark.parametrize("step", [sde.flow_sde_step, sde.cps_step])
def test_bad_inputs_raise_clear_errors(step, batch):
    x, v = batch
    with pytest.raises(ValueError, match="does not match sample shape"):
        step(v[:, :2], x, 0.5, 0.4, 0.7)
    with pytest.raises(ValueError, match=r"sigma must lie in \[0, 1\]"):
        step(v, x, 1.5, 0.4, 0.7)
    with pytest.raises(ValueError, match="sigma_next must be smaller than sigma"):
        step(v, x, 0.4, 0.5, 0.7)
    with pytest.raises(ValueError, match="noise_level"):
        step(v, x, 0.5, 0.4, -0.1)
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        step(v, x, torch.tensor([0.5, 0.5]), 0.4, 0.7)


def test_ddim_bad_alpha_raises(batch):
    x, eps = batch
    with pytest.raises(ValueError, match="alpha_bar_prev"):
        sde.ddim_step(eps, x, 0.5, 0.4, 1.0)
