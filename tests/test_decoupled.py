"""Forward-process ("decoupled") objectives on clean samples: AWM, DGPO, SFT and Diffusion-DPO (online on the
policy's samples, offline from a preference data set), data sets of images, DPPO's divergence mask and the KL
spaces. Gradients are checked against hand-written losses through autograd; learning on the digits task."""

import json

import pytest
import torch
import torch.nn.functional as F

from genalign.config import ConfigError, load_config
from genalign.objectives import EpochBatch
from genalign.objectives.dgpo import dgpo_group_loss, group_margins
from genalign.objectives.sft import top_k_mask

from .test_optim import assert_accumulation_invariant, perturb
from .test_trainer import make_trainer, prompts_file, sd3_dir  # noqa: F401

SMALL = {"sampling.noise_level": 0.0, "model.guidance_scale": 1.0}


def _units(trainer, epoch=0):
    with trainer.objective.sampling_context():
        traj, rewards, parts, group_ids, local = trainer.sample_epoch(epoch)
    return trainer.objective.prepare(epoch, EpochBatch(traj, rewards, parts, group_ids, local, trainer.plan(epoch)))


def _grads(trainer):
    return [p.grad.detach().clone() for p in trainer.params]


def _manual_grads(trainer, loss):
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return _grads(trainer)


def _assert_same(a, b):
    """Equal up to float32 summation order (micro-batches against one pass; CPU kernels differ by machine): an
    absolute tolerance of 1e-4 of the largest gradient entry (one machine's kernels differed by 3.6e-5 of it on a
    near-zero entry), far below any error of a weight or a term, which moves entries by a sizeable share of it."""
    scale = max(float(g.abs().max()) for g in a)
    assert scale > 0
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * scale)


# ---------------------------------------------------------------- AWM

@pytest.mark.parametrize("weighting", ["uniform", "t2"])
def test_awm_gradient_is_the_advantage_weighted_flow_matching_gradient(sd3_dir, tmp_path, prompts_file, weighting):
    """At ratio 1 (one optimizer step per epoch) d loss = sum_u A_u d(w(s) mse_u) / U (the PPO clip is inactive)."""
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{
        **SMALL, "method": "awm", "awm.weighting": weighting, "train.num_minibatches": 1})
    perturb(trainer)
    obj, u = trainer.objective, _units(trainer)
    assert "old" not in u.extra  # one step per epoch: the sampling policy's values are the current ones
    ids = obj.minibatches(u, 0, 0)[0]
    trainer.optimizer.zero_grad(set_to_none=True)
    stats = trainer.accumulate(u, ids)
    ours = _grads(trainer)
    assert stats["ratio_mean"].item() == pytest.approx(1.0) and stats["clip_frac"].item() == 0.0
    n = obj.noised(u, ids)
    v = trainer.policy.predict(n.x_t, n.timesteps, n.sub.cond)
    w = {"uniform": torch.ones_like(n.s), "t2": n.s ** 2}[weighting]
    mse = (v - (n.noise - n.x0)).pow(2).flatten(1).mean(1)
    adv = u.weight[u.rows[ids]]
    assert adv.abs().sum() > 0
    _assert_same(ours, _manual_grads(trainer, (adv * w * mse).sum() / len(ids)))


def test_awm_later_steps_use_the_sampling_policys_values_and_accumulate(sd3_dir, tmp_path, prompts_file):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{
        **SMALL, "method": "awm", "train.num_minibatches": 2, "train.clip_range": 0.5})
    obj, u = trainer.objective, _units(trainer)
    from genalign.objectives.awm import matching_log_likelihood

    ids = torch.arange(len(u.rows))
    n = obj.noised(u, ids)
    with torch.no_grad():
        now = matching_log_likelihood(trainer.policy.predict(n.x_t, n.timesteps, n.sub.cond).float(), n)
    torch.testing.assert_close(u.extra["old"], now)  # precomputed before any optimizer step
    perturb(trainer)
    assert_accumulation_invariant(trainer, u, obj.minibatches(u, 0, 0)[0])


