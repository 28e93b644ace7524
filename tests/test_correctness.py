"""Trainer correctness: deterministic (std 0) steps, the non-finite guard, KL reduction and form, DAPO
dynamic sampling, unbiased advantage std and the reward-error hint."""

import dataclasses
import json
import math

import pytest
import torch

from genalign import cli
from genalign.config import ConfigError, load_config
from genalign.rewards import RewardError
from genalign.trainer import NonFiniteError, Trainer

from .test_trainer import lora_params, make_trainer, prompts_file, sd3_dir, tiny_overrides  # noqa: F401


def perturb_lora(trainer, scale=0.05, seed=0):
    """Move the policy away from the reference (LoRA B starts at zero, so KL would be 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.params:
            p.add_(scale * torch.randn(p.shape, generator=g))


def one_step_stats(trainer, traj, adv, valid, steps):
    trainer.optimizer.zero_grad(set_to_none=True)
    stats = trainer.accumulate(trainer.objective.units_for(traj, adv, valid, steps), torch.arange(len(traj)))
    return stats, [p.grad.clone() for p in trainer.params]


# --------------------------------------------------------------------------- CPS final step
def test_cps_trained_final_step_is_refused_at_config_load():
    cfg = load_config("configs/digits_flow_grpo.yaml", ["sampling.step_kind=cps", "sampling.noise_level=0.7",
                                              "sampling.last_step_deterministic=false", "train.timestep_fraction=1.0"])
    with pytest.raises(ConfigError, match="last_step_deterministic.*timestep_fraction"):
        cfg.validate()
    # the same keys with the last step untrained are fine
    load_config("configs/digits_flow_grpo.yaml", ["sampling.step_kind=cps", "train.timestep_fraction=1.0",
                                        "sampling.last_step_deterministic=true"]).validate()


def test_cps_command_from_the_issue_fails_before_sampling(tmp_path, capsys):
    rc = cli.main(["train", "configs/digits_flow_grpo.yaml", "sampling.step_kind=cps", "sampling.noise_level=0.7",
                   "sampling.last_step_deterministic=false", "train.timestep_fraction=1.0", "num_epochs=2",
                   f"output_dir={tmp_path / 'run'}"])
    assert rc == 2
    assert "std is 0" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_deterministic_steps_are_excluded_and_everything_stays_finite(sd3_dir, tmp_path, prompts_file):
    """A step sampled with noise level 0 (std 0) inside a trained set: no NaN from KL or RatioNorm, and it
    does not count as a token (the loss equals the loss over the stochastic steps only)."""
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file,
                           **{"train.kl_beta": 0.5, "train.ratio_norm": "true", "sampling.step_kind": "cps",
                              "sampling.noise_level": 0.8})
    perturb_lora(trainer)
    traj, rewards, _, group_ids, local = trainer.sample_epoch(0)
    adv, valid = trainer.compute_advantages(rewards, group_ids)
    # CPS onto sigma' = 0 (the last step) has std 0 by construction
    assert torch.all(traj.stds[:, -1] == 0) and torch.all(traj.stds[:, :-1] > 0)
    all_steps = torch.arange(traj.num_steps).expand(len(traj), -1)
    stats, grads = one_step_stats(trainer, traj, adv[local], valid[local], all_steps)
    assert math.isfinite(float(stats["loss"])) and all(torch.isfinite(g).all() for g in grads)
    ref_stats, ref_grads = one_step_stats(trainer, traj, adv[local], valid[local], all_steps[:, :-1])
    torch.testing.assert_close(stats["loss"], ref_stats["loss"], rtol=1e-5, atol=1e-8)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


# --------------------------------------------------------------------------- non-finite guard
def test_nan_loss_stops_the_run_with_epoch_step_and_term_and_keeps_weights(sd3_dir, tmp_path, prompts_file,
                                                                           monkeypatch):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{"num_epochs": 2, "checkpoint.every": 1})
    trainer.train()  # epoch 1 + a checkpoint
    trainer.cfg.num_epochs = 3
    before = lora_params(trainer)
    original = trainer.policy.predict

    def predict(x, t, cond):  # the denoiser blows up at the second denoising step only
        out = original(x, t, cond)
        return out * float("nan") if torch.is_grad_enabled() and float(t.flatten()[0]) < 999 else out

    monkeypatch.setattr(trainer.policy, "predict", predict)
    with pytest.raises(NonFiniteError) as info:
        trainer.train()
    msg = str(info.value)
    assert "epoch 3" in msg and "optimizer step" in msg and "policy log-prob" in msg
    assert "checkpoint-" in msg and "--resume latest" in msg
    after = lora_params(trainer)
    assert all(torch.equal(before[n], after[n]) for n in before)  # no NaN reached the weights
    ckpt = json.load(open(tmp_path / "run" / "checkpoints" / "checkpoint-2" / "trainer_state.json"))
    assert ckpt["epoch"] == 2


def test_reward_error_names_the_checkpoint_or_says_none_exists(sd3_dir, tmp_path, prompts_file):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, reward="nan_for_second")
    with pytest.raises(RewardError, match="no checkpoint exists yet"):
        trainer.train()


# --------------------------------------------------------------------------- KL reduction and form
def test_kl_follows_the_log_prob_reduction_and_the_kl_form(sd3_dir, tmp_path, prompts_file):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{"train.kl_beta": 1.0})
    perturb_lora(trainer)
    traj, rewards, _, group_ids, local = trainer.sample_epoch(0)
    adv, valid = trainer.compute_advantages(rewards, group_ids)
    j = 1
    steps = torch.full((len(traj), 1), j)
    kl_mean = one_step_stats(trainer, traj, adv[local], valid[local], steps)[0]["kl"]
    kl_sum = one_step_stats(trainer, dataclasses.replace(traj, reduction="sum"), adv[local], valid[local], steps)[0]["kl"]
    numel = traj.latents[0, 0].numel()
    torch.testing.assert_close(kl_sum, kl_mean * numel, rtol=1e-5, atol=0)
    trainer.cfg.train.kl_form = "flow_grpo"
    kl_fg = one_step_stats(trainer, traj, adv[local], valid[local], steps)[0]["kl"]
    dt = float(traj.sigmas[0, j] - traj.sigmas[0, j + 1])
    torch.testing.assert_close(kl_fg, kl_mean * dt, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- DAPO dynamic sampling
def test_dynamic_sampling_refills_groups_with_variance(sd3_dir, tmp_path, prompts_file):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, reward="flat_for_cat",
                           **{"train.dynamic_sampling": "true", "sampling.groups_per_epoch": 2,
                              "train.dynamic_sampling_max_rounds": 8})
    plan = trainer.plan(0)
    batch, stats = trainer.dynamic_sample_epoch(0, plan)
    traj, rewards, group_ids, local, plan = batch.traj, batch.rewards, batch.group_ids, batch.local, batch.plan
    assert stats["dynamic/groups_kept"] == 2 and len(rewards) == 8 and len(group_ids.unique()) == 2
    assert all(p != "a cat" for p in traj.prompts)
    for g in group_ids.unique():
        assert rewards[group_ids == g].std() > 0
    assert plan.levels.shape[0] == 8 and len(local) == len(traj) == 8
    assert stats["dynamic/rounds"] >= 2  # round 0 of seed 0 draws 'a cat' (a zero-variance group): refilled
    metrics = trainer.train()
    assert metrics["dynamic/groups_kept"] == 2 and metrics["groups/zero_std_frac"] == 0.0


def test_dynamic_sampling_with_no_signal_warns_and_leaves_weights(sd3_dir, tmp_path, prompts_file):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, reward="constant",
                           **{"train.dynamic_sampling": "true", "train.dynamic_sampling_max_rounds": 2})
    before = lora_params(trainer)
    with pytest.warns(UserWarning, match="only 0 of 2 groups"):
        metrics = trainer.train()
    assert metrics["dynamic/rounds"] == 2 and metrics["dynamic/groups_kept"] == 0
    assert metrics["samples_seen"] == 16
    after = lora_params(trainer)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_dynamic_sampling_is_refused_with_branching_and_dragon():
    with pytest.raises(ConfigError, match="dynamic_sampling"):
        load_config("configs/digits_flow_grpo.yaml", ["train.dynamic_sampling=true", "method=tempflow_grpo"]).validate()
    with pytest.raises(ConfigError, match="dynamic_sampling"):
        load_config("configs/digits_flow_grpo.yaml", ["train.dynamic_sampling=true", "method=dragon"]).validate()


# --------------------------------------------------------------------------- advantages
def test_unbiased_advantage_std(sd3_dir, tmp_path, prompts_file):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{"train.advantage_unbiased_std": "true"})
    rewards = torch.tensor([1.0, 2.0, 4.0, 8.0, 0.0, 1.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv, _ = trainer.compute_advantages(rewards, groups)
    g0 = rewards[:4]
    torch.testing.assert_close(adv[:4], (g0 - g0.mean()) / (g0.std(unbiased=True) + 1e-4))


def test_positive_advantage_weight_scales_only_positive_advantages(sd3_dir, tmp_path, prompts_file):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file,
                           **{"train.positive_advantage_weight": "0.25", "train.advantage_std": "none"})
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv, _ = trainer.compute_advantages(rewards, groups)
    # Dr.GRPO by hand: group means 0.25 and 0.75; positives (r = 1) times 0.25, negatives unchanged
    expected = torch.tensor([0.75 * 0.25, -0.25, -0.25, -0.25, 0.25 * 0.25, 0.25 * 0.25, 0.25 * 0.25, -0.75])
    torch.testing.assert_close(adv, expected)
    for bad in ("1.5", "-0.1"):
        with pytest.raises(ConfigError, match="train.positive_advantage_weight"):
            load_config("configs/digits.yaml", [f"train.positive_advantage_weight={bad}"]).validate()


def test_cli_reports_a_failing_reward_without_a_traceback(sd3_dir, tmp_path, prompts_file, capsys):
    rc = cli.main(["train", "configs/digits_flow_grpo.yaml", *tiny_overrides(sd3_dir, tmp_path / "run", prompts_file,
                                                                     reward="nan_for_second")])
    err = capsys.readouterr().err
    assert rc == 1 and "nan_for_second" in err and "Traceback" not in err and "no checkpoint exists yet" in err


# --------------------------------------------------------------------------- estimator names
def test_every_registered_estimator_runs_in_the_trainer_or_is_refused_at_load(sd3_dir, tmp_path, prompts_file):
    from genalign.advantages import ADVANTAGES
    from genalign.losses import SURROGATES

    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    ran = []
    for key, names in (("train.advantage", list(ADVANTAGES)), ("train.surrogate", list(SURROGATES))):
        for name in names:
            cfg = load_config(None, tiny_overrides(sd3_dir, tmp_path / "run", prompts_file, **{key: name}))
            try:
                cfg.validate()
            except ConfigError as exc:
                assert "not usable in the diffusion trainer" in str(exc) and name in str(exc)
                continue
            trainer = Trainer(cfg)
            adv, valid = trainer.compute_advantages(rewards, groups)
            assert adv.shape == (8,) and torch.isfinite(adv).all()
            traj, r, _, g, local = trainer.sample_epoch(0)
            a, v = trainer.compute_advantages(r, g)
            stats, grads = one_step_stats(trainer, traj, a[local], v[local],
                                          torch.tensor(trainer.trainable_steps()).expand(len(traj), -1))
            assert math.isfinite(float(stats["loss"]))
            ran.append(name)
    assert {"grpo", "dr_grpo", "bnpo", "ppo_clip", "cispo"} <= set(ran)
    torch.testing.assert_close(  # dr_grpo: centred, not scaled, then clamped like every estimator
        Trainer(load_config(None, tiny_overrides(sd3_dir, tmp_path / "r2", prompts_file, reward="brightness",
                                                 **{"train.advantage": "dr_grpo"}))).compute_advantages(
            rewards * 3, groups)[0], (rewards * 3 - torch.tensor([1.5] * 4 + [2.25] * 4)))


def test_unknown_estimator_names_are_refused_with_the_valid_ones():
    with pytest.raises(ConfigError, match="train.advantage = 'grpoo' is not valid.*'grpo'"):
        load_config(None, ["train.advantage=grpoo"]).validate()
    with pytest.raises(ConfigError, match="advantage_std = 'batch' applies to train.advantage = 'grpo' only"):
        load_config(None, ["train.advantage=dr_grpo", "train.advantage_std=batch"]).validate()


# --------------------------------------------------------------------------- gradient-free samples
def _pg_step(trainer, units, ids, skip):
    """(gradients, summed stats, samples forwarded) of one optimizer step's backwards with or without skipping."""
    obj = trainer.objective
    obj.skip_zero_advantage = skip
    forwarded = sum(len(p) for p in obj.micro_batches(units, ids)) * units.steps.shape[1]
    trainer.optimizer.zero_grad(set_to_none=True)
    stats = trainer.accumulate(units, ids)
    return [p.grad.clone() for p in trainer.params], stats, forwarded


