import math

import pytest
import torch

from genalign import losses as L
from genalign.losses import aggregate, kl_divergence, log_ratio, policy_loss, ppo_clip


def _batch(seed=0, B=4, T=5):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=g)
    logp = (old + 0.3 * torch.randn(B, T, generator=g)).requires_grad_(True)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    adv = torch.randn(B, generator=g)
    return logp, old, adv, mask


# ---------------------------------------------------------------------------------------------------
# surrogates


def test_ppo_clip_hand_computed():
    ratio = torch.tensor([[0.5, 1.0, 1.5, 0.5, 1.5, 4.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]])
    out = ppo_clip(ratio, adv, eps_low=0.2, eps_high=0.3, return_clipped=True)
    # A>0: max(-r, -clip(r)) ; A<0: max(r, clip(r))
    torch.testing.assert_close(out.loss, torch.tensor([[-0.5, -1.0, -1.3, 0.8, 1.5, 4.0]]))
    assert out.clipped.tolist() == [[False, False, True, True, False, False]]
    dual = ppo_clip(ratio, adv, 0.2, 0.3, dual_clip=3.0, return_clipped=True)
    torch.testing.assert_close(dual.loss, torch.tensor([[-0.5, -1.0, -1.3, 0.8, 1.5, 3.0]]))
    assert dual.clipped[0, 5]
    # per-token eps tensors and [B] advantages broadcast
    eps = torch.tensor([[0.1, 0.1, 0.6, 0.1, 0.1, 0.1]])
    loss = ppo_clip(ratio, torch.tensor([1.0]), eps, eps)
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -1.0, -1.5, -0.5, -1.1, -1.1]]))


def test_cispo_keeps_gradient_through_clipped_weight():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    ratio = torch.tensor([[2.0, 0.5]])
    out = L.cispo(ratio, torch.tensor([1.0]), logp, eps_high=0.2, return_clipped=True)
    torch.testing.assert_close(out.loss, torch.zeros(1, 2))
    out.loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.2, -0.5]]))  # -A * sg(clip(r)), no lower bound
    assert out.clipped.tolist() == [[True, False]]


# ---------------------------------------------------------------------------------------------------
# ratios


def test_log_ratio_levels():
    logp = torch.tensor([[1.0, 2.0, 100.0], [0.0, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    tok = log_ratio(logp, old, mask)
    torch.testing.assert_close(tok, torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]))
    seq = log_ratio(logp, old, mask, "sequence")
    torch.testing.assert_close(seq, torch.tensor([[1.0, 1.0, 0.0], [-1 / 3] * 3]))
    st = log_ratio(logp, old, mask, "sequence_token")
    torch.testing.assert_close(st, seq)
    st.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="sequence_token"):
        log_ratio(logp, old, mask, "seq")


def test_gspo_equal_token_ratios_equals_token_ppo():
    old = torch.randn(3, 4)
    delta = torch.tensor([0.05, -0.3, 0.4]).unsqueeze(1).expand(3, 4)
    adv = torch.tensor([1.0, -1.0, 0.5])
    results = {}
    for level in ("token", "sequence", "sequence_token"):
        logp = (old + delta).clone().requires_grad_(True)
        loss, stats = policy_loss(logp, old, adv, ratio_level=level, eps_low=0.2)
        loss.backward()
        results[level] = (loss.detach(), logp.grad, stats["clip_frac"])
    for level in ("sequence", "sequence_token"):
        torch.testing.assert_close(results[level][0], results["token"][0])
        torch.testing.assert_close(results[level][2], results["token"][2])
    torch.testing.assert_close(results["sequence_token"][1], results["token"][1])


# ---------------------------------------------------------------------------------------------------
# aggregation


def test_aggregate_modes_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(aggregate(loss, mask, "token_mean"), torch.tensor(18.0 / 5))
    torch.testing.assert_close(aggregate(loss, mask, "seq_mean_token_mean"), torch.tensor((1.5 + 5.0) / 2))
    torch.testing.assert_close(aggregate(loss, mask, "seq_mean_token_sum"), torch.tensor(18.0 / 2))
    torch.testing.assert_close(aggregate(loss, mask, "constant"), torch.tensor(18.0 / (2 * 3)))
    torch.testing.assert_close(aggregate(loss, mask, "constant", normalizer=10), torch.tensor(18.0 / 20))
    torch.testing.assert_close(aggregate(loss, None, "token_mean"), loss.mean())
    with pytest.raises(ValueError) as err:
        aggregate(loss, mask, "sum")
    assert "token_mean" in str(err.value) and "constant" in str(err.value)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"])
