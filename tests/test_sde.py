"""Step math against independent references: torch.distributions.Normal, diffusers' Euler step, closed forms."""

import json
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
    _check_reverse_sde(out, x, v, s, s_next, a * torch.sqrt(s / (1 - s)))
    assert out.log_prob.shape == (3,)


def _check_reverse_sde(out, x, v, s, s_next, sig_t):
    """``out`` is the Euler-Maruyama reverse-SDE step with diffusion coefficient ``sig_t`` (closed form, written
    out per element) and its log-prob the Normal density of its sample."""
    dt = (s_next - s).view(-1, 1, 1, 1)
    sig_t = torch.as_tensor(sig_t, dtype=s.dtype).expand_as(s)
    mean = x + (v + (sig_t**2 / (2 * s)).view(-1, 1, 1, 1) * (x + (1 - s).view(-1, 1, 1, 1) * v)) * dt
    std = sig_t * torch.sqrt(s - s_next)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, std)
    torch.testing.assert_close(out.log_prob, _normal_mean_logp(out.prev_sample, mean, std))


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


# ---------------------------------------------------------------------------------------------------------
# The one-pass implementation against the straightforward per-element formulas (the previous implementation,
# written out here): every full-size quantity materialised, the log-density evaluated per element, masked
# per element where std == 0, then reduced.

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _col(t, like):
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def _ref_mean_std(kind, v, x, s, s_next, a):
    """Per-element mean and [B] std of a step, in the inputs' dtype."""
    if kind == "sde":
        denom = torch.where(s >= 1, s_next, s)
        sig = a * torch.sqrt(s / (1 - denom))
        dt = s_next - s
        drift = v + _col(sig**2 / (2 * s), x) * (x + _col(1 - s, x) * v)
        return x + drift * _col(dt, x), sig * torch.sqrt(-dt)
    if kind == "cps":
        std = s_next * torch.sin(a * math.pi / 2)
        x0 = x - _col(s, x) * v
        x1 = x + _col(1 - s, x) * v
        keep = torch.sqrt(torch.clamp(s_next**2 - std**2, min=0))
        return _col(1 - s_next, x) * x0 + _col(keep, x) * x1, std
    # ddim: s, s_next are alpha_bar, alpha_bar_prev; a is eta
    ab, ab_prev = s, s_next
    x0 = (x - _col(torch.sqrt(1 - ab), x) * v) / _col(torch.sqrt(ab), x)
    std = a * torch.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    dir_coef = torch.sqrt(torch.clamp(1 - ab_prev - std**2, min=0))
    return _col(torch.sqrt(ab_prev), x) * x0 + _col(dir_coef, x) * v, std


def _ref_log_prob(x, mean, std, reduction):
    """Element-wise Gaussian log-density, 0 where std == 0, then reduced."""
    std_b = _col(std, x)
    det = std_b == 0
    safe = torch.where(det, torch.ones_like(std_b), std_b)
    elem = -((x - mean) ** 2) / (2 * safe**2) - torch.log(safe) - LOG_SQRT_2PI
    elem = torch.where(det, torch.zeros_like(elem), elem)
    return elem.flatten(1).mean(1) if reduction == "mean" else elem.flatten(1).sum(1)


def _schedule(kind, dtype):
    """Per-sample schedule values for a batch of 5 with noise level 0 on two samples; the SDE batch has the
    first step (s = 1), the CPS batch has the final step onto s' = 0 (std 0 although a > 0)."""
    a = torch.tensor([0.7, 0.0, 0.5, 0.0, 0.9], dtype=dtype)
    if kind == "sde":
        s = torch.tensor([1.0, 0.9, 0.6, 0.3, 0.25], dtype=dtype)
        s_next = torch.tensor([0.95, 0.8, 0.45, 0.1, 0.2], dtype=dtype)
    elif kind == "cps":
        s = torch.tensor([1.0, 0.9, 0.6, 0.3, 0.25], dtype=dtype)
        s_next = torch.tensor([0.95, 0.8, 0.45, 0.1, 0.0], dtype=dtype)
    else:
        s = torch.tensor([0.05, 0.2, 0.5, 0.7, 0.9], dtype=dtype)  # alpha_bar
        s_next = torch.tensor([0.2, 0.4, 0.6, 0.95, 0.99], dtype=dtype)  # alpha_bar_prev
        a = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0], dtype=dtype)  # eta
    return s, s_next, a


