"""The trainer on tiny offline pipelines: learning, exact first ratio, accumulation invariance, LoRA export,
resume, and bad input."""

import json
from pathlib import Path

import pytest
import torch

from genalign.config import ConfigError, load_config
from genalign.rewards import RewardError
from genalign.trainer import Trainer

from .tiny_models import save_pipeline, tiny_sd3

REWARDS = Path(__file__).parent / "data" / "toy_rewards.py"


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return save_pipeline(tiny_sd3(with_text_encoders=True), tmp_path_factory.mktemp("sd3"))


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\na dog\na red car\n")
    return str(path)


def tiny_overrides(model_dir, out_dir, prompts_file, reward="brightness", **extra):
    base = {
        "model.id": model_dir, "output_dir": str(out_dir), "num_epochs": 1, "seed": 0,
        "sampling.num_steps": 3, "sampling.groups_per_epoch": 2, "sampling.group_size": 4, "sampling.batch_size": 4,
        "train.batch_size": 4, "train.num_minibatches": 1, "train.clip_range": 0.2, "train.lr": 1e-3,
        "lora.rank": 4, "lora.alpha": 8.0, "prompts_file": prompts_file, "eval_prompts_file": "null",
        "reward": f"{REWARDS}:{reward}", "model.guidance_scale": 2.0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def make_trainer(*args, resume=None, **kw):
    return Trainer(load_config(None, tiny_overrides(*args, **kw)), resume=resume)


def lora_params(trainer):
    return {n: p.detach().clone() for n, p in trainer.denoiser.named_parameters() if p.requires_grad}


def test_one_epoch_changes_parameters_and_first_ratio_is_exactly_one(sd3_dir, tmp_path, prompts_file):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file)
    before = lora_params(trainer)
    metrics = trainer.train()
    after = lora_params(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    # one minibatch, one inner epoch, train batch == rollout batch: every ratio is exactly 1
    assert metrics["ratio_mean"] == 1.0 and metrics["ratio_std"] == 0.0 and metrics["clip_frac"] == 0.0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    for key in ("reward/mean", "adv/std", "ratio_mean", "clip_frac", "approx_kl", "grad_norm", "lr", "samples_per_s"):
        assert key in rows[-1]
    assert (tmp_path / "run" / "final" / "lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "reward_curve.png").is_file()


def test_gradient_accumulation_does_not_change_loss_or_gradients(sd3_dir, tmp_path, prompts_file):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{"train.kl_beta": 0.1})
    traj, rewards, _, group_ids, local = trainer.sample_epoch(0)
    adv, valid = trainer.compute_advantages(rewards, group_ids)
    steps = torch.tensor(trainer.trainable_steps()).expand(len(traj), -1)
    ids = torch.arange(len(traj))
    results = []
    for micro in (8, 2):
        trainer.cfg.train.batch_size = micro
        trainer.optimizer.zero_grad(set_to_none=True)
        stats = trainer.accumulate(trainer.objective.units_for(traj, adv[local], valid[local], steps), ids)
        results.append((stats["loss"], [p.grad.clone() for p in trainer.params]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads_a)


def test_lora_export_loads_in_plain_diffusers(sd3_dir, tmp_path, prompts_file):
    from diffusers import StableDiffusion3Pipeline

    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{"train.ema": False})
    trainer.train()
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(tmp_path / "run" / "final" / "lora"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ehs, pooled = torch.randn(2, 5, 64, generator=g), torch.randn(2, 64, generator=g)
    t = torch.tensor([500.0, 300.0])
    with torch.no_grad():
        ours = trainer.denoiser(hidden_states=x, timestep=t, encoder_hidden_states=ehs, pooled_projections=pooled).sample
        theirs = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=ehs, pooled_projections=pooled).sample
        with torch.no_grad():
            pipe.disable_lora()
            base = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=ehs, pooled_projections=pooled).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base, theirs)


def test_resume_continues_and_equals_uninterrupted_run(sd3_dir, tmp_path, prompts_file):
    # a cosine schedule over 2 epochs: lr 1e-3 then 5e-4, continued by the resumed run from the epoch index
    cosine = {"train.lr_schedule": "cosine"}
    full = make_trainer(sd3_dir, tmp_path / "full", prompts_file, num_epochs=2, **cosine)
    full.train()
    first = make_trainer(sd3_dir, tmp_path / "split", prompts_file, num_epochs=1, **cosine)
    first.train()
    assert first.global_step == 1
    resumed = make_trainer(sd3_dir, tmp_path / "split", prompts_file, num_epochs=2, resume="latest", **cosine)
    assert (resumed.epoch, resumed.global_step) == (1, 1)
    resumed.train()
    assert resumed.global_step == 2
    a, b = lora_params(full), lora_params(resumed)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    for run in ("full", "split"):
        rows = [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
        assert [r["epoch"] for r in rows] == [1, 2]
        assert [r["lr"] for r in rows] == pytest.approx([1e-3, 5e-4])


def test_resume_with_incompatible_config_lists_keys(sd3_dir, tmp_path, prompts_file):
    make_trainer(sd3_dir, tmp_path / "run", prompts_file).train()
    with pytest.raises(ConfigError, match="train.lr"):
        make_trainer(sd3_dir, tmp_path / "run", prompts_file, resume="latest", **{"train.lr": 0.5})


@pytest.mark.parametrize("reward,match", [
    ("nan_for_second", r"'.*nan_for_second' returned NaN/inf for samples \[#1"),
    ("too_short", r"shape \(7,\) for 8 samples"),
    ("raises", "raised RuntimeError: reward server unreachable"),
])
def test_bad_reward_names_reward_and_samples_and_keeps_batch(sd3_dir, tmp_path, prompts_file, reward, match):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, reward=reward, **{"sampling.batch_size": 8,
                                                                                     "train.batch_size": 8})
    with pytest.raises(RewardError, match=match) as info:
        trainer.train()
    assert "kept in" in str(info.value)
    kept = list((tmp_path / "run" / "failed_rewards").iterdir())
    assert kept and (kept[0] / "images.safetensors").is_file() and (kept[0] / "prompts.json").is_file()