def test_accumulation_with_global_counts_equals_full_batch(mode):
    logp, old, adv, mask = _batch(B=6, T=5)
    ref = old - 0.1 * torch.arange(5.0)
    kw = dict(aggregation=mode, eps_low=0.2, eps_high=0.28, kl_kind="k3", kl_coef=0.1)
    full, _ = policy_loss(logp, old, adv, mask, ref_logp=ref, **kw)
    (g_full,) = torch.autograd.grad(full, logp)
    counts = dict(num_tokens=mask.sum(), num_seqs=6, normalizer=5)
    total = 0.0
    for i in (0, 2, 4):
        sl = slice(i, i + 2)
        total = total + policy_loss(logp[sl], old[sl], adv[sl], mask[sl], ref_logp=ref[sl], **kw, **counts)[0]
    (g_acc,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(g_acc, g_full)


# ---------------------------------------------------------------------------------------------------
# KL


def test_kl_kinds_hand_computed():
    logp = torch.tensor([0.0, -1.0])
    ref = torch.tensor([-1.0, 0.0])  # d = ref - logp = [-1, 1]
    torch.testing.assert_close(kl_divergence(logp, ref, "k1"), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(kl_divergence(logp, ref, "k2"), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(kl_divergence(logp, ref, "k3"), torch.tensor([math.exp(-1) + 1 - 1, math.e - 1 - 1]))
    with pytest.raises(ValueError, match="k3"):
        kl_divergence(logp, ref, "k4")


def test_kl_k3_matches_true_kl_in_expectation():
    p = torch.distributions.Normal(0.0, 1.0)
    q = torch.distributions.Normal(0.3, 1.0)
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    est = kl_divergence(p.log_prob(x), q.log_prob(x), "k3").mean()
    assert abs(est.item() - torch.distributions.kl_divergence(p, q).item()) < 5e-3


# ---------------------------------------------------------------------------------------------------
# policy_loss


def test_policy_loss_hand_computed_and_stats():
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.1]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    loss, stats = policy_loss(logp, old, adv, eps_low=0.2)
    # per-token: [-1.2, -1.0], [0.8, 1.1]  -> token mean
    torch.testing.assert_close(loss, torch.tensor((-1.2 - 1.0 + 0.8 + 1.1) / 4))
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(0.5))
    torch.testing.assert_close(stats["clip_frac_pos"], torch.tensor(0.5))
    torch.testing.assert_close(stats["clip_frac_neg"], torch.tensor(0.5))
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor(1.025))
    assert all(not v.requires_grad for v in stats.values())
    assert set(stats) >= {"ratio_mean", "ratio_std", "clip_frac", "clip_frac_pos", "clip_frac_neg", "approx_kl", "kl"}


def test_policy_loss_first_step_ratio_one_and_kl_sources():
    logp, old, adv, mask = _batch()
    logp0 = old.clone().requires_grad_(True)
    loss, stats = policy_loss(logp0, old, adv, mask)
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor(1.0))
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(0.0))
    assert stats["clip_frac"] == 0
    # at ratio 1 the surrogate value is -mean(A) over valid tokens
    torch.testing.assert_close(loss, -(adv[:, None].expand_as(mask) * mask).sum() / mask.sum())
    # precomputed KL (e.g. sde.gaussian_kl per step) == kl_kind route when equal
    ref = old - 0.2
    per_tok = kl_divergence(logp, ref, "k3")
    a, _ = policy_loss(logp, old, adv, mask, ref_logp=ref, kl_kind="k3", kl_coef=0.5)
    b, s = policy_loss(logp, old, adv, mask, kl=per_tok, kl_coef=0.5)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(s["kl"], L.masked_mean(per_tok, mask).detach())
    with pytest.raises(ValueError, match="kl"):
        policy_loss(logp, old, adv, mask, kl_coef=0.1)
    # per-step [B] KL broadcast (diffusion: one KL per sample and step)
    c, _ = policy_loss(logp, old, adv, mask, kl=torch.ones(4), kl_coef=1.0)
    d, _ = policy_loss(logp, old, adv, mask)
    torch.testing.assert_close(c, d + 1.0)
    assert L.gaussian_kl is not None