STEPS = {"sde": sde.flow_sde_step, "cps": sde.cps_step, "ddim": sde.ddim_step}
RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _inputs(dtype, shape=(5, 4, 6, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype),
            torch.randn(shape, generator=g, dtype=dtype))


def _close(actual, expected, dtype):
    """~1e-6 relative (float32) / 1e-12 (float64), relative to the largest entry for near-zero ones."""
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual, expected, rtol=RTOL[dtype], atol=RTOL[dtype] * float(scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["sde", "cps", "ddim"])
def test_one_pass_step_equals_per_element_formulas(kind, reduction, dtype):
    x, v, other = _inputs(dtype)
    s, s_next, a = _schedule(kind, dtype)
    mean_ref, std_ref = _ref_mean_std(kind, v, x, s, s_next, a)
    assert (std_ref == 0).sum() >= 2 and (std_ref > 0).sum() >= 2
    # scoring: a given sample near the mean (some log-probs of either sign) and one far from it
    for target in (mean_ref + _col(std_ref, x) * other, x):
        out = STEPS[kind](v, x, s, s_next, a, prev_sample=target, reduction=reduction)
        assert out.mean.dtype == dtype and out.log_prob.dtype == dtype and out.log_prob.shape == (5,)
        _close(out.mean, mean_ref, dtype)
        _close(out.std, std_ref, dtype)
        _close(out.log_prob, _ref_log_prob(target, mean_ref, std_ref, reduction), dtype)
        assert torch.all(out.log_prob[std_ref == 0] == 0)
    # sampling: same generator -> the reference's sample, scored like the reference scores it
    out = STEPS[kind](v, x, s, s_next, a, generator=torch.Generator().manual_seed(7), reduction=reduction)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
    _close(out.prev_sample, mean_ref + _col(std_ref, x) * noise, dtype)
    assert torch.equal(out.prev_sample[std_ref == 0], out.mean[std_ref == 0])
    _close(out.log_prob, _ref_log_prob(out.prev_sample, mean_ref, std_ref, reduction), dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["sde", "cps", "ddim"])
def test_log_prob_is_normal_density_where_std_positive(kind, reduction):
    x, v, _ = _inputs(torch.float64)
    s, s_next, a = _schedule(kind, torch.float64)
    out = STEPS[kind](v, x, s, s_next, a, generator=torch.Generator().manual_seed(1), reduction=reduction)
    pos = out.std > 0
    elem = Normal(out.mean[pos], _col(out.std[pos], x).expand_as(out.mean[pos])).log_prob(out.prev_sample[pos])
    ref = elem.flatten(1).mean(1) if reduction == "mean" else elem.flatten(1).sum(1)
    torch.testing.assert_close(out.log_prob[pos], ref, rtol=1e-12, atol=1e-12)
    assert torch.all(out.log_prob[~pos] == 0)