# ---------------------------------------------------------------- DGPO

def test_dgpo_margins_and_group_loss_closed_form():
    adv, loss, ref = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0.2, 0.4, 0.1]), torch.tensor([0.3, 0.3, 0.3])
    m = group_margins(adv, loss, ref, torch.tensor([0, 0, 1]), 2, beta=10.0, group_size=2)
    # group 0: 10 / 2 * (1 * -0.1 + -1 * 0.1) = -1; group 1: 5 * (0.5 * -0.2) = -0.5
    torch.testing.assert_close(m, torch.tensor([-1.0, -0.5], dtype=torch.float64))
    torch.testing.assert_close(dgpo_group_loss(m, 10.0, 2), F.softplus(m) * 0.2)


def test_dgpo_gradient_equals_that_of_the_group_dpo_loss(sd3_dir, tmp_path, prompts_file):
    """The back-propagated surrogate sigmoid(m_g) A_i L_i has the gradient of sum_g (G / beta) softplus(m_g) / U,
    with the margins m_g built from the same units (members share their noise and step)."""
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{
        **SMALL, "method": "dgpo", "dgpo.beta": 20.0, "train.num_minibatches": 1, "dgpo.clip": False})
    perturb(trainer)
    obj, u = trainer.objective, _units(trainer)
    ids = obj.minibatches(u, 0, 0)[0]
    keys = obj._keys(u)[ids]
    for key in keys.unique():  # one noise per (group, step)
        seeds = u.seeds[ids][keys == key]
        assert (seeds == seeds[0]).all()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.accumulate(u, ids)
    ours = _grads(trainer)
    n = obj.noised(u, ids)
    v = trainer.policy.predict(n.x_t, n.timesteps, n.sub.cond)
    mse = (v - (n.noise - n.x0)).pow(2).flatten(1).mean(1)
    with torch.no_grad(), trainer.reference():
        ref = (trainer.policy.predict(n.x_t, n.timesteps, n.sub.cond) - (n.noise - n.x0)).pow(2).flatten(1).mean(1)
    adv = u.weight[u.rows[ids]]
    m = group_margins(adv, mse, ref, keys, obj.num_keys, 20.0, trainer.cfg.sampling.group_size)
    present = torch.zeros(obj.num_keys, dtype=torch.bool)
    present[keys] = True
    exact = dgpo_group_loss(m[present], 20.0, trainer.cfg.sampling.group_size).sum() / len(ids)
    _assert_same(ours, _manual_grads(trainer, exact.float()))


def test_dgpo_trust_region_drops_the_gradient_of_units_past_the_clip(sd3_dir, tmp_path, prompts_file):
    """dgpo.clip: against the old policy (the initial weights here), a unit whose ratio exp(L_old - L) passed the clip
    range in its advantage's direction contributes no gradient; the others keep sigmoid(m) A grad L."""
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{
        **SMALL, "method": "dgpo", "dgpo.beta": 20.0, "train.num_minibatches": 1, "train.clip_range": 1e-3})
    perturb(trainer, 0.02)  # policy != old policy (the copy taken at construction)
    obj, u = trainer.objective, _units(trainer)
    ids = obj.minibatches(u, 0, 0)[0]
    trainer.optimizer.zero_grad(set_to_none=True)
    stats = trainer.accumulate(u, ids)
    ours = _grads(trainer)
    n = obj.noised(u, ids)
    with torch.no_grad(), obj.old.swapped_in():
        old = (trainer.policy.predict(n.x_t, n.timesteps, n.sub.cond) - (n.noise - n.x0)).pow(2).flatten(1).mean(1)
    v = trainer.policy.predict(n.x_t, n.timesteps, n.sub.cond)
    mse = (v - (n.noise - n.x0)).pow(2).flatten(1).mean(1)
    adv = u.weight[u.rows[ids]]
    ratio = torch.exp(old - mse.detach())
    clipped = torch.where(adv > 0, ratio > 1 + 1e-3, ratio < 1 - 1e-3)
    assert 0 < int(clipped.sum()) < len(ids)  # both kinds present
    assert stats["clip_frac"].item() == pytest.approx(clipped.float().mean().item())
    weight = torch.sigmoid(obj.margins[obj._keys(u)[ids]]).float()
    surrogate = (weight * adv * torch.where(clipped, mse.detach(), mse)).sum() / len(ids)
    _assert_same(ours, _manual_grads(trainer, surrogate))