@pytest.mark.parametrize("kl_beta", [0.0, 0.3])
def test_gradient_free_samples_are_skipped_with_the_same_gradient(tmp_path, kl_beta):
    """Zero-advantage samples (without a KL) and invalid samples give no gradient, so they run no pass; the
    step's gradient and loss are those of the full step. With a KL, zero-advantage samples still train."""
    from .test_anchor import _digits_trainer

    trainer = _digits_trainer(tmp_path, f"train.kl_beta={kl_beta}", "train.batch_size=4")
    perturb_lora(trainer)  # away from the reference: the KL has a gradient
    traj, rewards, _, group_ids, local = trainer.sample_epoch(0)
    n = len(traj)
    g = torch.Generator().manual_seed(3)
    adv = torch.randn(n, generator=g)
    adv[torch.randperm(n, generator=g)[: n // 2]] = 0.0  # half the samples: all-equal groups of a 0/1 reward
    valid = torch.ones(n, dtype=torch.bool)
    valid[torch.randperm(n, generator=g)[:3]] = False
    steps = torch.tensor(trainer.trainable_steps()).expand(n, -1)
    units = trainer.objective.units_for(traj, adv, valid, steps)
    ids = torch.randperm(n, generator=g)[:20]
    full, full_stats, full_passes = _pg_step(trainer, units, ids, skip=False)
    kept, kept_stats, kept_passes = _pg_step(trainer, units, ids, skip=True)
    free = (~valid[ids]) | ((adv[ids] == 0) & (kl_beta == 0))
    assert full_passes == 20 * steps.shape[1]
    assert kept_passes == int((~free).sum()) * steps.shape[1] < full_passes
    assert any(g.abs().sum() > 0 for g in kept)
    for a, b in zip(full, kept):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(full_stats["loss"], kept_stats["loss"], rtol=1e-5, atol=1e-9)


def test_a_step_without_any_trained_sample_runs_one_pass_of_zero_gradient(tmp_path):
    """All advantages 0: one single-sample pass, so the optimizer still steps (Adam moments, weight decay) as on
    the full step, with a zero policy gradient."""
    from .test_anchor import _digits_trainer

    trainer = _digits_trainer(tmp_path, "train.kl_beta=0")
    traj, *_ = trainer.sample_epoch(0)
    n = len(traj)
    steps = torch.tensor(trainer.trainable_steps()).expand(n, -1)
    units = trainer.objective.units_for(traj, torch.zeros(n), torch.ones(n, dtype=torch.bool), steps)
    micros = trainer.objective.micro_batches(units, torch.arange(n))
    assert [len(m) for m in micros] == [1]
    grads, _, _ = _pg_step(trainer, units, torch.arange(n), skip=True)
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    trainer.objective.epoch_stats()  # (resets the counts)
    trainer.objective.micro_batches(units, torch.arange(n))
    assert trainer.objective.epoch_stats()["passes/skipped_frac"] == pytest.approx(1 - 1 / n)
