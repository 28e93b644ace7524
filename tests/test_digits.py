"""The shipped digits assets: classifier quality, base-model headroom, policy contract, errors, speed."""

import json
import os
import time

import pytest
import torch

from genalign.pipelines.digits import DigitsPolicy, resolve_digits_dir
from genalign.pipelines.digits_pretrain import load_split, prompt_accuracy, prompt_digit
from genalign.policy import ModelNotAvailableError, Policy
from genalign.rewards.digits import DigitClassifier, DigitCorrectReward, digit_correct
from genalign.rollout import recompute_log_probs, rollout
from genalign.sampling import expand_jobs, sample_images


@pytest.fixture(scope="module")
def assets():
    return resolve_digits_dir("digits")


@pytest.fixture(scope="module")
def policy(assets):
    return DigitsPolicy.from_pretrained("digits", device="cpu")


@pytest.fixture(scope="module")
def classifier(assets):
    return DigitClassifier.from_pretrained("digits")


def _prompts(assets, name):
    with open(os.path.join(assets, name)) as f:
        return [line.strip() for line in f if line.strip()]


def test_classifier_held_out_accuracy(classifier):
    _, _, x_te, y_te = load_split()
    acc = (classifier(x_te).argmax(-1) == y_te).float().mean().item()
    assert acc >= 0.97


def test_base_prompt_accuracy_leaves_headroom(policy, classifier, assets):
    prompts = _prompts(assets, "prompts_eval.txt")
    assert 10 <= len(prompts) <= 40 and {prompt_digit(p) for p in prompts} == set(range(10))
    acc, confidence = prompt_accuracy(policy, classifier, prompts, num_per_prompt=60, seed=1, return_confidence=True)
    assert 0.4 <= acc <= 0.8, acc
    assert confidence > 0.8  # samples still look like digits to the classifier
    with open(os.path.join(assets, "metrics.json")) as f:
        assert 0.4 <= json.load(f)["base_prompt_accuracy"] <= 0.8


def test_metrics_json_base_accuracy_reproduces_with_the_sampling_service(policy, classifier, assets):
    """metrics.json's base accuracy is measured with genalign.sampling (image i seeded seed + i): recomputing it
    with its recorded settings gives it back (up to a few argmax flips from another CPU's float round-off)."""
    with open(os.path.join(assets, "metrics.json")) as f:
        metrics = json.load(f)
    s = metrics["base_prompt_accuracy_settings"]
    acc = prompt_accuracy(policy, classifier, _prompts(assets, s["prompts"]), s["num_per_prompt"], seed=s["seed"],
                          num_steps=s["num_steps"])
    assert s["guidance_scale"] == policy.guidance_scale
    assert abs(acc - metrics["base_prompt_accuracy"]) <= 0.002, (acc, metrics["base_prompt_accuracy"])


def test_prompt_files_are_disjoint_and_encodable(policy, assets):
    train, evals = _prompts(assets, "prompts_train.txt"), _prompts(assets, "prompts_eval.txt")
    assert not set(train) & set(evals)
    policy.encode(train + evals)


def test_unknown_word_error_lists_vocabulary(policy):
    with pytest.raises(ValueError) as err:
        policy.encode(["a handwritten giraffe"])
    msg = str(err.value)
    assert "giraffe" in msg and "a handwritten giraffe" in msg and "seven" in msg and "digit" in msg


def test_missing_asset_dir_names_pretrain_command(tmp_path):
    missing = str(tmp_path / "nowhere")
    for load in (DigitsPolicy.from_pretrained, DigitClassifier.from_pretrained):
        with pytest.raises(ModelNotAvailableError, match="genalign pretrain-digits"):
            load(missing)


def test_prompt_digit():
    assert prompt_digit("a handwritten seven") == 7
    assert prompt_digit("the digit 3") == 3
    assert prompt_digit("Nine!") == 9
    with pytest.raises(ValueError):
        prompt_digit("a handwritten digit")
    with pytest.raises(ValueError):
        prompt_digit("three or 4")


def test_policy_contract(policy):
    assert isinstance(policy, Policy) and policy.kind == "flow"
    timesteps, sigmas = policy.schedule(10)
    assert sigmas.shape == (11,) and sigmas[0] == 1 and sigmas[-1] == 0
    assert torch.allclose(timesteps, 1000 * sigmas[:-1])
    x = policy.initial_latents(3, torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, policy.height, policy.width) and x.dtype == torch.float32
    images = policy.decode(x)
    assert images.shape == (3, 3, 8, 8) and images.min() >= 0 and images.max() <= 1