def test_dgpo_old_policy_follows_samples_and_resumes(sd3_dir, tmp_path, prompts_file):
    """The old policy blends towards the weights after every optimizer step (d = min(rate * steps, max)), draws the
    samples after dgpo.sample_with_old_after steps, and is checkpointed."""
    kw = {**SMALL, "method": "dgpo", "dgpo.old_decay_rate": 0.25, "dgpo.old_decay_max": 0.4,
          "dgpo.sample_with_old_after": 0, "checkpoint.every": 1}
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{**kw, "num_epochs": 2})
    obj = trainer.objective
    start = [p.detach().clone() for p in trainer.params]
    assert obj.sampling_context().__class__.__name__ == "nullcontext"  # no step yet
    trainer.train()
    assert obj.steps == 2  # 2 epochs x 1 optimizer step
    assert not all(torch.equal(a, p) for a, p in zip(obj.old.shadow, trainer.params))
    assert not all(torch.equal(a, b) for a, b in zip(obj.old.shadow, start))
    with obj.sampling_context():
        inside = [p.detach().clone() for p in trainer.params]
    assert all(torch.equal(a, b) for a, b in zip(inside, obj.old.shadow))
    resumed = make_trainer(sd3_dir, tmp_path / "run", prompts_file, resume="latest", **{**kw, "num_epochs": 2})
    assert resumed.objective.steps == 2
    for a, b in zip(resumed.objective.old.shadow, obj.old.shadow):
        torch.testing.assert_close(a, b)


def test_dgpo_can_measure_the_margins_against_the_old_policy(sd3_dir, tmp_path, prompts_file):
    """dgpo.reference = old: the margins compare with the EMA old policy, which equals the policy at the start (all
    margins 0, every group weight sigmoid(0) = 1/2), while against the base they are not 0 once the weights moved."""
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{**SMALL, "method": "dgpo",
                                                                       "dgpo.reference": "old"})
    perturb(trainer)
    trainer.objective.old.blend(0.0)  # the old policy follows the perturbed weights exactly
    obj, u = trainer.objective, _units(trainer)
    obj.before_step(u, obj.minibatches(u, 0, 0)[0])
    assert obj.margins.abs().max() == 0
    base = make_trainer(sd3_dir, tmp_path / "run2", prompts_file, **{**SMALL, "method": "dgpo"})
    perturb(base)
    u = _units(base)
    base.objective.before_step(u, base.objective.minibatches(u, 0, 0)[0])
    assert base.objective.margins.abs().max() > 0
    with pytest.raises(ConfigError, match="dgpo.reference = 'old' measures the margins against the EMA old policy"):
        load_config("configs/digits_flow_grpo.yaml", ["method=dgpo", "dgpo.reference=old", "dgpo.clip=false"]).validate()


def test_dgpo_optimizer_steps_hold_whole_groups(sd3_dir, tmp_path, prompts_file):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{
        **SMALL, "method": "dgpo", "train.num_minibatches": 2})
    obj, u = trainer.objective, _units(trainer)
    parts = obj.minibatches(u, 0, 0)
    assert sorted(torch.cat(parts).tolist()) == list(range(len(u.rows)))
    keys = [set(obj._keys(u)[p].tolist()) for p in parts]
    assert not keys[0] & keys[1]


# ---------------------------------------------------------------- SFT

def test_top_k_mask_keeps_the_best_of_each_group():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.8])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    assert top_k_mask(rewards, groups, 1).tolist() == [0, 1, 0, 0, 0, 1]
    assert top_k_mask(rewards, groups, 2).tolist() == [0, 1, 1, 1, 0, 1]  # tie: the earlier sample


