"""DiffusionNFT (method: diffusion_nft, genalign/objectives/nft.py): the loss against hand-computed values, its
gradient at the old policy, accumulation invariance, the old policy's update and resume, and learning."""

import json

import pytest
import torch

from genalign.objectives.nft import nft_loss, optimality

from .test_trainer import make_trainer, prompts_file, sd3_dir  # noqa: F401


def test_optimality_maps_clipped_advantages_to_unit_interval():
    adv = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 7.0])
    assert optimality(adv, 5.0).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert optimality(adv, 5.0, "binary").tolist() == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]
    rewards = torch.tensor([0.0, 0.2, 0.4, 1.0])  # mean 0.4 -> r = R / 0.8, clipped at 1
    assert optimality(adv[:4], 5.0, "reward", rewards).tolist() == pytest.approx([0.0, 0.25, 0.5, 1.0])
    with pytest.raises(ValueError, match="rewards in \\[0, 1\\]"):
        optimality(adv[:2], 5.0, "reward", torch.tensor([0.5, 1.5]))


def test_loss_matches_hand_computed_values():
    # one sample of 2 elements: x0 = (0, 1), noise = (1, -1), t = 0.5 -> x_t = (0.5, 0), target v = (1, -2)
    x0, x_t, t = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([0.5])
    v, v_old = torch.tensor([[2.0, -2.0]]), torch.tensor([[1.0, 0.0]])
    r, beta, clip = torch.tensor([0.75]), 0.5, 5.0
    # v+ = 0.5 v + 0.5 v_old = (1.5, -1); v- = 1.5 v_old - 0.5 v = (0.5, 1)
    # plain: err(v) = mean((v - target)^2): err+ = (0.25 + 1) / 2 = 0.625, err- = (0.25 + 9) / 2 = 4.625
    plain = 5.0 * (0.75 * 0.625 + 0.25 * 4.625) / 0.5
    assert nft_loss(v, v_old, x_t, x0, t, r, beta, clip, adaptive=False).item() == pytest.approx(plain)
    # adaptive: x0(v) = x_t - t v; e+ = x0(v+) - x0 = (-0.25, -0.5), e- = (0.25, -1.5);
    # err = mean(e^2) / mean|e|: err+ = 0.15625 / 0.375, err- = 1.15625 / 0.875
    adaptive = 5.0 * (0.75 * (0.15625 / 0.375) + 0.25 * (1.15625 / 0.875)) / 0.5
    assert nft_loss(v, v_old, x_t, x0, t, r, beta, clip).item() == pytest.approx(adaptive)


@pytest.mark.parametrize("adaptive", [False, True])
def test_gradient_at_the_old_policy_is_the_flow_matching_gradient_times_2r_minus_1(adaptive):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
    v_old = torch.randn(3, 4, generator=g)
    r = torch.tensor([0.0, 0.5, 1.0])
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, x_t, x0, t, r, 0.3, 5.0, adaptive).sum().backward()
    # v+ = v- = v_old at v = v_old, so d/dv = clip * (r - (1 - r)) * d err(u)/du at u = v_old
    u = v_old.clone().requires_grad_(True)
    tt = t[:, None]
    e = x_t - tt * u - x0
    err = e.pow(2).mean(1) / (e.detach().abs().mean(1) if adaptive else tt[:, 0] ** 2)
    err.sum().backward()
    expected = 5.0 * (2 * r[:, None] - 1) * u.grad
    torch.testing.assert_close(v.grad, expected)
    assert v.grad[1].abs().max() < 1e-5 * v.grad.abs().max()  # r = 1/2: no signal (round-off only)


def nft_trainer(sd3_dir, tmp_path, prompts_file, **extra):
    return make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{
        "method": "diffusion_nft", "sampling.noise_level": 0.0, "model.guidance_scale": 1.0, **extra})


