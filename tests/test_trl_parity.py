"""genalign's losses and advantages against TRL's own code, on identical tensors.

TRL's trainers are built for real (tiny offline GPT-2, no download) with the TRL config that selects each
method; their loss method then runs on inputs we choose:

* GRPO family: ``GRPOTrainer._compute_loss`` with the instance's ``_get_per_token_logps_and_entropies``
  replaced by one returning our per-token log-prob tensor (a leaf), so value AND gradient w.r.t. the
  per-token log-probs are compared with :func:`genalign.pipelines.llm.grpo_loss` (the loss of
  ``grpo_step``) under the matching ``GRPOStepConfig``;
* advantages: ``GRPOTrainer._generate_and_score_completions`` (real generation, rewards from a reward
  function that returns preset values) against ``genalign.advantages.grpo(unbiased=True)``;
* DPO (``loss_type="sigmoid"``) and KTO (``loss_type="kto"``): ``DPOTrainer._compute_loss`` /
  ``KTOTrainer._compute_loss`` with a stand-in model whose fused-LM-head output carries our per-token
  log-probs, and reference log-probs passed precomputed in the batch.

Everything runs in float64 and is compared at rtol 1e-9 / atol 1e-12, so a difference in a formula, a
normaliser or a stop-gradient shows. The harness reads TRL internals (written against TRL 1.16); an
AttributeError or KeyError from TRL means the harness needs updating, not that genalign changed.
"""

from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

from genalign import losses as L  # noqa: E402
from genalign.advantages import compute_advantages  # noqa: E402
from genalign.pipelines import llm  # noqa: E402

from .test_llm import _tokenizer  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-12)
F64 = torch.float64


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def _tiny_model(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok), n_positions=64, bos_token_id=tok.eos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    """The tiny model saved locally: GRPOTrainer reloads its reference model from this path when beta != 0."""
    path = tmp_path_factory.mktemp("tiny_gpt2")
    _tiny_model(tok).save_pretrained(path)
    return str(path)


def _score(completions, score, **kwargs):
    """TRL reward function: the preset ``score`` column of each example."""
    return list(score)


def _common(tmp_path):
    return dict(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, save_strategy="no", bf16=False)


def _grpo_trainer(tmp_path, tok, model_dir, **args):
    args = {"per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 16, "beta": 0.0, **args}
    config = trl.GRPOConfig(**_common(tmp_path), **args)
    data = datasets.Dataset.from_dict({"prompt": ["the cat", "a dog"] * 4, "score": [0.0] * 8})
    trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=_score, args=config, train_dataset=data,
                              processing_class=tok)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = config.gradient_accumulation_steps  # set by the training loop
    return trainer