def test_sampled_log_prob_is_reproduced_exactly_when_scoring():
    """Sampling scores ``prev_sample - mean`` like scoring does, so a recomputation is bit-identical (scoring
    ``std * noise`` instead would differ in the last bits: ``(mean + std * noise) - mean`` is rounded)."""
    x, v, _ = _inputs(torch.float32, shape=(3, 4, 16, 16))
    x = 30 * x  # large means and small steps: rounding of mean + std * noise is visible
    for kind in ("sde", "cps"):
        s, s_next, a = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.89, 0.49, 0.19]), torch.tensor([0.7, 0.0, 0.9])
        for reduction in ("mean", "sum"):
            out = STEPS[kind](v, x, s, s_next, a, generator=torch.Generator().manual_seed(2), reduction=reduction)
            again = STEPS[kind](v, x, s, s_next, a, prev_sample=out.prev_sample, reduction=reduction)
            assert torch.equal(out.log_prob, again.log_prob)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_per_sample_noise_level_zero_equals_diffusers_euler(kind):
    from diffusers import FlowMatchEulerDiscreteScheduler

    x, v, _ = _inputs(torch.float32, shape=(4, 4, 5, 5))
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(6)
    a = torch.tensor([0.0, 0.8, 0.0, 0.5])
    for i, t in enumerate(sched.timesteps):
        ref = sched.step(v, t, x, return_dict=False)[0]
        s, s_next = sched.sigmas[i].expand(4), sched.sigmas[i + 1].expand(4)
        out = STEPS[kind](v, x, s, s_next, a, generator=torch.Generator().manual_seed(i))
        zero = a == 0
        torch.testing.assert_close(out.prev_sample[zero], ref[zero], rtol=1e-6, atol=1e-6)
        assert torch.all(out.log_prob[zero] == 0) and torch.all(out.std[zero] == 0)
        if i < len(sched.timesteps) - 1 or kind == "sde":  # CPS onto s' = 0 is deterministic at any level
            assert torch.all(out.std[~zero] > 0)
            assert not torch.allclose(out.prev_sample[~zero], ref[~zero], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["sde", "cps", "ddim"])
def test_log_prob_gradient_wrt_velocity_matches_reference_autograd(kind, reduction, dtype):
    x, v, other = _inputs(dtype)
    s, s_next, a = _schedule(kind, dtype)
    mean0, std0 = _ref_mean_std(kind, v, x, s, s_next, a)
    target = mean0 + _col(std0, x) * other + 0.1 * x  # off the mean, so the gradient is not ~0
    weights = torch.linspace(-1.0, 2.0, 5, dtype=dtype)

    v1 = v.clone().requires_grad_(True)
    out = STEPS[kind](v1, x, s, s_next, a, prev_sample=target, reduction=reduction)
    (out.log_prob * weights).sum().backward()

    v2 = v.clone().requires_grad_(True)
    mean_ref, std_ref = _ref_mean_std(kind, v2, x, s, s_next, a)
    (_ref_log_prob(target, mean_ref, std_ref, reduction) * weights).sum().backward()

    assert torch.isfinite(v1.grad).all()
    assert v2.grad.abs().max() > 0
    _close(v1.grad, v2.grad, dtype)
    assert torch.all(v1.grad[std_ref == 0] == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_kl_zero_std_is_zero_and_finite(reduction):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, 5, generator=g, requires_grad=True)
    b = torch.randn(4, 3, 5, generator=g)
    std = torch.tensor([0.5, 0.0, 2.0, 0.0])
    kl = sde.gaussian_kl(a, b, std, reduction=reduction)
    assert torch.all(torch.isfinite(kl)) and torch.all(kl[std == 0] == 0)
    pos = std > 0
    s = std[pos].view(-1, 1, 1).expand_as(a[pos])
    elem = torch.distributions.kl_divergence(Normal(a[pos], s), Normal(b[pos], s)).flatten(1)
    torch.testing.assert_close(kl[pos], elem.mean(1) if reduction == "mean" else elem.sum(1))
    kl.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.all(a.grad[~pos] == 0) and a.grad[pos].abs().max() > 0
    # scalar std 0 (every entry deterministic)
    assert torch.equal(sde.gaussian_kl(a, b, 0.0, reduction=reduction), torch.zeros(4))


def test_dtype_behaviour_float32_or_wider():
    x, v, _ = _inputs(torch.float32)
    s, s_next, a = _schedule("sde", torch.float32)
    low = sde.flow_sde_step(v.bfloat16(), x.bfloat16(), s, s_next, a, prev_sample=x.bfloat16())
    assert low.mean.dtype == torch.float32 and low.log_prob.dtype == torch.float32 and low.std.dtype == torch.float32
    ref_mean, ref_std = _ref_mean_std("sde", v.bfloat16().float(), x.bfloat16().float(), s, s_next, a)
    _close(low.log_prob, _ref_log_prob(x.bfloat16().float(), ref_mean, ref_std, "mean"), torch.float32)
    wide = sde.cps_step(v.double(), x.double(), 0.5, 0.4, 0.7)
    assert wide.mean.dtype == torch.float64 and wide.log_prob.dtype == torch.float64


