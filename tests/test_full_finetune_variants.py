"""A full fine-tune (``lora.enabled: false``; ``final/denoiser.safetensors`` + ``denoiser.json``) loads like a LoRA
(genalign/lora.py ``load_tuned``): sampled, compared with the base and with a LoRA in one policy, its base model read
from its metadata, and refused on another model with the culprit named."""

import json

import pytest
import torch

from genalign.lora import add_lora, find_tuned, save_lora, write_base_meta
from genalign.pipelines import load_policy
from genalign.sampling import Variant, load_policy_with_loras, sample_images, use_variant

from .tiny_models import randomize_lora

PROMPTS = ["the digit 3", "a handwritten seven"]
SEEDS = [3, 4]
STEPS = 4


def _save_full(policy, directory, scale=0.05, seed=0):
    """A changed copy of every denoiser weight, written as the trainer exports a full fine-tune."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {n: (p.detach() + scale * torch.randn(p.shape, generator=g)).contiguous()
             for n, p in policy.denoiser().state_dict().items() if p.is_floating_point()}
    directory.mkdir(parents=True)
    save_file(state, str(directory / "denoiser.safetensors"))
    write_base_meta(str(directory / "denoiser.json"), policy.denoiser(), "digits")
    return state


def test_full_finetune_is_a_variant_beside_the_base_and_a_lora(tmp_path):
    base = load_policy("digits")
    base_images = sample_images(base, PROMPTS, SEEDS, STEPS)
    state = _save_full(base, tmp_path / "run" / "final")
    donor = load_policy("digits")
    add_lora(donor.denoiser(), rank=4, alpha=8, target_modules=donor.lora_target_modules)
    randomize_lora(donor.denoiser(), 0.1)
    save_lora(donor, str(tmp_path / "lora"), "digits")
    lora_images = sample_images(donor, PROMPTS, SEEDS, STEPS)

    assert find_tuned(str(tmp_path / "run")) == ("full", str(tmp_path / "run" / "final" / "denoiser.safetensors"))
    # the base model comes from denoiser.json; the full fine-tune loaded last is active
    policy, names = load_policy_with_loras(None, [str(tmp_path / "lora"), str(tmp_path / "run")], names=["l", "full"])
    for n, p in policy.denoiser().state_dict().items():
        if n in state:
            torch.testing.assert_close(p, state[n])
    tuned_images = sample_images(policy, PROMPTS, SEEDS, STEPS)
    assert not torch.allclose(tuned_images, base_images, atol=1e-3)
    with use_variant(policy, Variant("base")) as sampler:
        torch.testing.assert_close(sample_images(sampler, PROMPTS, SEEDS, STEPS), base_images)
    with use_variant(policy, Variant("lora", "l")) as sampler:  # the LoRA on the base weights
        torch.testing.assert_close(sample_images(sampler, PROMPTS, SEEDS, STEPS), lora_images)
    with use_variant(policy, Variant("tuned", "full")) as sampler:
        torch.testing.assert_close(sample_images(sampler, PROMPTS, SEEDS, STEPS), tuned_images)
    with pytest.raises(ValueError, match="RLG interpolates a LoRA with its base; 'full' is a full fine-tune"):
        with use_variant(policy, Variant("rlg", "full", rlg=0.5)):
            pass


def test_full_finetune_from_another_model_is_refused(tmp_path):
    policy = load_policy("digits")
    _save_full(policy, tmp_path / "final")
    meta = json.loads((tmp_path / "final" / "denoiser.json").read_text())
    (tmp_path / "final" / "denoiser.json").write_text(json.dumps({**meta, "denoiser_params": 7}))
    with pytest.raises(ValueError, match="full fine-tune .*denoiser.safetensors' was trained on base model 'digits'"):
        load_policy_with_loras("digits", [str(tmp_path)])
    (tmp_path / "final" / "denoiser.json").write_text(json.dumps(meta))
    from safetensors.torch import save_file

    save_file({"no_such.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="has weights this model lacks: \\['no_such.weight'\\]"):
        load_policy_with_loras("digits", [str(tmp_path / "other.safetensors")])


@pytest.mark.parametrize("lora", [False, True])
def test_run_directory_resolves_to_the_weights_its_evaluation_used(tmp_path, lora):
    """A run directory: the EMA export when its config has eval.use_ema and the EMA was written; otherwise (no
    use_ema, or no EMA file) the final weights."""
    run, final = tmp_path / "run", tmp_path / "run" / "final"
    names = ("lora", "lora_ema") if lora else ("denoiser.safetensors", "denoiser_ema.safetensors")
    for n in names:
        target = final / n / "adapter_model.safetensors" if lora else final / n
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"")
    kind = "lora" if lora else "full"
    for use_ema, expected in ((True, names[1]), (False, names[0])):
        (run / "config.json").write_text(json.dumps({"eval": {"use_ema": use_ema}}))
        assert find_tuned(str(run)) == (kind, str(final / expected))
    (run / "config.json").write_text(json.dumps({"eval": {"use_ema": True}}))
    ema = final / names[1]
    if lora:
        (ema / "adapter_model.safetensors").unlink()
    else:
        ema.unlink()
    assert find_tuned(str(run)) == (kind, str(final / names[0]))  # no EMA written: the final weights