def test_policy_loss_weights_and_nan_padding():
    logp, old, adv, mask = _batch()
    w = torch.rand(4, 5)
    loss, _ = policy_loss(logp, old, adv, mask, weights=w, aggregation="seq_mean_token_sum")
    ratio = torch.exp(logp - old)
    per_tok = ppo_clip(ratio, adv, 0.2)
    torch.testing.assert_close(loss, (per_tok * w * mask).sum() / 4)
    # garbage in padded positions does not leak into loss or gradient
    bad = logp.detach().masked_fill(~mask, float("nan")).requires_grad_(True)
    l2, st = policy_loss(bad, old, adv, mask, ref_logp=old.masked_fill(~mask, float("inf")), kl_kind="k3", kl_coef=0.1)
    l2.backward()
    assert torch.isfinite(l2) and torch.isfinite(bad.grad).all()
    assert all(torch.isfinite(v) for v in st.values())


def test_surrogate_registry():
    with pytest.raises(ValueError) as err:
        L.get_surrogate("ppo")
    assert "ppo_clip" in str(err.value) and "cispo" in str(err.value)
    with pytest.raises(ValueError, match="already registered"):
        L.register_surrogate("ppo_clip")(lambda *a, **k: None)
    with pytest.raises(ValueError, match="already registered"):
        L.register_aggregation("token_mean")(lambda *a: None)
    logp, old, adv, mask = _batch()
    # a callable surrogate with the registry signature
    custom = lambda log_r, a, lp, **kw: L.SurrogateOutput(-a * torch.exp(log_r), torch.zeros_like(lp, dtype=torch.bool))
    loss, _ = policy_loss(logp, old, adv, mask, surrogate=custom)
    torch.testing.assert_close(loss, L.masked_mean(-adv[:, None] * torch.exp(logp - old), mask))


# ---------------------------------------------------------------------------------------------------
# HAPO


def test_hapo_zero_entropy_score_equals_dapo_clip():
    logp, old, adv, mask = _batch(B=4, T=6)
    noise = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))  # seeded: the global RNG is not
    logp = (old + 0.5 * noise).requires_grad_(True)  # large moves so clipping acts
    zero = torch.zeros(4, 6)
    kw = dict(eps_low=0.2, eps_high=0.28)
    hapo, s_h = policy_loss(logp, old, adv, mask, surrogate="hapo", entropy_score=zero, **kw)
    (g_h,) = torch.autograd.grad(hapo, logp)
    dapo, s_d = policy_loss(logp, old, adv, mask, **kw)
    (g_d,) = torch.autograd.grad(dapo, logp)
    torch.testing.assert_close(hapo, dapo)
    torch.testing.assert_close(g_h, g_d)
    assert s_d["clip_frac"] > 0
    torch.testing.assert_close(s_h["clip_frac"], s_d["clip_frac"])


def test_hapo_bounds_and_redistribution_hand_computed():
    h = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0]])
    low, high = L.hapo_clip_bounds(h, eps_low=0.2, eps_high=0.28, alpha=1.0)
    torch.testing.assert_close(low, torch.tensor([[0.4, 0.3, 0.2, 0.2, 0.2]]))
    torch.testing.assert_close(high, torch.tensor([[0.28, 0.28, 0.28, 0.42, 0.56]]))
    ratio = torch.tensor([[1.0, 1.5, 1.0, 1.0, 1.5]])  # neutral zone (0.9, 1.14)
    out = L.hapo_redistribute(torch.tensor([2.0]), h, ratio, 0.2, 0.28, beta=1.0)
    # low entropy: scaled inside the neutral zone; high entropy: scaled outside it
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.0, 2.0, 2.0, 4.0]]))


def test_entropy_score_keeps_sign():
    ent = torch.tensor([[0.01, 0.1, 1.0, 2.0, 4.0]])
    h = L.entropy_score(ent)
    assert h[0, 0] == -1 and h[0, -1] == 1 and h[0, 2] == 0  # median token is neutral
    assert torch.all(h[0, :2] < 0) and torch.all(h[0, 3:] > 0)
    h_mask = L.entropy_score(ent, torch.tensor([[1, 1, 1, 1, 0]]))
    assert h_mask[0, -1] == 0 and h_mask.max() == 1


# ---------------------------------------------------------------------------------------------------
# preference losses


def _nls(x):
    return -math.log(1 / (1 + math.exp(-x)))