class _OpLog:
    """Records the ATen ops a call runs (after autograd, before the kernels) with their output sizes."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        log = self.ops = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
                is_view = all(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
                log.append((func.overloadpacket.__name__, [o.numel() for o in outs], is_view))
                return out

        self.mode = Mode()


@pytest.mark.parametrize("kind", ["sde", "cps", "ddim"])
def test_step_has_no_host_sync_and_one_full_size_pass_for_the_log_prob(kind):
    x, v, other = _inputs(torch.float32)
    s, s_next, a = _schedule(kind, torch.float32)
    full = x.numel()
    log = _OpLog()
    with log.mode:
        STEPS[kind](v, x, s, s_next, a, prev_sample=other, validate=False)
    names = [n for n, _, _ in log.ops]
    assert "_local_scalar_dense" not in names and "item" not in names  # no device -> host copies
    full_writes = [n for n, sizes, view in log.ops if not view and full in sizes]
    # the mean (x * c_x, then + v * c_v in place) and the squared difference: nothing else full-size
    assert len(full_writes) == 3, full_writes
    log = _OpLog()
    with log.mode:
        sde.gaussian_kl(x, other, torch.tensor([0.5, 0.0, 1.0, 0.0, 2.0]))
    assert [n for n, sizes, view in log.ops if not view and full in sizes] == ["mse_loss"]


def test_dance_sde_step_matches_closed_form_normal_and_the_flow_sde_at_the_same_coefficient(batch):
    """Dance-SDE (constant eta): the closed form of docs/algorithms.md §1.6, the exact Normal density, and the
    Flow-GRPO step whose noise level makes a sqrt(s / (1 - s)) equal eta; eta = 0 is diffusers' Euler step."""
    x, v = batch
    s, s_next, eta = torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.0]), 0.6
    out = sde.dance_sde_step(v, x, s, s_next, eta, generator=torch.Generator().manual_seed(1))
    _check_reverse_sde(out, x, v, s, s_next, eta)
    # the Flow-GRPO step with a per-sample a = eta / sqrt(s / (1 - s)) is the same transition (s < 1 only)
    a = eta / torch.sqrt(s[1:] / (1 - s[1:]))
    flow = sde.flow_sde_step(v[1:], x[1:], s[1:], s_next[1:], a, prev_sample=out.prev_sample[1:])
    torch.testing.assert_close(flow.mean, out.mean[1:])
    torch.testing.assert_close(flow.log_prob, out.log_prob[1:])
    ode = sde.dance_sde_step(v, x, s, s_next, 0.0)
    torch.testing.assert_close(ode.mean, x + v * (s_next - s).view(-1, 1, 1, 1))
    assert torch.all(ode.log_prob == 0) and torch.equal(ode.prev_sample, ode.mean)
    assert sde.flow_step("dance") is sde.dance_sde_step


def test_dance_steps_train_a_digits_epoch_with_first_ratio_one(tmp_path):
    from genalign.config import load_config
    from genalign.trainer import Trainer

    cfg = load_config("configs/digits_flow_grpo.yaml", [
        f"output_dir={tmp_path / 'run'}", "num_epochs=1", "sampling.step_kind=dance", "sampling.noise_level=0.5",
        "sampling.groups_per_epoch=2", "sampling.group_size=8", "sampling.batch_size=16", "train.batch_size=8",
        "train.num_minibatches=2", "eval_prompts_file=null"])
    from genalign.rollout import gather_steps, recompute_step

    tr = Trainer(cfg)
    traj = tr.sample_epoch(0)[0]
    assert traj.step_kind == "dance" and (traj.stds[:, :-1] > 0).all()
    with torch.no_grad():  # before any update the recomputed log-probs are the rollout's: ratio exactly 1
        for j in range(cfg.sampling.num_steps - 1):
            steps = torch.full((len(traj),), j)
            assert torch.equal(recompute_step(tr.policy, traj, steps).log_prob, gather_steps(traj.log_probs, steps))
    before = [p.detach().clone() for p in tr.params]
    tr.train()
    assert any((p - b).abs().max() > 0 for p, b in zip(tr.params, before))
    assert json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())["epoch"] == 1
