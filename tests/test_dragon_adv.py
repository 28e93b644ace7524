"""DRAGON and Adv-GRPO: splits and pairs, the discriminator, and 1-epoch tiny SD3 runs of both methods."""

import json

import pytest
import torch

from genalign.dragon import instance_labels, pairs_within_groups, ranked_labels
from genalign.rewards.adversarial import AdversarialReward, discriminator_round

from .test_distributional import digit_images, tiny_dino_dir


def test_instance_labels_and_pairs_within_groups():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 2.0, 2.0, 1.0, 0.0, 0.2])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    labels = instance_labels(rewards, groups)
    assert labels.tolist() == [-1, 1, 1, -1, 0, 0, 1, -1, 0]  # tie group unused, odd middle unused
    pairs = pairs_within_groups(labels, groups, rewards)
    assert pairs.tolist() == [[1, 3], [2, 0], [6, 7]]
    assert ranked_labels(torch.tensor([3.0, 1.0, 2.0, 0.0])).tolist() == [1, -1, 1, -1]


def test_discriminator_separates_real_digits_from_noise_and_round_trips_state():
    real, noise = digit_images(64), torch.rand(32, 3, 8, 8)
    adv = AdversarialReward(references=real, encoder="digits", lr=3e-3, hidden=64)
    stats = discriminator_round(adv, lambda k: torch.rand(32, 3, 8, 8), steps=20, seed=0)
    assert stats["disc/d_steps"] == 20 and stats["disc/h_ref"] > stats["disc/h_gen"]
    held_out, fake = adv(digit_images(32, offset=200)), adv(noise)
    assert (held_out[:, None] > fake[None]).float().mean() > 0.9  # AUC on unseen real digits vs noise
    clone = AdversarialReward(references=real, encoder="digits", lr=3e-3, hidden=64, seed=1)
    clone.load_state_dict(adv.state_dict())
    torch.testing.assert_close(clone(noise), adv(noise))
    # while_behind: no step once the references outscore the generations
    assert discriminator_round(adv, lambda k: noise, steps=5, rule="while_behind")["disc/d_steps"] == 0


def _digits(label: int, n: int, held_out: bool = False) -> torch.Tensor:
    from genalign.pipelines.digits_pretrain import load_split

    x_tr, y_tr, x_te, y_te = load_split()
    x, y = (x_te, y_te) if held_out else (x_tr, y_tr)
    return ((x[y == label][:n] + 1) / 2).expand(-1, 3, -1, -1)


def test_per_prompt_references_give_each_image_its_prompts_positives():
    zero, one = _digits(0, 1), _digits(1, 1)  # one reference each: the positive of a step is then known exactly
    adv = AdversarialReward(references={"zero": zero, "one": one}, encoder="digits", lr=3e-3, hidden=64)
    for prompt, ref in (("zero", zero), ("one", one)):
        with torch.no_grad():
            expected = adv.head.cls_head(adv.tokens(ref)[0])[0, 0].item()
        stats = adv.discriminator_step(torch.rand(6, 3, 8, 8), prompts=[prompt] * 6)  # h_ref: before the update
        assert stats["disc/h_ref"] == pytest.approx(expected, abs=1e-6)
    mixed = ["zero", "one", "one", "zero", "one"]
    cls, _ = adv._reference_batch(5, torch.Generator().manual_seed(0), mixed)
    for row, prompt in zip(cls, mixed):
        torch.testing.assert_close(row, adv.tokens(zero if prompt == "zero" else one)[0][0])
    with pytest.raises(ValueError, match="prompts"):
        adv.discriminator_step(torch.rand(2, 3, 8, 8))  # per-prompt references need the prompts
    with pytest.raises(KeyError, match="two"):
        adv.discriminator_step(torch.rand(2, 3, 8, 8), prompts=["zero", "two"])


