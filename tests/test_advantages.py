import math

import pytest
import torch

from genalign import advantages as adv
from genalign.advantages import (
    compute_advantages,
    dapo_overlong_penalty,
    get_advantage,
    group_stats,
    register_advantage,
    zero_variance_groups,
)

R = torch.tensor([1.0, 0.0, 3.0, 2.0, 2.0, 5.0])
G = torch.tensor([7, 7, 3, 3, 9, 9])  # non-contiguous ids


def test_group_stats_hand_computed():
    s = group_stats(R, G)
    torch.testing.assert_close(s.mean, torch.tensor([0.5, 0.5, 2.5, 2.5, 3.5, 3.5]))
    torch.testing.assert_close(s.std, torch.tensor([0.5, 0.5, 0.5, 0.5, 1.5, 1.5]))
    torch.testing.assert_close(s.count, torch.full((6,), 2.0))
    # per-column statistics with a validity mask and NaN
    v = torch.tensor([[1.0, float("nan")], [3.0, 4.0], [5.0, 6.0]])
    s2 = group_stats(v, torch.tensor([0, 0, 1]), valid=torch.tensor([[True, True], [True, True], [True, False]]))
    torch.testing.assert_close(s2.mean, torch.tensor([[2.0, 4.0], [2.0, 4.0], [5.0, 0.0]]))
    torch.testing.assert_close(s2.count, torch.tensor([[2.0, 1.0], [2.0, 1.0], [1.0, 0.0]]))


def test_grpo_group_batch_none_clip():
    a = compute_advantages("grpo", R, G)
    std = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.5, 1.5])
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, 0.5, -0.5, -1.5, 1.5]) / (std + 1e-4))
    batch_std = R.std(unbiased=False)
    a_b = compute_advantages("grpo", R, G, std="batch")
    torch.testing.assert_close(a_b, torch.tensor([0.5, -0.5, 0.5, -0.5, -1.5, 1.5]) / (batch_std + 1e-4))
    a_c = compute_advantages("grpo", torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long), clip=1.0)
    assert a_c.max() == 1.0 and a_c.min() > -1.0  # 1.732 clamped, -0.577 untouched
    with pytest.raises(ValueError, match="std"):
        compute_advantages("grpo", R, G, std="global")


def test_dr_grpo_equals_grpo_std_none():
    torch.testing.assert_close(compute_advantages("dr_grpo", R, G), compute_advantages("grpo", R, G, std="none"))
    torch.testing.assert_close(adv.dr_grpo(R, G), torch.tensor([0.5, -0.5, 0.5, -0.5, -1.5, 1.5]))


def test_zero_variance_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5])
    g = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    assert zero_variance_groups(r, g).tolist() == [True, True, False, False, True, True, True]
    rk = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 3.0], [2.0, 3.0]])
    assert zero_variance_groups(rk, torch.tensor([0, 0, 1, 1])).tolist() == [False, False, True, True]


def test_dapo_overlong_penalty():
    out = dapo_overlong_penalty(torch.tensor([10, 16, 18, 20, 25]), max_len=20, cache_len=4)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


def test_gdpo_hand_computed():
    r = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    g = torch.tensor([0, 0, 1, 1])
    eps = 1e-4
    # group z-scores: col0 -> [1, -1] / (0.5+eps) * 0.5 ... computed by hand
    z0 = torch.tensor([0.5, -0.5, 0.0, 0.0]) / (torch.tensor([0.5, 0.5, 0.0, 0.0]) + eps)
    z1 = torch.tensor([0.0, 0.0, 0.5, -0.5]) / (torch.tensor([0.0, 0.0, 0.5, 0.5]) + eps)
    s = 2.0 * z0 + 1.0 * z1
    expected = (s - s.mean()) / (s.std(unbiased=False) + eps)
    torch.testing.assert_close(compute_advantages("gdpo", r, g, weights=[2.0, 1.0]), expected)
    with pytest.raises(ValueError, match="weights"):
        compute_advantages("gdpo", r, g, weights=[1.0])


def test_bnpo_hand_computed():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    g = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2])
    p_groups = torch.tensor([0.5, 1.0, 0.0])  # one entry per group (not per member)
    mu, var = p_groups.mean(), p_groups.var(unbiased=False)
    k = mu * (1 - mu) / var - 1
    a, b = max(1 + mu * k / 3, 1.0), max(1 + (1 - mu) * k / 3, 1.0)
    pdf = lambda p: p ** (a - 1) * (1 - p) ** (b - 1) * math.gamma(a + b) / (math.gamma(a) * math.gamma(b))
    out = compute_advantages("bnpo", r, g)
    assert torch.allclose(out[:2], torch.tensor([0.5, -0.5]) / pdf(0.5))
    assert torch.all(out[2:] == 0)  # p = 1 or 0 groups: R - p = 0
    # zero batch variance -> uniform Beta -> Dr.GRPO
    r2, g2 = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(compute_advantages("bnpo", r2, g2), adv.dr_grpo(r2, g2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        compute_advantages("bnpo", torch.tensor([2.0, 0.0]), torch.tensor([0, 0]))


def test_hapo_token_level_group_average():
    r = torch.tensor([1.0, 0.0, 2.0])
    g = torch.tensor([0, 0, 1])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    out = compute_advantages("hapo", r, g, mask, eps=1e-9)
    # group 0 tokens: [1, 1, 1, 0] -> mean 0.75, std sqrt(3)/4
    mean, std = 0.75, math.sqrt(3) / 4
    expected = torch.tensor([[(1 - mean) / std] * 3, [(0 - mean) / std, 0, 0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="mask"):
        compute_advantages("hapo", r, g)


def test_process_advantages():
    nan = float("nan")
    r = torch.tensor([[1.0, nan, 4.0], [3.0, nan, 2.0], [0.0, 5.0, nan], [7.0, 7.0, nan]])
    g = torch.tensor([0, 0, 1, 1])
    out = compute_advantages("process", r, g, eps=0.0 + 1e-4)
    e = 1e-4
    expected = torch.tensor(
        [[-1 / (1 + e), 0.0, 1 / (1 + e)], [1 / (1 + e), 0.0, -1 / (1 + e)], [-3.5 / (3.5 + e), -1 / (1 + e) * 0, 0.0],
         [3.5 / (3.5 + e), 0.0, 0.0]]
    )
    # group 1 step 1: values [5, 7] -> +-1/(1+e)
    expected[2, 1], expected[3, 1] = -1 / (1 + e), 1 / (1 + e)
    torch.testing.assert_close(out, expected)
    masked = compute_advantages("process", torch.nan_to_num(r), g, mask=~torch.isnan(r), eps=1e-4)
    torch.testing.assert_close(masked, out)


def test_registry_errors_and_callables():
    with pytest.raises(ValueError) as err:
        get_advantage("nope")
    assert "grpo" in str(err.value) and "bnpo" in str(err.value)
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("grpo")(lambda r, g, m=None: r)
    fn = lambda r, g, m=None, scale=1.0: r * scale
    assert get_advantage(fn) is fn
    torch.testing.assert_close(compute_advantages(fn, R, G, scale=2.0), 2 * R)
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages("grpo", R, G[:3])