def test_dpo_and_simpo_hand_computed():
    pw, pl, rw, rl = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5])
    out = L.dpo_loss(pw, pl, rw, rl, beta=0.5)
    # d_w = 1, d_l = -0.5 -> logits 0.75
    torch.testing.assert_close(out, torch.tensor([_nls(0.75)]))
    smooth = L.dpo_loss(pw, pl, rw, rl, 0.5, 0.1)
    torch.testing.assert_close(smooth, torch.tensor([0.9 * _nls(0.75) + 0.1 * _nls(-0.75)]))
    s = L.simpo_loss(torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([2.0]), torch.tensor([3.0]), 2.0, 0.5)
    torch.testing.assert_close(s, torch.tensor([_nls(2.0 * (-2.0 + 3.0) - 0.5)]))


def test_tdpo_versions_and_sequential_kl():
    lr_w = torch.tensor([[0.5, 0.5, 9.0]])
    lr_l = torch.tensor([[-0.5, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0]])
    kl_w = torch.tensor([0.2], requires_grad=True)
    kl_l = torch.tensor([0.6], requires_grad=True)
    v1 = L.tdpo_loss(lr_w, lr_l, kl_w, kl_l, beta=0.1, version=1, chosen_mask=m)
    torch.testing.assert_close(v1, torch.tensor([_nls(0.1 * (1.5 - 0.4))]))
    v2 = L.tdpo_loss(lr_w, lr_l, kl_w, kl_l, alpha=0.5, beta=0.1, version=2, chosen_mask=m)
    torch.testing.assert_close(v2, torch.tensor([_nls(0.1 * (1.5 - 0.2))]))
    v2.sum().backward()
    assert kl_w.grad is None or kl_w.grad.abs().sum() == 0  # sg on the chosen KL in TDPO2
    logits = torch.randn(2, 3, 7)
    ref = torch.randn(2, 3, 7)
    kl = L.sequential_kl(logits, ref, torch.tensor([[1, 1, 1], [1, 0, 0]]))
    p, q = torch.distributions.Categorical(logits=ref), torch.distributions.Categorical(logits=logits)
    per = torch.distributions.kl_divergence(p, q)
    torch.testing.assert_close(kl, torch.stack([per[0].sum(), per[1, 0]]))


def test_tgdpo_and_treg():
    lr_w = torch.tensor([[0.2, 0.4]])
    lr_l = torch.tensor([[-0.2, 0.1]])
    r_w = torch.tensor([[1.0, -1.0]])
    r_l = torch.tensor([[2.0, 0.0]])
    beta, alpha = 0.5, 1.0
    logits = beta * ((1 + 0.5) * 0.2 + (1 - 0.5) * 0.4) - beta * ((1 - 1.0) * -0.2 + 1.0 * 0.1)
    torch.testing.assert_close(L.tgdpo_loss(lr_w, lr_l, r_w, r_l, alpha, beta), torch.tensor([_nls(logits)]))
    zero = torch.zeros(1, 2)
    dpo = L.dpo_loss(lr_w.sum(1), lr_l.sum(1), torch.zeros(1), torch.zeros(1), beta)
    torch.testing.assert_close(L.tgdpo_loss(lr_w, lr_l, r_w, r_l, 0.0, beta), dpo)
    torch.testing.assert_close(L.treg_loss(lr_w, lr_l, zero, zero, beta), dpo)
    reg = -(beta * ((0.2 - 0.4) / 2 + (-0.4 + 0.0) / 2))
    torch.testing.assert_close(L.treg_loss(lr_w, lr_l, r_w, r_l, beta, alpha=1.0), dpo + reg)


def test_diffusion_dpo_and_kto_hand_computed():
    lw, ll = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.10])
    rw, rl = torch.tensor([0.12, 0.25]), torch.tensor([0.18, 0.15])
    out = L.diffusion_dpo_loss(lw, ll, rw, rl, beta=10.0)
    inside = [(0.10 - 0.20) - (0.12 - 0.18), (0.30 - 0.10) - (0.25 - 0.15)]
    torch.testing.assert_close(out, torch.tensor([_nls(-5.0 * x) for x in inside]))
    model, ref = torch.tensor([0.1, 0.5, 0.3]), torch.tensor([0.2, 0.4, 0.3])
    g = [0.1, -0.1, 0.0]
    z = max(sum(g) / 3, 0.0)
    kto = L.diffusion_kto_loss(model, ref, torch.tensor([True, False, True]), beta=10.0)
    sig = lambda x: 1 / (1 + math.exp(-x))
    expected = [1 - sig(10 * (0.1 - z)), 1 - sig(-10 * (-0.1 - z)), 1 - sig(10 * (0.0 - z))]
    torch.testing.assert_close(kto, torch.tensor(expected))