def test_sft_loss_is_the_flow_matching_loss_of_the_kept_samples(sd3_dir, tmp_path, prompts_file):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{
        **SMALL, "method": "sft", "sft.top_k": 1, "train.num_minibatches": 1})
    obj, u = trainer.objective, _units(trainer)
    assert len(u.rows) == 2 * 2  # 2 groups, the best sample of each, 2 trained steps
    assert (u.weight[u.rows] == 1).all()
    ids = torch.arange(len(u.rows))
    trainer.optimizer.zero_grad(set_to_none=True)
    stats = trainer.accumulate(u, ids)
    n = obj.noised(u, ids)
    mse = (trainer.policy.predict(n.x_t, n.timesteps, n.sub.cond) - (n.noise - n.x0)).pow(2).flatten(1).mean(1)
    assert stats["loss"].item() == pytest.approx(mse.mean().item(), rel=1e-5)


def test_sft_can_sample_from_the_frozen_reference(sd3_dir, tmp_path, prompts_file):
    """sft.sample_from = reference: the epoch's samples come from the base (adapters disabled), not the policy."""
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{
        **SMALL, "method": "sft", "sft.top_k": 1, "sft.sample_from": "reference"})
    perturb(trainer)
    with trainer.objective.sampling_context():
        drawn = trainer.sample_epoch(0)[0].final
    with trainer.reference():
        base = trainer.sample_epoch(0)[0].final
    policy = trainer.sample_epoch(0)[0].final
    assert torch.equal(drawn, base) and not torch.allclose(drawn, policy)
    with pytest.raises(ConfigError, match="sft.sample_from chooses who samples; with data.train_file"):
        load_config("configs/digits_flow_grpo.yaml", ["method=sft", "sft.sample_from=reference",
                                            "data.train_file=x.jsonl"]).validate()


# ---------------------------------------------------------------- data sets

def _write_digits(folder, pairs: bool, n_per_digit: int = 8, seed: int = 0):
    """A data set of real 8x8 digits (scikit-learn's held-out split) for the digits prompts: demonstrations of the
    prompted digit, or pairs (chosen: the prompted digit, rejected: another digit)."""
    from PIL import Image

    from genalign.pipelines.digits import load_split
    from genalign.prompts import read_prompts

    _, _, x, y = load_split()
    prompts = read_prompts("digits:prompts_train.txt")
    from genalign.pipelines.digits import prompt_digit

    g = torch.Generator().manual_seed(seed)
    lines = []
    for i, prompt in enumerate(prompts):
        d = prompt_digit(prompt)
        same, other = (y == d).nonzero().flatten(), (y != d).nonzero().flatten()
        for k in range(n_per_digit):
            a = int(same[torch.randint(len(same), (1,), generator=g)])
            names = []
            for j, idx in enumerate([a] + ([int(other[torch.randint(len(other), (1,), generator=g)])] if pairs else [])):
                name = f"{i}_{k}_{j}.png"
                pixels = ((x[idx, 0] + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels, mode="L").save(folder / name)
                names.append(name)
            rec = {"prompt": prompt, **({"chosen": names[0], "rejected": names[1]} if pairs else {"image": names[0]})}
            lines.append(json.dumps(rec))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_data_set_records_and_errors(tmp_path):
    from genalign.datasets import load_image, read_image_records

    path = _write_digits(tmp_path, pairs=True, n_per_digit=1)
    records = read_image_records(path, "pairs")
    assert len(records[0]["images"]) == 2 and all(p.startswith(str(tmp_path)) for p in records[0]["images"])
    with pytest.raises(ValueError, match="line 1: needs an image path in 'image'"):
        read_image_records(path, "image")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "one", "image": "nope.png"}\n')
    with pytest.raises(FileNotFoundError, match="line 1: image image .*nope.png' does not exist"):
        read_image_records(str(bad), "image")
    img = load_image(records[0]["images"][0], 8, 8)
    assert img.shape == (3, 8, 8) and 0 <= img.min() and img.max() <= 1
    assert load_image(records[0]["images"][0], 4, 4).shape == (3, 4, 4)  # resized and centre-cropped