def _trl_grpo_loss(trainer, logp, old, mask, adv, ref=None, num_items=None):
    """TRL's GRPO-family loss on our tensors: logp ``[B, T]`` (a leaf), old/ref ``[B, T]``, adv ``[B]``."""
    B, T = logp.shape
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    inputs = {"prompt_ids": torch.ones(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old,
              "num_items_in_batch": mask.sum() if num_items is None else num_items}
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return trainer._compute_loss(trainer.model, inputs)


def _batch(seed, B=12, T=6, noise=0.3, groups=3):
    """Random per-token log-probs (old, ref, current as a leaf), a prefix mask, rewards with one flat group."""
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(B, T, generator=g, dtype=F64)
    logp = (old + noise * torch.randn(B, T, generator=g, dtype=F64)).requires_grad_(True)
    ref = old + 0.2 * torch.randn(B, T, generator=g, dtype=F64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths.unsqueeze(1)
    rewards = torch.randn(B, generator=g, dtype=F64)
    rewards[B // groups: 2 * B // groups] = 0.5  # group 1 has no reward variance
    gids = torch.arange(B) // (B // groups)
    return logp, old, ref, mask, rewards, gids


# name: (TRL GRPOConfig arguments, GRPOStepConfig arguments, log-prob noise)
CASES = {
    "grpo": (dict(loss_type="grpo", epsilon=0.2), dict(aggregation="seq_mean_token_mean"), 0.3),
    "dapo": (dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28), dict(eps_high=0.28), 0.3),  # auto: token_mean
    "dr_grpo": (dict(loss_type="dr_grpo", epsilon=0.2, max_completion_length=16),
                dict(aggregation="constant", constant_normalizer=16, advantage="dr_grpo"), 0.3),
    # GSPO with TRL's recommended clip range; the aggregation is genalign's automatic one for ratio_level sequence
    "gspo": (dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
             dict(ratio_level="sequence", eps_low=3e-4, eps_high=4e-4), 1e-3),
    "gspo_token_mean": (dict(loss_type="dapo", importance_sampling_level="sequence", epsilon=0.2, epsilon_high=0.28),
                        dict(ratio_level="sequence", aggregation="token_mean", eps_high=0.28), 0.3),
    "grpo_kl": (dict(loss_type="grpo", epsilon=0.2, beta=0.04, use_bias_correction_kl=False),
                dict(aggregation="seq_mean_token_mean", kl_kind="k3", kl_coef=0.04), 0.3),
    "dapo_kl": (dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.04, use_bias_correction_kl=False),
                dict(eps_high=0.28, kl_kind="k3", kl_coef=0.04), 0.3),
}


def _genalign(cfg, logp, old, ref, mask, rewards, gids):
    prep = llm.grpo_prepare(rewards, gids, mask, cfg)
    loss, stats = llm.grpo_loss(logp, old, prep.advantages, prep.mask, prep.counts, cfg,
                                ref_logp=ref if cfg.kl_kind else None)
    return loss, prep.advantages, stats


@pytest.mark.parametrize("name", list(CASES))
def test_grpo_family_loss_and_gradient_match_trl(tmp_path, tok, model_dir, name):
    trl_args, ours, noise = CASES[name]
    logp, old, ref, mask, rewards, gids = _batch(1, noise=noise)
    cfg = llm.GRPOStepConfig(**ours, advantage_options={} if "advantage" in ours else {"unbiased": True},
                             filter_zero_std_groups=False)
    loss, adv, stats = _genalign(cfg, logp, old, ref, mask, rewards, gids)
    (grad,) = torch.autograd.grad(loss, logp)
    trainer = _grpo_trainer(tmp_path, tok, model_dir, **trl_args)
    trl_loss = _trl_grpo_loss(trainer, logp, old, mask, adv, ref=ref if trainer.beta else None)
    (trl_grad,) = torch.autograd.grad(trl_loss, logp)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    torch.testing.assert_close(grad, trl_grad, **TOL)
    assert grad.abs().sum() > 0 and 0 < stats["clip_frac"] < 1  # some tokens clipped, some not: a real check


def test_gspo_default_aggregation_is_trls_grpo_normalisation(tmp_path, tok, model_dir):
    """GSPO's ratio is one per sequence; TRL averages the loss over sequences (loss_type 'grpo'). With the old
    default (token_mean) long sequences would weigh more."""
    logp, old, ref, mask, rewards, gids = _batch(2, noise=0.3)
    trainer = _grpo_trainer(tmp_path, tok, model_dir, loss_type="grpo", importance_sampling_level="sequence",
                            epsilon=0.2, epsilon_high=0.28)
    auto = llm.GRPOStepConfig(ratio_level="sequence", eps_high=0.28, filter_zero_std_groups=False,
                              advantage_options={"unbiased": True})
    token = llm.GRPOStepConfig(**{**auto.__dict__, "aggregation": "token_mean"})
    loss_auto, adv, _ = _genalign(auto, logp, old, ref, mask, rewards, gids)
    loss_token, _, _ = _genalign(token, logp, old, ref, mask, rewards, gids)
    trl_loss = _trl_grpo_loss(trainer, logp, old, mask, adv)
    torch.testing.assert_close(loss_auto, trl_loss, **TOL)
    assert not torch.allclose(loss_token, trl_loss, **TOL)


@pytest.mark.parametrize("name", ["grpo", "dapo", "dr_grpo"])
def test_gradient_accumulation_matches_trl(tmp_path, tok, model_dir, name):
    """Two micro-batches (TRL: gradient_accumulation_steps = steps_per_generation = 2) sum to the full-batch
    loss in both: genalign through global counts, TRL through its per-loss-type normalisers."""
    trl_args, ours, noise = CASES[name]
    logp, old, ref, mask, rewards, gids = _batch(3, B=16, noise=noise, groups=4)
    cfg = llm.GRPOStepConfig(**ours, filter_zero_std_groups=False)
    prep = llm.grpo_prepare(rewards, gids, mask, cfg)
    trainer = _grpo_trainer(tmp_path, tok, model_dir, gradient_accumulation_steps=2, **trl_args)
    assert trainer.args.steps_per_generation == 2
    ours_total = trl_total = 0.0
    for sl in (slice(0, 8), slice(8, 16)):
        ours_total = ours_total + llm.grpo_loss(logp[sl], old[sl], prep.advantages[sl], prep.mask[sl], prep.counts,
                                                cfg)[0]
        trl_total = trl_total + _trl_grpo_loss(trainer, logp[sl], old[sl], mask[sl], prep.advantages[sl],
                                               num_items=mask.sum())
    g_ours, = torch.autograd.grad(ours_total, logp)
    g_trl, = torch.autograd.grad(trl_total, logp)
    torch.testing.assert_close(ours_total, trl_total, **TOL)
    torch.testing.assert_close(g_ours, g_trl, **TOL)
    full, _ = llm.grpo_loss(logp, old, prep.advantages, prep.mask, prep.counts, cfg)
    torch.testing.assert_close(full, ours_total, **TOL)


@pytest.mark.parametrize("name", ["grpo", "dapo", "dr_grpo"])
def test_filtering_zero_variance_groups_is_trl_without_those_groups(tmp_path, tok, model_dir, name):
    """filter_zero_std_groups=True (the default) equals TRL run on the batch with the flat groups removed; the
    TRL-exact setting (False) keeps their tokens in the denominators, which changes token_mean / constant."""
    trl_args, ours, noise = CASES[name]
    logp, old, ref, mask, rewards, gids = _batch(4, noise=noise)
    cfg = llm.GRPOStepConfig(**ours, advantage_options={} if "advantage" in ours else {"unbiased": True})
    loss, adv, _ = _genalign(cfg, logp, old, ref, mask, rewards, gids)
    (grad,) = torch.autograd.grad(loss, logp)
    keep = gids != 1
    leaf = logp.detach()[keep].requires_grad_(True)
    trainer = _grpo_trainer(tmp_path, tok, model_dir, **trl_args)
    trl_loss = _trl_grpo_loss(trainer, leaf, old[keep], mask[keep], adv[keep])
    (trl_grad,) = torch.autograd.grad(trl_loss, leaf)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    torch.testing.assert_close(grad[keep], trl_grad, **TOL)
    assert grad[~keep].abs().sum() == 0
    full = _trl_grpo_loss(trainer, logp, old, mask, adv)  # TRL on the whole batch: the flat group dilutes the loss
    assert not torch.allclose(loss, full, **TOL)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_trl_generate_and_score(tmp_path, tok, model_dir, scale):
    rewards = torch.tensor([0.5, 1.0, -2.0, 3.0, 1.0, 1.0, 1.0, 1.0])  # the second group is flat
    trainer = _grpo_trainer(tmp_path, tok, model_dir, scale_rewards=scale)
    inputs = [{"prompt": p, "score": float(r)} for p, r in zip(["the cat"] * 4 + ["a dog"] * 4, rewards)]
    with torch.no_grad():
        out = trainer._generate_and_score_completions(inputs)
    gids = torch.arange(8) // 4
    ours = compute_advantages("grpo", rewards, gids, std=scale, eps=1e-4, unbiased=True)
    torch.testing.assert_close(ours, out["advantages"].float(), rtol=1e-6, atol=1e-6)
    if scale != "none":  # TRL's std is the sample (unbiased) one: genalign's default population std differs
        biased = compute_advantages("grpo", rewards, gids, std=scale, eps=1e-4)
        assert not torch.allclose(biased, out["advantages"].float(), rtol=1e-3, atol=1e-3)


def test_trl_bias_corrected_kl_is_the_ratio_weighted_k3(tmp_path, tok, model_dir):
    """TRL's default use_bias_correction_kl=True multiplies the per-token k3 by the (differentiable) ratio.
    GRPOStepConfig has no such option; policy_loss reproduces it with a precomputed ``kl=``."""
    logp, old, ref, mask, rewards, gids = _batch(5)
    adv = compute_advantages("grpo", rewards, gids, unbiased=True)
    trainer = _grpo_trainer(tmp_path, tok, model_dir, loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.04)
    assert trainer.args.use_bias_correction_kl
    kl = L.kl_divergence(logp, ref, "k3") * torch.exp(logp - old)
    loss, _ = L.policy_loss(logp, old, adv, mask, eps_high=0.28, kl=kl, kl_coef=0.04)
    trl_loss = _trl_grpo_loss(trainer, logp, old, mask, adv, ref=ref)
    g, = torch.autograd.grad(loss, logp)
    g_trl, = torch.autograd.grad(trl_loss, logp)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    torch.testing.assert_close(g, g_trl, **TOL)


# ---------------------------------------------------------------------------------------------------
# DPO and KTO: a stand-in model returns our per-token log-probs as TRL's fused LM head output


def _fused_output(log_probs):
    z = torch.zeros_like(log_probs)
    return SimpleNamespace(log_probs=log_probs, entropy=z, mean_logits=z, is_top1=z.bool(), log_sum_sq_probs=z,
                           aux_loss=None, loss=None)


def _ids(B, width, offset):
    return 3 + (torch.arange(B * width).view(B, width) + offset) % 15


@pytest.fixture(scope="module")
def dpo_trainer(tmp_path_factory, tok):
    data = datasets.Dataset.from_dict({"prompt": ["the cat", "a dog"], "chosen": [" sat", " ran"],
                                       "rejected": [" on", " mat"]})
    config = trl.DPOConfig(**_common(tmp_path_factory.mktemp("dpo")), per_device_train_batch_size=2, beta=0.3,
                           precompute_ref_log_probs=True)
    trainer = trl.DPOTrainer(model=_tiny_model(tok), args=config, train_dataset=data, processing_class=tok)
    trainer.model.train()
    return trainer


def test_dpo_sigmoid_loss_and_gradient_match_trl(dpo_trainer):
    assert dpo_trainer.loss_types == ["sigmoid"]
    g = torch.Generator().manual_seed(6)
    B, T = 5, 7
    logp = (-2 * torch.rand(2 * B, T, generator=g, dtype=F64)).requires_grad_(True)  # chosen rows, then rejected
    mask = torch.arange(T) < torch.randint(1, T + 1, (2 * B, 1), generator=g)
    ref_c, ref_r = (-T * torch.rand(B, generator=g, dtype=F64) for _ in range(2))
    inputs = {"input_ids": _ids(2 * B, T + 1, 0), "attention_mask": torch.ones(2 * B, T + 1, dtype=torch.long),
              "completion_mask": torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), mask.long()], 1),
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    trl_loss = dpo_trainer._compute_loss(lambda **kw: _fused_output(logp * mask), inputs, return_outputs=False)
    summed = L.masked_sum(logp, mask, dim=1)
    loss = L.dpo_loss(summed[:B], summed[B:], ref_c, ref_r, beta=0.3).mean()
    g_ours, = torch.autograd.grad(loss, logp)
    g_trl, = torch.autograd.grad(trl_loss, logp)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    torch.testing.assert_close(g_ours, g_trl, **TOL)


