"""Timestep-aware strategies: TempFlow branching and weights, GRPO-Guard RatioNorm, SDE windows, method defaults
(the method specs themselves: tests/test_method_specs.py)."""

import json

import pytest
import torch

from genalign import methods
from genalign.config import ConfigError, load_config
from genalign.prompts import KRepeatSampler
from genalign.sde import gaussian_log_prob

from .test_trainer import make_trainer, prompts_file, sd3_dir, tiny_overrides  # noqa: F401

BRANCH = {"sampling.branching": {"seeds": 1, "branches": 2, "steps": "all"}}


def test_branching_model_calls_trajectories_and_process_advantages(sd3_dir, tmp_path, prompts_file):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, method="tempflow_grpo", **BRANCH)
    plan = trainer.plan(0)
    T, N = 3, 8  # trainable steps [0, 1]; 2 groups x (1 seed x 2 steps x 2 branches)
    assert plan.branch_step.tolist().count(0) == plan.branch_step.tolist().count(1) == 4
    assert plan.model_calls == 2 * T + 4 * (T - 0) + 4 * (T - 1)  # main ODE once per (prompt, seed) + T - j per branch
    calls, predict = [0], trainer.policy.predict

    def counting(x, *a, **k):
        calls[0] += x.shape[0]
        return predict(x, *a, **k)

    trainer.policy.predict = counting
    traj, rewards, _, group_ids, local = trainer.sample_epoch(0, plan)
    assert calls[0] == plan.model_calls
    assert torch.equal(traj.stochastic_steps, torch.nn.functional.one_hot(plan.branch_step, T).bool())
    for sid in plan.seed_ids.unique():  # branches of one seed share the main ODE states up to x_j
        rows = (plan.seed_ids == sid) & (plan.branch_step == 1)
        lat = traj.latents[rows]
        assert torch.equal(lat[0, :2], lat[1, :2]) and not torch.equal(lat[0, 2], lat[1, 2])
    adv = methods.branch_advantages(rewards, plan)
    assert adv.shape == (N, T)
    assert ((adv != 0).sum(1) <= 1).all() and torch.all(adv[:, 2] == 0)
    for sid in plan.seed_ids.unique():
        for j in (0, 1):
            assert abs(adv[(plan.seed_ids == sid) & (plan.branch_step == j), j].sum()) < 1e-4
    # the positive-advantage weight reaches the branch advantages too
    picked = adv[torch.arange(N), plan.branch_step].clamp(-5, 5)
    trainer.cfg.train.positive_advantage_weight = 0.5
    weighted, _ = trainer.compute_advantages(rewards, group_ids, plan)
    assert (picked > 0).any()
    torch.testing.assert_close(weighted, torch.where(picked > 0, 0.5 * picked, picked))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ratio_norm_centres_left_shifted_log_ratio(reduction):
    g = torch.Generator().manual_seed(0)
    B, D = 4000, 64
    std = 0.05 + torch.rand(B, generator=g)
    mu_old = torch.randn(B, D, generator=g)
    dmu = 0.3 * std[:, None] * torch.randn(B, D, generator=g)
    x = mu_old + std[:, None] * torch.randn(B, D, generator=g)
    old = gaussian_log_prob(x, mu_old, std, reduction)
    logp = gaussian_log_prob(x, mu_old + dmu, std, reduction)
    raw = logp - old
    norm = methods.ratio_norm(logp, old, mu_old + dmu, mu_old, std, reduction) - old
    assert raw.mean() < -10 * raw.std() / B**0.5  # clearly left-shifted
    assert abs(norm.mean()) < 4 * norm.std() / B**0.5
    scale = D if reduction == "sum" else 1
    expected = ((x - mu_old) / std[:, None] * dmu).sum(1) / (1 if reduction == "sum" else D)
    torch.testing.assert_close(norm, expected, rtol=1e-4, atol=1e-5 * scale)