def test_accumulation_does_not_change_loss_or_gradients(sd3_dir, tmp_path, prompts_file):
    from genalign.objectives import EpochBatch

    from .test_optim import assert_accumulation_invariant, perturb

    trainer = nft_trainer(sd3_dir, tmp_path, prompts_file, **{"train.kl_beta": 0.5})
    perturb(trainer)  # policy != old and reference
    with trainer.objective.sampling_context():
        traj, rewards, parts, group_ids, local = trainer.sample_epoch(0)
    obj = trainer.objective
    units = obj.prepare(0, EpochBatch(traj, rewards, parts, group_ids, local, trainer.plan(0)))
    assert len(units.rows) == len(traj) * 2  # 3 steps, timestep_fraction 0.99 -> 2 trained steps per sample
    assert_accumulation_invariant(trainer, units, obj.minibatches(units, 0, 0)[0])


def test_old_policy_samples_and_follows_with_the_decay_schedule(sd3_dir, tmp_path, prompts_file):
    trainer = nft_trainer(sd3_dir, tmp_path, prompts_file, **{
        "num_epochs": 2, "nft.old_decay_rate": 0.25, "nft.old_decay_max": 0.4})
    obj = trainer.objective
    start = [p.detach().clone() for p in trainer.params]
    trainer.train()
    # epoch 1: 1 optimizer step -> d = 0.25; epoch 2: 2 steps -> d = min(0.5, 0.4) = 0.4
    assert obj.decay == pytest.approx(0.4)
    assert any((p - s).abs().max() > 0 for p, s in zip(trainer.params, start))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["nft/old_decay"] for r in rows if "nft/old_decay" in r] == [0.0, 0.25]  # logged before the update
    with obj.sampling_context():  # the old weights are swapped in, and restored after
        inside = [p.detach().clone() for p in trainer.params]
    assert all(torch.equal(a, b) for a, b in zip(inside, obj.old.shadow))
    assert not all(torch.equal(a, p) for a, p in zip(inside, trainer.params))


def test_resume_restores_the_old_policy(sd3_dir, tmp_path, prompts_file):
    full = nft_trainer(sd3_dir, tmp_path / "a", prompts_file, **{"num_epochs": 2, "nft.old_decay_rate": 0.3})
    full.train()
    first = nft_trainer(sd3_dir, tmp_path / "b", prompts_file, **{"num_epochs": 1, "nft.old_decay_rate": 0.3,
                                                                   "checkpoint.every": 1})
    first.train()
    resumed = nft_trainer(sd3_dir, tmp_path / "b", prompts_file, resume="latest",
                          **{"num_epochs": 2, "nft.old_decay_rate": 0.3, "checkpoint.every": 1})
    resumed.train()
    for a, b in zip(full.objective.old.shadow, resumed.objective.old.shadow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(full.params, resumed.params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_nft_options_are_checked_and_refused_elsewhere():
    from genalign.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="nft.beta must be > 0"):
        load_config("configs/digits_flow_grpo.yaml", ["method=diffusion_nft", "nft.beta=0"]).validate()
    with pytest.raises(ConfigError, match=r"nft.beta is set, but nft.\* are the options of method diffusion_nft"):
        load_config("configs/digits_flow_grpo.yaml", ["nft.beta=0.5"]).validate()
    cfg = load_config(None, ["method=diffusion_nft"])
    assert cfg.sampling.noise_level == 0.0 and cfg.method_spec().objective == "nft"


def test_nft_learns_on_digits(tmp_path):
    """A few epochs of DiffusionNFT on the shipped digits model raise the prompt accuracy (measured)."""
    from genalign.config import load_config
    from genalign.trainer import Trainer

    cfg = load_config("configs/digits_flow_grpo.yaml", [
        f"output_dir={tmp_path / 'run'}", "method=diffusion_nft", "sampling.noise_level=0", "train.kl_beta=0",
        "num_epochs=8", "eval.every=8", "eval.num_per_prompt=10", "eval.judge=false"])
    Trainer(cfg).train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [r["eval/digit_correct.accuracy"] for r in rows if "eval/digit_correct.accuracy" in r]
    assert evals[-1] > evals[0] + 0.1, evals