def test_per_prompt_references_from_a_json_file_train_the_discriminator(tmp_path):
    from PIL import Image

    refs = tmp_path / "refs"
    refs.mkdir()
    mapping = {}
    for label, prompt in ((0, "zero"), (1, "one")):
        for i, img in enumerate(_digits(label, 20)):
            name = f"{prompt}_{i}.png"
            Image.fromarray((img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(refs / name)
            mapping.setdefault(prompt, []).append(name)
    (refs / "prompt2img.json").write_text(json.dumps(mapping))  # the released layout: {prompt: [file, ...]}
    adv = AdversarialReward(references=str(refs / "prompt2img.json"), encoder="digits", lr=3e-3, hidden=64)
    assert sorted(adv.per_prompt) == ["one", "zero"] and len(adv.per_prompt["zero"]) == 20
    (tmp_path / "refs.jsonl").write_text("\n".join(json.dumps({"prompt": p, "images": names}) for p, names in mapping.items()))
    jl = AdversarialReward(references=str(tmp_path / "refs.jsonl"), encoder="digits", reference_root=str(refs))
    assert {p: len(v) for p, v in jl.per_prompt.items()} == {"zero": 20, "one": 20}

    def sample(k):  # the generator gets the prompts' digits wrong: noise for every prompt
        prompts = ["zero", "one"] * 8
        return torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(k)), prompts

    stats = discriminator_round(adv, sample, steps=20, seed=0)
    assert stats["disc/d_steps"] == 20 and stats["disc/h_ref"] > stats["disc/h_gen"]
    real = adv(torch.cat([_digits(0, 10, held_out=True), _digits(1, 10, held_out=True)]))
    assert (real[:, None] > adv(torch.rand(32, 3, 8, 8))[None]).float().mean() > 0.9
    assert discriminator_round(adv, lambda k: (torch.rand(4, 3, 8, 8), ["one"] * 4), steps=5,
                               rule="while_behind")["disc/d_steps"] == 0
    with pytest.raises(ValueError, match="not found"):
        AdversarialReward(references={"zero": [str(refs / "missing.png")]}, encoder="digits")


def test_adversarial_reward_on_a_tiny_dino_shares_one_head(tmp_path):
    path = tiny_dino_dir(tmp_path / "dino")
    adv = AdversarialReward(references=torch.rand(4, 3, 28, 28), encoder="dino", encoder_options={"model": path})
    assert adv.head.patch_head is None and adv(torch.rand(2, 3, 28, 28)).shape == (2,)
    with pytest.raises(ValueError, match="CLS and patch tokens"):
        AdversarialReward(references=torch.rand(4, 3, 8, 8), encoder=_NoTokens())


class _NoTokens:
    modalities, device = ("image",), torch.device("cpu")

    def encode(self, images):
        return images.flatten(1)


# ---------------------------------------------------------------------- the trainer, tiny SD3

from genalign.config import load_config  # noqa: E402
from genalign.trainer import Trainer  # noqa: E402

from .test_trainer import prompts_file, sd3_dir, tiny_overrides  # noqa: E402,F401  (fixtures)


def make_trainer(model_dir, out_dir, prompts, reward: str, resume=None, **extra):
    """The tiny SD3 trainer of tests/test_trainer.py with a registered reward."""
    return Trainer(load_config(None, tiny_overrides(model_dir, out_dir, prompts, **extra) + [f"reward={reward}"]),
                   resume=resume)


@pytest.mark.parametrize("extra", [
    {"dragon.loss": "dpo", "dragon.pairing": "paired", "dragon.criterion": "instance", "reward": "frechet_set"},
    {"dragon.loss": "kto", "dragon.pairing": "unpaired", "dragon.criterion": "set", "dragon.set_split": "greedy",
     "reward": "vendi"},
])
def test_dragon_method_one_epoch(sd3_dir, tmp_path, prompts_file, extra):
    extra = {"method": "dragon", "dragon.beta": 10.0, **extra}
    reward = extra.pop("reward")
    extra[f"reward_options.{reward}.encoder"] = "dino"
    extra[f"reward_options.{reward}.encoder_options.model"] = tiny_dino_dir(tmp_path / "dino")
    if reward == "frechet_set":  # instance criterion on a set reward's leave-one-out contributions
        extra[f"reward_options.{reward}.references"] = _reference_dir(tmp_path / "refs")
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, reward, **extra)
    before = {n: p.detach().clone() for n, p in trainer.denoiser.named_parameters() if p.requires_grad}
    metrics = trainer.train()
    assert metrics["dragon/units"] > 0 and metrics["grad_norm"] > 0 and "ratio_mean" not in metrics
    assert any(not torch.equal(before[n], p) for n, p in trainer.denoiser.named_parameters() if p.requires_grad)


def test_adversarial_one_epoch_with_tiny_dino_checkpoints_the_discriminator(sd3_dir, tmp_path, prompts_file):
    extra = {"method": "adv_grpo", "reward_options.adversarial.references": _reference_dir(tmp_path / "refs"),
             "reward_options.adversarial.encoder": "dino", "reward_options.adversarial.hidden": 16,
             "reward_options.adversarial.encoder_options.model": tiny_dino_dir(tmp_path / "dino"),
             "adversarial.steps": 2, "adversarial.num_samples": 2}
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, "adversarial", **extra)
    initial = {k: v.clone() for k, v in trainer.adversary.head.state_dict().items()}
    metrics = trainer.train()
    assert metrics["disc/d_steps"] == 2 and "disc/d_loss" in metrics
    trained = trainer.adversary.head.state_dict()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    resumed = make_trainer(sd3_dir, tmp_path / "run", prompts_file, "adversarial", resume="latest", **extra)
    for k, v in resumed.adversary.head.state_dict().items():
        torch.testing.assert_close(v, trained[k])
    assert resumed.adversary.optimizer.state_dict()["state"]


def _reference_dir(directory) -> str:
    from PIL import Image

    directory.mkdir()
    for i in range(4):
        Image.fromarray((torch.rand(28, 28, 3) * 255).to(torch.uint8).numpy()).save(directory / f"{i}.png")
    return str(directory)