def test_sampling_is_fast(policy):
    prompts = [f"the digit {d}" for d in range(10)]
    start = time.perf_counter()
    images = sample_images(policy, *expand_jobs(prompts, 16, 0), batch_size=1024)
    assert images.shape == (160, 3, 8, 8)
    assert time.perf_counter() - start < 5.0


def test_rollout_recompute_exact_with_cfg():
    policy = DigitsPolicy.from_pretrained("digits", device="cpu", guidance_scale=2.0)
    prompts = ["seven", "the digit 3", "a handwritten five", "the number two"]
    cond = policy.encode(prompts)
    assert cond["negative_prompt_embeds"].shape == cond["prompt_embeds"].shape
    traj = rollout(policy, cond, prompts, 4, noise_levels=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(recompute_log_probs(policy, traj, [0, 1, 2, 3]), traj.log_probs)


def test_lora_adapter_toggles(policy):
    from peft import LoraConfig

    policy = DigitsPolicy.from_pretrained("digits", device="cpu")
    tr = policy.denoiser()
    tr.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=policy.lora_target_modules, init_lora_weights=False))
    x, t = policy.initial_latents(2, torch.Generator().manual_seed(0)), torch.full((2,), 500.0)
    cond = policy.encode(["one", "two"])
    tuned = policy.predict(x, t, cond)
    tr.disable_adapters()
    base = policy.predict(x, t, cond)
    tr.enable_adapters()
    assert not torch.allclose(tuned, base)
    assert torch.equal(policy.predict(x, t, cond), tuned)


def test_reward_on_real_digits():
    x_tr, y_tr, _, _ = load_split()
    images = ((x_tr[:64] + 1) / 2).expand(-1, 3, -1, -1)
    right = [f"the digit {d}" for d in y_tr[:64].tolist()]
    wrong = [f"the digit {(d + 1) % 10}" for d in y_tr[:64].tolist()]
    reward = DigitCorrectReward(model_dir="digits")
    good, bad = reward(images=images, prompts=right, metadata=None), reward(images=images, prompts=wrong, metadata=None)
    assert good["score"].mean() > 0.9 and good["accuracy"].mean() > 0.9
    assert bad["score"].mean() < 0.1 and bad["accuracy"].mean() < 0.1
    big = torch.nn.functional.interpolate(images, size=(32, 32), mode="nearest")
    assert torch.allclose(digit_correct(big, right, None)["score"], reward(images=images, prompts=right)["score"])
    assert reward.features(images).shape == (64, 128)


@pytest.mark.parametrize("patch_size,layers,head_dim", [(2, 3, 16), (4, 3, 16), (2, 4, 32)])
def test_pretrain_generator_architecture_round_trips(patch_size, layers, head_dim, tmp_path):
    """``pretrain-digits --patch-size / --num-layers / --attention-head-dim``: the transformer gets that
    architecture (patch 4, 3 layers, head dim 16 = the shipped model's; patch 2 = 16 image tokens), and the asset
    directory reloads it with identical outputs."""
    from genalign.pipelines.digits_pretrain import train_generator

    x_tr, y_tr, _, _ = load_split()
    tr, enc = train_generator(x_tr[:64], y_tr[:64], steps=2, batch_size=8, patch_size=patch_size, num_layers=layers,
                              attention_head_dim=head_dim, log=lambda *a: None)
    keys = ("sample_size", "patch_size", "pos_embed_max_size", "num_layers", "num_attention_heads", "attention_head_dim",
            "caption_projection_dim", "joint_attention_dim", "pooled_projection_dim")
    c = tr.config
    arch = {k: c[k] for k in keys}
    assert c.patch_size == patch_size and c.pos_embed_max_size == 8 // patch_size
    assert (c.num_layers, c.attention_head_dim, c.caption_projection_dim) == (layers, head_dim, 4 * head_dim)
    if (patch_size, layers, head_dim) == (4, 3, 16):  # the defaults build the shipped architecture
        shipped = DigitsPolicy.from_pretrained("digits", device="cpu").transformer.config
        assert {k: shipped[k] for k in keys} == arch
    policy = DigitsPolicy(tr, enc, {"num_steps": 2, "guidance_scale": 1.0})
    policy.save_pretrained(str(tmp_path))
    again = DigitsPolicy.from_pretrained(str(tmp_path), device="cpu")
    assert {k: again.transformer.config[k] for k in keys} == arch
    jobs, seeds = expand_jobs(["the number one"], 2, 0)
    a, b = (sample_images(p, jobs, seeds, num_steps=2) for p in (policy, again))
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b)