def test_low_precision_logps_are_upcast():
    old = torch.zeros(2, 3, dtype=torch.bfloat16)
    logp = torch.full((2, 3), 2e-3, dtype=torch.bfloat16, requires_grad=True)
    loss, stats = policy_loss(logp, old, torch.tensor([1.0, -1.0]), eps_low=1e-4)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(stats["clip_frac_pos"], torch.tensor(1.0))  # 1 + 1e-4 is not rounded to 1
    torch.testing.assert_close(stats["clip_frac_neg"], torch.tensor(0.0))


# ---------------------------------------------------------------------------------------------------
# KTO (token level) and the Diffusion-KTO reference point


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_kto_loss_hand_computed_reference_point_and_weights():
    pol = torch.tensor([-1.0, -2.0, -3.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -3.5, -0.5])
    desirable = torch.tensor([True, False, True, False])
    kl_pol, kl_ref = torch.tensor([-2.0, -1.0], requires_grad=True), torch.tensor([-2.5, -1.1])
    out = L.kto_loss(pol, ref, desirable, kl_pol, kl_ref, beta=0.5, desirable_weight=1.3, undesirable_weight=0.7)
    # r = [0.5, -1, 0.5, 0]; z0 = mean([0.5, 0.1]) = 0.3
    expected = [1.3 * (1 - _sig(0.1)), 0.7 * (1 - _sig(0.65)), 1.3 * (1 - _sig(0.1)), 0.7 * (1 - _sig(0.15))]
    torch.testing.assert_close(out.losses, torch.tensor(expected))
    torch.testing.assert_close(out.kl, torch.tensor(0.3))
    torch.testing.assert_close(out.rewards, torch.tensor([0.25, -0.5, 0.25, 0.0]))
    out.losses.sum().backward()
    s = _sig(0.1)
    torch.testing.assert_close(pol.grad[0], torch.tensor(-1.3 * 0.5 * s * (1 - s)))  # d(1 - sig(b(r - z)))/dr
    s = _sig(0.65)
    torch.testing.assert_close(pol.grad[1], torch.tensor(0.7 * 0.5 * s * (1 - s)))
    assert kl_pol.grad is None  # the reference point is detached
    assert not out.kl.requires_grad and not out.rewards.requires_grad


def test_kto_reference_point_clamped_after_the_cross_process_mean():
    pol, ref, des = torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([True, False])
    kl_pol, kl_ref = torch.tensor([-1.0, 0.6]), torch.tensor([0.0, 0.0])  # local mean -0.2
    assert L.kto_loss(pol, ref, des, kl_pol, kl_ref).kl == 0  # clamped at 0
    # another process with mean +0.8: global mean 0.3 > 0 (clamping each process first would give 0.4)
    out = L.kto_loss(pol, ref, des, kl_pol, kl_ref, beta=1.0, reduce=lambda x: (x + 0.8) / 2)
    torch.testing.assert_close(out.kl, torch.tensor(0.3))
    torch.testing.assert_close(out.losses, torch.tensor([1 - _sig(-0.3), 1 - _sig(0.3)]))


def test_kto_loss_token_level_equals_summed():
    g = torch.Generator().manual_seed(1)
    lp, rf = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).bool()
    klp, klr = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    km = torch.rand(3, 5, generator=g) > 0.3
    des = torch.tensor([True, False, False])
    tok = L.kto_loss(lp.masked_fill(~m, float("nan")), rf, des, klp, klr, mask=m, kl_mask=km, reduce=lambda x: x)
    summed = L.kto_loss((lp * m).sum(1), (rf * m).sum(1), des, (klp * km).sum(1), (klr * km).sum(1), reduce=lambda x: x)
    for a, b in zip(tok, summed):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="desirable"):
        L.kto_loss(lp.sum(1), rf.sum(1), des[:2], klp.sum(1), klr.sum(1))


def _kto_dist_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    kl_pol = torch.tensor([-1.0, 0.6]) if rank == 0 else torch.tensor([0.8, 0.8, 0.8])  # local means -0.2, 0.8
    z = L.kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([True, False]), kl_pol, torch.zeros_like(kl_pol)).kl
    torch.save(z, f"{out_dir}/z{rank}.pt")
    dist.destroy_process_group()