def test_dict_reward_components_are_logged(sd3_dir, tmp_path, prompts_file):
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, reward="named_parts")
    metrics = trainer.train()
    assert any(k.endswith(".contrast/mean") for k in metrics)


def test_config_errors_name_the_key(tmp_path, prompts_file):
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="sampling.group_size must be >= 2"):
        load_config(None, ["sampling.group_size=1"]).validate()
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["sampling.groups_per_epoch=3", "sampling.group_size=4", "sampling.batch_size=4",
                           "train.batch_size=8"]).validate(world_size=1)
    with pytest.raises(ConfigError, match="world_size"):
        load_config(None, ["sampling.groups_per_epoch=3", "sampling.group_size=2", "sampling.batch_size=3"]).validate(2)
    with pytest.raises(ConfigError, match="sampling.num_steps must be of type int"):
        load_config(None, ["sampling.num_steps=ten"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="step_kind.*choose one of"):
        load_config(None, ["sampling.step_kind=euler"]).validate()
    for override, match in [("train.lr_schedule=step", "train.lr_schedule.*choose one of"),
                            ("train.lr_warmup_epochs=-1", "train.lr_warmup_epochs must be an int"),
                            ("train.lr_min_ratio=2", "train.lr_min_ratio must be in")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, [override]).validate()


def test_empty_prompt_file_is_a_clear_error(sd3_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="is empty"):
        make_trainer(sd3_dir, tmp_path / "run", str(empty))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_trainer(sd3_dir, tmp_path / "run", str(tmp_path / "missing.txt"))


def test_config_docs_cover_every_key():
    from genalign.config import describe

    lines = describe()
    assert len(lines) > 40
    assert all(line.split(": ", 1)[1].strip() for line in lines), [l for l in lines if not l.split(": ", 1)[1].strip()]
    assert any(line.startswith("train.clip_range =") for line in lines)


def test_evaluation_resolution_is_decoupled_from_training(sd3_dir, tmp_path, prompts_file):
    """eval.height / eval.width: training rollouts at the model resolution, evaluation images at another."""
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{
        "eval_prompts_file": prompts_file, "eval.num_per_prompt": 1, "eval.height": 32, "eval.width": 48,
        "eval.judge": False})
    trainer.train()
    assert tuple(trainer._last_eval_images.shape[-2:]) == (32, 48)
    assert (trainer.policy.height, trainer.policy.width) == (64, 64)  # restored after evaluating
    traj, *_ = trainer.sample_epoch(1)
    assert tuple(trainer.policy.decode(traj.final[:1]).shape[-2:]) == (64, 64)
    with pytest.raises(ValueError, match="multiples of 16 for SD3Policy, got 40x48"):
        with trainer.policy.resolution(40, 48):
            pass


def test_digits_refuses_an_evaluation_resolution(tmp_path):
    with pytest.raises(ConfigError, match="eval.height / eval.width: the DigitsPolicy adapter samples at one fixed"):
        Trainer(load_config("configs/digits_flow_grpo.yaml", [f"output_dir={tmp_path}", "eval.height=16"]))


def test_frozen_modules_keep_matching_weights_and_train_the_rest(sd3_dir, tmp_path, prompts_file):
    """train.frozen_modules (full fine-tuning): the text stream of the MMDiT stays as loaded, the image stream
    trains; the exported weights hold both; a pattern matching nothing names itself."""
    frozen = "[context, add_, text_embedder]"
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{
        "lora.enabled": "false", "train.frozen_modules": frozen})
    named = dict(trainer.denoiser.named_parameters())
    text = [n for n in named if any(k in n for k in ("context", "add_", "text_embedder"))]
    assert text and all(not named[n].requires_grad for n in text)
    trained = {n for n, p in named.items() if p.requires_grad}
    assert trained and trained.isdisjoint(text)
    assert {id(p) for p in trainer.params} == {id(named[n]) for n in trained}
    before = {n: p.detach().clone() for n, p in named.items()}
    trainer.train()
    assert all(torch.equal(named[n], before[n]) for n in text)
    assert any(not torch.equal(named[n], before[n]) for n in trained)
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "run" / "final" / "denoiser.safetensors"))
    assert set(text) <= set(exported) and all(torch.equal(exported[n], before[n].cpu()) for n in text)
    with pytest.raises(ConfigError, match=r"train.frozen_modules: \['no_such_layer'\] match no parameter"):
        make_trainer(sd3_dir, tmp_path / "run2", prompts_file, **{
            "lora.enabled": "false", "train.frozen_modules": "[context, no_such_layer]"})


def test_frozen_modules_config_errors():
    for override, match in [("train.frozen_modules=[ok, '(unclosed']", "'\\(unclosed' is not a regular expression"),
                            ("train.frozen_modules=['']", "list of non-empty regular expressions")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, ["lora.enabled=false", override]).validate()
    with pytest.raises(ConfigError, match="with lora.enabled the adapters' lora.target_modules decide it"):
        load_config(None, ["lora.enabled=true", "train.frozen_modules=[context]"]).validate()