def test_digits_encode_images_inverts_decode():
    from genalign.pipelines.digits import DigitsPolicy

    policy = DigitsPolicy.from_pretrained("digits")
    latents = torch.rand(3, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(policy.encode_images(policy.decode(latents)), latents)


def test_flux_encode_images_packs_like_the_rollout():
    from genalign.pipelines.flux import FluxPolicy

    from . import tiny_models as tm

    policy = FluxPolicy(tm.tiny_flux(), height=tm.TINY_RES, width=tm.TINY_RES)
    z = policy.encode_images(torch.rand(2, 3, tm.TINY_RES, tm.TINY_RES))
    assert tuple(z.shape[1:]) == tuple(policy.latent_shape)
    with pytest.raises(ValueError, match="expects \\[B, 3, 64, 64\\]"):
        policy.encode_images(torch.rand(2, 3, 32, 32))


def _digits_run(tmp_path, *overrides):
    from genalign.trainer import Trainer

    cfg = load_config("configs/digits_flow_grpo.yaml", [f"output_dir={tmp_path / 'run'}", "eval.judge=false",
                                              "eval.num_per_prompt=10", *overrides])
    Trainer(cfg).train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    return [r["eval/digit_correct.accuracy"] for r in rows if "eval/digit_correct.accuracy" in r], rows


def test_offline_diffusion_dpo_on_preference_pairs_learns_on_digits(tmp_path):
    """Pairs (the prompted real digit over another real digit) raise the prompt accuracy (measured)."""
    data = _write_digits(tmp_path, pairs=True)
    evals, rows = _digits_run(tmp_path, "method=diffusion_dpo", f"data.train_file={data}", "num_epochs=6",
                              "eval.every=6", "train.kl_beta=0", "dragon.beta=500", "train.lr=1e-3")
    records = len(open(data).read().splitlines())
    assert rows[1]["samples_seen"] == 2 * records  # every pair of the set, two images each
    assert "reward/mean" not in rows[1]
    assert evals[-1] > evals[0] + 0.05, evals


def test_sft_on_demonstrations_learns_on_digits(tmp_path):
    data = _write_digits(tmp_path, pairs=False)
    evals, _ = _digits_run(tmp_path, "method=sft", f"data.train_file={data}", "num_epochs=6", "eval.every=6",
                           "train.kl_beta=0", "train.lr=1e-3")
    assert evals[-1] > evals[0] + 0.05, evals


def test_data_options_are_checked():
    with pytest.raises(ConfigError, match="data.train_file must be a .jsonl"):
        load_config("configs/digits_flow_grpo.yaml", ["method=sft", "data.train_file=x.txt"]).validate()
    with pytest.raises(ConfigError, match="data.train_file is an option of method diffusion_dpo / sft, not of "
                                          "method flow_grpo"):
        load_config("configs/digits_flow_grpo.yaml", ["data.train_file=x.jsonl"]).validate()
    with pytest.raises(ConfigError, match="sft.top_k must be an int in \\[1, sampling.group_size"):
        load_config("configs/digits_flow_grpo.yaml", ["method=sft", "sft.top_k=99"]).validate()
    with pytest.raises(ConfigError, match="dragon.loss='kto', dragon.pairing='unpaired' belong to method dragon"):
        load_config("configs/digits_flow_grpo.yaml", ["method=diffusion_dpo", "dragon.loss=kto",
                                            "dragon.pairing=unpaired"]).validate()


# ---------------------------------------------------------------- DPPO mask and KL spaces

def test_dppo_mask_drops_only_tokens_past_the_trust_region_moving_away():
    from genalign.losses import get_surrogate

    log_r = torch.log(torch.tensor([[1.2, 0.8, 1.2, 0.8, 1.2]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]])
    div = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1e-9]])
    out = get_surrogate("dppo_mask")(log_r, adv, log_r, eps_low=0.2, divergence=div, threshold=1e-6)
    # masked: A > 0 with r > 1 (token 0), A < 0 with r < 1 (token 3); token 4 is inside the trust region
    assert out.clipped.tolist() == [[True, False, False, True, False]]
    torch.testing.assert_close(out.loss, -adv * log_r.exp())
    out.loss.sum().backward()
    expected = torch.where(out.clipped, torch.zeros(()), -adv * log_r.detach().exp())
    torch.testing.assert_close(log_r.grad, expected)