def test_step_weights_closed_form_and_sd3_values():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    w = methods.step_weight_table("noise_aware", sched.sigmas.float(), range(9))
    sd3 = torch.tensor([1.58, 1.67, 1.21, 1.00, 0.88, 0.79, 0.72, 0.64, 0.51])
    torch.testing.assert_close(w[:9], sd3, atol=0.01, rtol=0)
    sig = torch.tensor([1.0, 0.7, 0.45, 0.2, 0.0])
    dt = sig[:-1] - sig[1:]
    s = torch.sqrt(sig[:-1] / (1 - torch.tensor([0.7, 0.7, 0.45, 0.2]))) * dt.sqrt()  # s = 1 uses s' (docs/algorithms.md §1.1)
    torch.testing.assert_close(methods.step_weight_table("noise_aware", sig, [0, 1, 2]), s / s[:3].mean())
    torch.testing.assert_close(methods.step_weight_table("inverse_dt", sig[None], [0, 1, 2])[0], (1 / dt) / (1 / dt[:3]).mean())
    assert torch.equal(methods.step_weight_table("none", sig, [0]), torch.ones(4))


def test_released_noise_aware_weights_on_sd3_schedule():
    """TempFlow-GRPO's released weight: c * (SDE std at its fixed noise level 0.7), unnormalised."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    sig = sched.sigmas.float()
    w = methods.step_weight_table("noise_aware_released", sig, range(9))
    # by hand: step 0 has s = 1, so sigma_t sqrt(dt) = sqrt(1 / (1 - s')) sqrt(1 - s') = 1 and w_0 = 2.25 * 0.7;
    # step 8: s = 0.278049, s' = 0.008929 -> 1.575 * sqrt(0.278049 / 0.721951) * sqrt(0.269120) = 0.5071
    sd3 = torch.tensor([1.5750, 1.6717, 1.2063, 1.0033, 0.8815, 0.7938, 0.7179, 0.6345, 0.5071, 0.0141])
    torch.testing.assert_close(w, sd3, atol=1e-4, rtol=0)
    assert w[0] / w[8] == pytest.approx(3.106, abs=1e-3)  # first-to-last spread over the 9 trained steps
    assert w[:9].max() / w[:9].min() == pytest.approx(3.297, abs=1e-3)
    # not normalised: independent of the trainable steps; 2.25 is 1 / mean(0.7 s_j) on this schedule to 0.1%
    assert torch.equal(w, methods.step_weight_table("noise_aware_released", sig, [0]))
    torch.testing.assert_close(w / methods.step_weight_table("noise_aware", sig, range(9)), torch.full((10,), 0.99901),
                               atol=1e-5, rtol=0)
    for kind, c in (("noise_aware_released_flux", 1.73), ("noise_aware_released_qwenimage", 1.53)):
        torch.testing.assert_close(methods.step_weight_table(kind, sig, range(9)), w * c / 2.25)
    sig2 = torch.tensor([[1.0, 0.7, 0.45, 0.2, 0.0]])  # any schedule: s = 1 uses s' in sigma_t (as the SDE step)
    s = sig2[0, :-1]
    expected = 2.25 * 0.7 * torch.sqrt(s / (1 - torch.tensor([0.7, 0.7, 0.45, 0.2]))) * (s - sig2[0, 1:]).sqrt()
    torch.testing.assert_close(methods.step_weight_table("noise_aware_released", sig2, [0])[0], expected)
    with pytest.raises(ValueError, match="step weighting"):
        methods.step_weight_table("noise-aware", sig, range(9))
    load_config(None, ["train.step_weighting=noise_aware_released_flux"]).validate()


def _plan(epoch, rank, world=2, **window):
    method = {"fast": "flow_grpo_fast", "mixgrpo": "mixgrpo"}[window["kind"]]
    cfg = load_config(None, [f"method={method}", f"sampling.window={window}", "sampling.num_steps=10",
                             "sampling.noise_level=1.0", "sampling.last_step_deterministic=true"])
    _, group_ids, _ = KRepeatSampler(20, 8, 4, seed=3, world_size=world, rank=rank).epoch(epoch)
    return methods.plan_epoch(cfg, epoch, group_ids, torch.ones(10)), group_ids


def test_fast_window_is_per_group_and_independent_of_rank():
    starts = set()
    for epoch in range(4):
        (p0, gid), (p1, _) = _plan(epoch, 0, kind="fast", size=2), _plan(epoch, 1, kind="fast", size=2)
        assert torch.equal(p0.train_steps, p1.train_steps) and torch.equal(p0.levels, p1.levels)
        for g in gid.unique():
            rows = p0.train_steps[gid == g]
            assert (rows == rows[0]).all() and rows[0, 1] == rows[0, 0] + 1 and 0 <= rows[0, 0] <= 3
            starts.add(int(rows[0, 0]))
        assert torch.equal(p0.levels > 0, torch.zeros_like(p0.levels).scatter_(1, p0.train_steps, 1.0) > 0)
    assert len(starts) > 1


def test_mixgrpo_window_slides_and_wraps():
    first = [int(_plan(e, 0, kind="mixgrpo", size=4, shift_every=2)[0].train_steps[0, 0]) for e in range(0, 16, 2)]
    assert first == [0, 1, 2, 3, 4, 0, 1, 2]  # trainable steps 0..7 (int(0.99 * 9)), window 4 -> starts 0..4


def _windows(epochs, **window):
    """The trained steps of each epoch, checking that all samples share them and that levels match."""
    out = []
    for e in epochs:
        (p0, _), (p1, _) = _plan(e, 0, kind="mixgrpo", **window), _plan(e, 1, kind="mixgrpo", **window)
        assert torch.equal(p0.train_steps, p1.train_steps) and torch.equal(p0.levels, p1.levels)
        assert p0.train_steps.shape == (len(p0.levels), p0.train_steps.shape[1])  # rectangular [N, k]
        assert (p0.train_steps == p0.train_steps[0]).all()
        assert torch.equal(p0.levels > 0, torch.zeros_like(p0.levels).scatter_(1, p0.train_steps, 1.0) > 0)
        assert torch.all(p0.levels[p0.levels > 0] == 1.0)
        out.append(p0.train_steps[0].tolist())
    return out


def test_mixgrpo_released_roll_back_schedule_shrinks_then_restarts():
    # released progressive strategy, trainable steps 0..7: cut at step 8 (shrinks), restart at 0 (roll back)
    got = _windows(range(0, 20, 2), size=4, shift_every=2, schedule="roll_back")
    assert got == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6], [4, 5, 6, 7], [5, 6, 7], [6, 7], [7],
                   [0, 1, 2, 3], [1, 2, 3, 4]]
    assert _windows([0, 1, 2, 3], size=4, shift_every=2, schedule="roll_back") == [[0, 1, 2, 3]] * 2 + [[1, 2, 3, 4]] * 2
    # stride = size (no overlap): 0, 4, then 8 = n would be empty -> restart
    assert _windows(range(4), size=4, shift_every=1, schedule="roll_back", stride=4) == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    assert _windows(range(5), size=3, shift_every=1, schedule="roll_back", stride=3) == \
        [[0, 1, 2], [3, 4, 5], [6, 7], [0, 1, 2], [3, 4, 5]]
    # stride 0: frozen window (the released Flash* script), for both schedules
    assert _windows(range(0, 40, 7), size=4, shift_every=1, stride=0, schedule="roll_back") == [[0, 1, 2, 3]] * 6
    assert _windows(range(0, 40, 7), size=4, shift_every=1, stride=0) == [[0, 1, 2, 3]] * 6


def test_mixgrpo_random_schedule_is_per_shift_and_seeded():
    got = _windows(range(24), size=3, shift_every=2, schedule="random")
    assert all(len(w) == 3 and w == list(range(w[0], w[0] + 3)) and 0 <= w[0] <= 5 for w in got)
    assert all(got[2 * i] == got[2 * i + 1] for i in range(12)) and len({w[0] for w in got}) > 2
    assert got == _windows(range(24), size=3, shift_every=2, schedule="random")


def test_mixgrpo_shrinking_window_trains_an_epoch(sd3_dir, tmp_path, prompts_file):
    window = {"kind": "mixgrpo", "size": 2, "shift_every": 1, "schedule": "roll_back"}
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, method="mixgrpo",
                           **{"num_epochs": 3, "sampling.window": window})
    assert [trainer.plan(e).train_steps.shape[1] for e in range(3)] == [2, 1, 2]  # trainable steps 0, 1
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    trained = [sorted(int(k.split("/")[1]) for k in r if k.startswith("steps/") and k.endswith("/tokens")) for r in rows
               if any(k.startswith("steps/") for k in r)]
    assert trained == [[0, 1], [1], [0, 1]]


def test_method_config_validation():
    with pytest.raises(ConfigError, match="sampling.group_size"):
        load_config(None, ["method=tempflow_grpo", "sampling.group_size=12"]).validate()
    with pytest.raises(ConfigError, match="sampling.window.size"):
        load_config(None, ["method=flow_grpo_fast", "sampling.window={kind: fast, size: 20}"]).validate()
    with pytest.raises(ConfigError, match="sampling.window.schedule"):
        load_config(None, ["method=mixgrpo", "sampling.window={kind: mixgrpo, schedule: clip}"]).validate()
    with pytest.raises(ConfigError, match="sampling.window.stride"):
        load_config(None, ["method=mixgrpo", "sampling.window={kind: mixgrpo, stride: -1}"]).validate()
    with pytest.raises(ConfigError, match="sampling.window.stride"):
        load_config(None, ["method=flow_grpo_fast", "sampling.window={kind: fast, stride: 1}"]).validate()
    with pytest.raises(ConfigError, match="sampling.window is an option of method flow_grpo_fast"):
        load_config(None, ["sampling.window={kind: fast, size: 2}"]).validate()  # the window is its methods' option
    assert load_config(None, ["method=mixgrpo"]).window_spec() == {"kind": "mixgrpo", "size": 4, "shift_every": 25,
                                                                   "stride": 1, "schedule": "wrap"}
    with pytest.raises(ConfigError, match="method"):
        load_config(None, ["method=nope"])
    cfg = load_config(None, ["method=grpo_guard", "train.step_weighting=none"])
    assert cfg.train.ratio_norm and cfg.train.step_weighting == "none"  # explicit keys override the method defaults


@pytest.mark.parametrize("method,extra", [
    ("flow_grpo", {}), ("flow_grpo_fast", {"sampling.window": {"kind": "fast", "size": 1, "max_start": 1}}),
    ("mixgrpo", {"sampling.window": {"kind": "mixgrpo", "size": 2, "shift_every": 1}}),
    ("tempflow_grpo", BRANCH), ("grpo_guard", {"train.kl_beta": 0.1}),
    ("flow_grpo_fast", {"sampling.step_kind": "cps", "sampling.window": {"kind": "fast", "size": 1, "max_start": 1}}),
    ("tempflow_grpo", {"sampling.step_kind": "cps", **BRANCH}),
])
def test_one_epoch_per_method(sd3_dir, tmp_path, prompts_file, method, extra):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, method=method,
                           **{"train.num_minibatches": 2, "train.batch_size": 2, **extra})
    metrics = trainer.train()
    assert metrics["model_calls"] == trainer.model_calls > 0
    trained = {int(k.split("/")[1]) for k in metrics if k.startswith("steps/") and k.endswith("ratio_mean")}
    assert trained and trained <= set(trainer.trainable_steps())
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readlines()[-1])
    assert "steps/%d/clip_frac_pos" % min(trained) in row
    assert (tmp_path / "run" / "step_ratios.png").is_file()


def test_step_diagnostics_per_step_ratio_and_clip_split():
    diag = methods.StepDiagnostics(4, "cpu")
    log_r = torch.tensor([1e-4, -1e-4, 0.5, -0.5, 0.0])
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0])
    diag.add(torch.tensor([1, 1, 2, 2, 2]), log_r, adv, torch.ones(5, dtype=torch.bool),
             torch.tensor([False, False, True, True, False]))
    m = diag.metrics()
    assert set(k.split("/")[1] for k in m) == {"1", "2"}
    assert abs(m["steps/1/ratio_std"] - 1e-4) < 1e-6 and abs(m["steps/1/ratio_mean"] - 1) < 1e-8
    assert m["steps/2/clip_frac_pos"] == 1.0 and m["steps/2/clip_frac_neg"] == 0.5