def test_kto_reference_point_defaults_to_the_all_reduce_mean(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_kto_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"z{rank}.pt", weights_only=True), torch.tensor(0.3))


def test_diffusion_kto_reference_forms_hand_computed():
    model, ref = torch.tensor([0.1, 0.5, 0.3, 0.8]), torch.tensor([0.2, 0.4, 0.3, 0.5])
    g = [0.1, -0.1, 0.0, -0.3]
    des = torch.tensor([True, False, True, False])
    sgn = [1, -1, 1, -1]
    for form, z in (("mean", max(sum(g) / 4, 0.0)), ("sigmoid", ((0.1 + 0.0) / 2 + (-0.1 - 0.3) / 2) / 2)):
        loss, z_out = L.diffusion_kto_loss(model, ref, des, beta=10.0, reference=form, return_reference=True)
        torch.testing.assert_close(z_out, torch.tensor(z))
        torch.testing.assert_close(loss, torch.tensor([1 - _sig(s * 10 * (x - z)) for s, x in zip(sgn, g)]))
    # 'sigmoid' is not clamped: z = -0.075 here, where 'mean' gives 0
    assert L.diffusion_kto_reference(ref - model, des, "sigmoid") < 0
    # an absent class contributes 0 (as in the released code); reduce averages each class mean
    torch.testing.assert_close(L.diffusion_kto_reference(ref - model, torch.ones(4, dtype=torch.bool), "sigmoid"),
                               torch.tensor(sum(g) / 4 / 2))
    torch.testing.assert_close(L.diffusion_kto_reference(ref - model, des, "sigmoid", reduce=lambda x: 2 * x),
                               torch.tensor(2 * -0.075))
    default = L.diffusion_kto_loss(model, ref, des, 10.0)
    torch.testing.assert_close(default, L.diffusion_kto_loss(model, ref, des, 10.0, "mean"))
    with pytest.raises(ValueError, match="sigmoid"):
        L.diffusion_kto_loss(model, ref, des, reference="offset")


def test_dragon_kto_reference_config_and_wiring(monkeypatch):
    import contextlib
    from types import SimpleNamespace

    from genalign import dragon
    from genalign.config import Config, ConfigError

    cfg = Config()
    cfg.validate()
    assert cfg.dragon.kto_reference == "mean"
    cfg.dragon.kto_reference = "offset"
    with pytest.raises(ConfigError, match="kto_reference"):
        cfg.validate()
    assert set(dragon.KTO_REFERENCES) == {"mean", "sigmoid"}

    class Traj(SimpleNamespace):
        def select(self, rows):
            return Traj(final=self.final[rows], timesteps=self.timesteps[rows], sigmas=self.sigmas[rows],
                        num_steps=self.num_steps, cond=None)

        def to(self, device):
            return self

    w = torch.nn.Parameter(torch.tensor(1.3))
    state = {"ref": False}

    @contextlib.contextmanager
    def reference():
        state["ref"] = True
        yield
        state["ref"] = False

    policy = SimpleNamespace(predict=lambda x, t, c: x * (1.0 if state["ref"] else w))
    seen = []
    real = L.diffusion_kto_loss
    monkeypatch.setattr(L, "diffusion_kto_loss", lambda *a, **k: seen.append(k) or real(*a, **k))
    dragon_cfg = SimpleNamespace(beta=2.0, loss="kto", kto_reference="sigmoid")
    from genalign.objectives.dragon import Dragon, DragonUnits

    ctx = SimpleNamespace(cfg=SimpleNamespace(dragon=dragon_cfg), device=torch.device("cpu"), policy=policy,
                          autocast=contextlib.nullcontext, reference=reference)
    g = torch.Generator().manual_seed(0)
    traj = Traj(final=torch.randn(4, 3, generator=g), timesteps=torch.rand(4, 2, generator=g),
                sigmas=torch.rand(4, 2, generator=g), num_steps=2, cond=None)
    labels, local = torch.tensor([1, -1, 1, -1]), torch.arange(4)
    units = DragonUnits(traj, torch.arange(4)[:, None], labels, local)
    loss, stats = Dragon(ctx).unit_loss(units, torch.arange(4)[:, None], torch.tensor(4.0), seeds=3)
    loss.backward()
    assert seen and seen[0]["reference"] == "sigmoid" and "dragon/kto_z" in stats and w.grad is not None