def test_dppo_surrogate_trains_the_policy_gradient_objective(sd3_dir, tmp_path, prompts_file):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{
        "train.surrogate": "dppo_mask", "sampling.noise_level": 0.7})
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train()
    assert metrics["ratio_mean"] == 1.0 and metrics["clip_frac"] == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params))


def test_velocity_space_kl_of_the_policy_gradient_objective(sd3_dir, tmp_path, prompts_file):
    """train.kl_space = v: the KL term is mean (v - v_ref)^2 at the trained step's input."""
    from genalign.rollout import recompute_step

    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{
        "train.kl_beta": 1.0, "train.kl_space": "v", "sampling.noise_level": 0.7})
    perturb(trainer)
    traj, rewards, _, group_ids, _ = trainer.sample_epoch(0)
    adv, valid = trainer.compute_advantages(rewards, group_ids)
    j = torch.zeros(len(traj), dtype=torch.long)
    _, st = trainer.objective.token_loss(traj, adv, valid, j, valid.sum().float(), float(len(traj)), 1)
    with torch.no_grad():
        v = recompute_step(trainer.policy, traj, j).model_output
        with trainer.reference():
            v_ref = recompute_step(trainer.policy, traj, j).model_output
    expected = (v - v_ref).pow(2).flatten(1).mean(1)[valid].mean()
    assert st["kl"].item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="train.kl_space"):
        load_config(None, ["train.kl_space=w"]).validate()