@pytest.fixture(scope="module")
def kto_trainer(tmp_path_factory, tok):
    data = datasets.Dataset.from_dict({"prompt": ["the cat", "a dog"] * 2, "label": [True, False, True, False],
                                       "completion": [" sat", " ran", " on", " mat"]})
    config = trl.KTOConfig(**_common(tmp_path_factory.mktemp("kto")), per_device_train_batch_size=4, beta=0.3,
                           desirable_weight=1.3, undesirable_weight=0.7, precompute_ref_log_probs=True)
    trainer = trl.KTOTrainer(model=_tiny_model(tok), args=config, train_dataset=data, processing_class=tok)
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("kl_shift", [0.5, -3.0])  # positive KL estimate, and a negative one (clamped to 0)
def test_kto_loss_gradient_and_reference_point_match_trl(kto_trainer, kl_shift):
    assert kto_trainer.loss_type == "kto" and kto_trainer.calculate_KL and kto_trainer.precompute_ref_logps
    g = torch.Generator().manual_seed(7)
    B, T = 6, 5
    logp = (-2 * torch.rand(B, T, generator=g, dtype=F64)).requires_grad_(True)
    kl_logp = (-2 * torch.rand(B, T, generator=g, dtype=F64)).requires_grad_(True)
    mask = torch.arange(T) < torch.randint(1, T + 1, (B, 1), generator=g)
    kl_mask = torch.arange(T) < torch.randint(1, T + 1, (B, 1), generator=g)
    labels = torch.tensor([True, False, False, True, False, True])
    ref = L.masked_sum(logp.detach(), mask, 1) + 0.5 * torch.randn(B, generator=g, dtype=F64)
    ref_kl = L.masked_sum(kl_logp.detach(), kl_mask, 1) - kl_shift + 0.1 * torch.randn(B, generator=g, dtype=F64)
    ids, kl_ids = _ids(B, T + 1, 0), _ids(B, T + 1, 7)
    ones = torch.ones(B, T + 1, dtype=torch.long)
    zero_col = torch.zeros(B, 1, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": ones, "completion_mask": torch.cat([zero_col, mask.long()], 1),
             "label": labels, "KL_input_ids": kl_ids, "KL_attention_mask": ones,
             "KL_completion_mask": torch.cat([zero_col, kl_mask.long()], 1), "ref_logps": ref, "ref_KL_logps": ref_kl}

    def model(**kw):
        is_kl = torch.equal(kw["input_ids"], kl_ids)
        return _fused_output(kl_logp * kl_mask if is_kl else logp * mask)

    kto_trainer._metrics["train"].clear()
    trl_loss = kto_trainer._compute_loss(model, batch, return_outputs=False)
    out = L.kto_loss(logp, ref, labels, kl_logp, ref_kl, beta=0.3, desirable_weight=1.3, undesirable_weight=0.7,
                     mask=mask, kl_mask=kl_mask)
    loss = out.losses.mean()
    g_ours, = torch.autograd.grad(loss, logp)
    g_trl, = torch.autograd.grad(trl_loss, logp)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    torch.testing.assert_close(g_ours, g_trl, **TOL)
    metrics = kto_trainer._metrics["train"]
    assert abs(metrics["kl"][-1] - out.kl.item()) < 1e-12
    assert (out.kl == 0) == (kl_shift < 0)
    assert abs(metrics["rewards/chosen"][-1] - out.rewards[labels].mean().item()) < 1e-12
    assert abs(metrics["rewards/rejected"][-1] - out.rewards[~labels].mean().item()) < 1e-12