def test_forward_process_kl_in_latent_space_scales_by_the_noise_level(sd3_dir, tmp_path, prompts_file):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{
        **SMALL, "method": "sft", "train.kl_beta": 1.0, "train.kl_space": "x"})
    perturb(trainer)
    obj, u = trainer.objective, _units(trainer)
    n = obj.noised(u, torch.arange(4))
    with torch.no_grad():
        v = trainer.policy.predict(n.x_t, n.timesteps, n.sub.cond)
        with trainer.reference():
            v_ref = trainer.policy.predict(n.x_t, n.timesteps, n.sub.cond)
        kl = obj.kl_term(v, n)
    expected = (n.s[:, None, None, None] * (v - v_ref)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(kl, expected)
    assert (kl > 0).all()


def test_reference_device_needs_a_reference_copy():
    with pytest.raises(ConfigError, match="train.reference_device = 'cpu' places the frozen reference copy"):
        load_config(None, ["train.reference_device=cpu"]).validate()


@pytest.mark.parametrize("method", ["sft", "dragon"])
def test_flow_matching_objectives_refuse_ddpm_models(tmp_path, prompts_file, method):  # noqa: F811
    from .tiny_models import save_pipeline, tiny_sd

    path = save_pipeline(tiny_sd(with_text_encoders=True), tmp_path / "sd")
    with pytest.raises(ConfigError, match=f"method {method} trains on the flow-matching loss, which needs a "
                                          f"flow-matching model; DDPMPolicy"):
        make_trainer(path, tmp_path / "run", prompts_file, **{"method": method, "sampling.step_kind": "ddim",
                                                              "sampling.noise_level": 1.0})


def _adapter_case(name):
    """(saved tiny pipeline builder, model overrides) of each flow-matching adapter."""
    from . import tiny_models as tm

    if name == "flux":
        return (lambda: tm.tiny_flux(with_text_encoders=True),
                {"model.height": tm.TINY_RES, "model.width": tm.TINY_RES, "model.guidance_scale": 3.5})
    if name == "qwen_image":
        from .tiny_qwen_image import TINY_QWEN_RES, tiny_qwen_image
        return (lambda: tiny_qwen_image(with_text_encoders=True),
                {"model.height": TINY_QWEN_RES, "model.width": TINY_QWEN_RES, "model.guidance_scale": "null"})
    if name == "z_image":
        from .tiny_z_image import Z_IMAGE_RES, tiny_z_image
        return (lambda: tiny_z_image(with_text_encoders=True),
                {"model.height": Z_IMAGE_RES, "model.width": Z_IMAGE_RES, "model.guidance_scale": 0.0})
    if name == "flux2":
        from .tiny_flux2 import TINY_FLUX2_RES, tiny_flux2_klein
        return (lambda: tiny_flux2_klein(with_text_encoders=True),
                {"model.height": TINY_FLUX2_RES, "model.width": TINY_FLUX2_RES, "model.guidance_scale": 1.0})
    if name == "flux_kontext":
        from .tiny_kontext import tiny_kontext
        return (tiny_kontext, {"model.height": tm.TINY_RES, "model.width": tm.TINY_RES, "model.guidance_scale": 3.5,
                               "model.condition_size": 32})
    from .tiny_wan import TINY_FRAMES, TINY_WAN_RES, tiny_wan
    return (lambda: tiny_wan(with_text_encoders=True),
            {"model.height": TINY_WAN_RES, "model.width": TINY_WAN_RES, "model.guidance_scale": 1.0,
             "model.options": f"{{num_frames: {TINY_FRAMES}}}"})


@pytest.mark.parametrize("adapter", ["flux", "flux_kontext", "qwen_image", "z_image", "flux2", "wan"])
def test_group_preference_objective_trains_every_flow_adapter(tmp_path, prompts_file, adapter):  # noqa: F811
    """One epoch of DGPO (reference forward, group-shared noise, forward-process units) on each flow-matching
    adapter's tiny model, loaded by path (Kontext: prompts with condition images): the LoRA weights change and every
    statistic is finite."""
    from .tiny_models import save_pipeline

    build, model = _adapter_case(adapter)
    path = save_pipeline(build(), tmp_path / adapter)
    if adapter == "flux_kontext":
        from .tiny_kontext import write_png

        prompts_file = tmp_path / "edits.jsonl"
        prompts_file.write_text("".join(json.dumps({"prompt": p, "image": write_png(tmp_path / f"{i}.png", 32, 48, i)})
                                        + "\n" for i, p in enumerate(["make it red", "add a hat", "night"])))
    trainer = make_trainer(path, tmp_path / "run", str(prompts_file), **{**SMALL, **model, "method": "dgpo",
                                                                     "train.ema": False})
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params))
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if isinstance(v, float))
    assert metrics["grad_norm"] > 0 and 0 < metrics["dgpo/sigmoid_margin"] < 1


@pytest.mark.parametrize("overrides, refused", [
    (["method=dgpo"], True),                                   # its margins use the base
    (["method=dgpo", "dgpo.reference=old"], False),            # the EMA old policy instead
    (["method=sft", "sft.sample_from=reference"], True),       # the base draws the samples
    (["method=sft"], False),
    (["method=diffusion_dpo"], True),
])
def test_full_fine_tuning_needs_a_reference_copy_when_the_method_uses_the_base(tmp_path, overrides, refused):
    from genalign.trainer import Trainer

    cfg = load_config("configs/digits_flow_grpo.yaml", [f"output_dir={tmp_path}", "lora.enabled=false", "train.kl_beta=0",
                                              "eval_prompts_file=null", *overrides])
    if refused:
        with pytest.raises(ConfigError, match=f"method {cfg.method} .* uses the reference policy, which full "
                                              f"fine-tuning has no copy of"):
            Trainer(cfg)
    else:
        assert Trainer(cfg).frozen_reference is None
