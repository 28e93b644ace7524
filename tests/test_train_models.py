"""One training epoch of the real trainer on tiny Flux and SD1.x pipelines with their own (tiny) text encoders.

Each model is saved with ``save_pretrained`` and loaded by path through the config (``model.id=<dir>``), so
loading, prompt encoding, rollout, reward, loss, optimizer step and LoRA export all run as in a real run.
"""

from __future__ import annotations

import pytest
import torch

from genalign.config import load_config
from genalign.trainer import Trainer

from .test_trainer import tiny_overrides
from .tiny_models import TINY_RES, save_pipeline, tiny_flux, tiny_sd


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: on a shared 2-core machine torch's intra-op threads mostly wait on each other
    and on other processes (sampling measured 5-20x slower with 2 threads under load), so use one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\na dog\na red car\n")
    return str(path)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_pipeline(tiny_flux(guidance_embeds=True, with_text_encoders=True), tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_pipeline(tiny_sd(with_text_encoders=True), tmp_path_factory.mktemp("sd"))


@pytest.mark.parametrize("name", ["flux", "sd"])
def test_tiny_text_encoders_survive_save_and_encode(name, flux_dir, sd_dir):
    """Offline tokenizers reload with the same vocabulary and ids; the adapters' encode() uses the encoders."""
    from genalign.pipelines import load_policy

    if name == "flux":
        fresh, path, kw = tiny_flux(with_text_encoders=True), flux_dir, {"height": TINY_RES, "width": TINY_RES}
    else:
        fresh, path, kw = tiny_sd(with_text_encoders=True), sd_dir, {"guidance_scale": 3.0}
    policy = load_policy(path, device="cpu", **kw)
    prompts = ["a cat", "A red car!", ""]
    for attr in ("tokenizer", "tokenizer_2"):
        a, b = getattr(fresh, attr, None), getattr(policy.pipe, attr, None)
        if a is None:
            continue
        assert type(a) is type(b) and len(a) == len(b) > 100
        ids = a(prompts, padding="max_length", max_length=16, truncation=True).input_ids
        assert ids == b(prompts, padding="max_length", max_length=16, truncation=True).input_ids
        if b.unk_token_id not in (b.eos_token_id, b.pad_token_id):  # T5 (CLIP's unk is its end/pad token)
            assert b.unk_token_id not in ids[1]  # upper case and punctuation are in the vocabulary
    cond = policy.encode(prompts)
    expected = {"flux": {"prompt_embeds": (3, 512, 32), "pooled_prompt_embeds": (3, 32)},  # T5 padded to 512
                "sd": {"prompt_embeds": (3, 16, 32), "negative_prompt_embeds": (3, 16, 32)}}[name]
    assert {k: tuple(v.shape) for k, v in cond.items()} == expected
    assert not torch.allclose(cond["prompt_embeds"][0], cond["prompt_embeds"][1])
    if name == "sd":  # the (cached) negative is the empty prompt's embedding, as diffusers computes it
        torch.testing.assert_close(cond["negative_prompt_embeds"], cond["prompt_embeds"][2:].expand(3, -1, -1))


def _trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.denoiser.named_parameters() if p.requires_grad}


def _train_one_epoch(model_dir, out_dir, prompts_file, **extra):
    """One epoch, one optimizer step over all 8 samples (2 groups of 4): the step's ratios are exactly 1."""
    trainer = Trainer(load_config(None, tiny_overrides(model_dir, out_dir, prompts_file, **extra)))
    before = _trainable(trainer)
    metrics = trainer.train()
    after = _trainable(trainer)
    assert trainer.global_step == 1
    assert before and any(not torch.equal(before[n], after[n]) for n in before), "LoRA weights did not change"
    assert all("lora_" in n for n in before)
    # old log-probs come from the rollout, new ones from the same weights before the only step
    assert metrics["ratio_mean"] == 1.0 and metrics["clip_frac"] == 0.0
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["grad_norm"] > 0
    assert 0.0 <= metrics["reward/mean"] <= 1.0
    for name in ("adapter_model.safetensors", "adapter_config.json", "pytorch_lora_weights.safetensors"):
        assert (out_dir / "final" / "lora" / name).is_file(), name
    return trainer, metrics


def assert_diffusers_lora_matches(trainer, pipe, **kwargs):
    """The trained denoiser and plain diffusers' transformer with the exported LoRA loaded give the same output on
    ``kwargs``; with the LoRA disabled it differs. Returns the diffusers output (the LoRA is disabled after)."""
    with torch.no_grad():
        ours = trainer.denoiser(**kwargs)[0]
        theirs = pipe.transformer(**kwargs)[0]
        pipe.disable_lora()
        base = pipe.transformer(**kwargs)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base, theirs)
    return theirs


def test_flux_with_guidance_embeds_trains_one_epoch_and_lora_loads_in_diffusers(flux_dir, tmp_path, prompts_file):
    from diffusers import FluxPipeline

    from genalign.pipelines.flux import FluxPolicy

    out = tmp_path / "run"
    trainer, _ = _train_one_epoch(flux_dir, out, prompts_file, **{
        "model.guidance_scale": 3.5, "model.height": TINY_RES, "model.width": TINY_RES,
        "sampling.step_kind": "sde", "sampling.noise_level": 0.7, "train.ema": False})
    policy = trainer.policy
    assert isinstance(policy, FluxPolicy) and policy.denoiser().config.guidance_embeds
    assert policy.pipe.text_encoder is not None and policy.pipe.text_encoder_2 is not None

    # plain diffusers: the exported LoRA reproduces the trained denoiser (text encoders loaded from the dir too)
    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.load_lora_weights(str(out / "final" / "lora"))
    cond = policy.encode(["a cat", "a red car"])
    x = policy.initial_latents(2, torch.Generator().manual_seed(0))
    img_ids, txt_ids = policy._ids(cond["prompt_embeds"].shape[1], x.dtype)
    kwargs = dict(hidden_states=x, timestep=torch.tensor([0.9, 0.4]), guidance=torch.full((2,), 3.5),
                  pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=cond["prompt_embeds"],
                  txt_ids=txt_ids, img_ids=img_ids, return_dict=False)
    theirs = assert_diffusers_lora_matches(trainer, pipe, **kwargs)

    # loading without text encoders (embeddings computed elsewhere) works too
    bare = FluxPipeline.from_pretrained(flux_dir, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                        tokenizer_2=None)
    bare.load_lora_weights(str(out / "final" / "lora"))
    with torch.no_grad():
        torch.testing.assert_close(bare.transformer(**kwargs)[0], theirs, rtol=1e-4, atol=1e-5)


def test_sd1_ddim_trains_one_epoch_and_lora_loads_in_diffusers(sd_dir, tmp_path, prompts_file):
    from diffusers import StableDiffusionPipeline

    from genalign.pipelines.ddpm import DDPMPolicy

    out = tmp_path / "run"
    trainer, metrics = _train_one_epoch(sd_dir, out, prompts_file, **{
        "sampling.step_kind": "ddim", "sampling.noise_level": 1.0, "model.guidance_scale": 2.0, "train.ema": False})
    assert isinstance(trainer.policy, DDPMPolicy) and not trainer.policy.is_sdxl
    assert trainer.policy.uses_cfg
    assert "approx_kl" in metrics

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, feature_extractor=None)
    pipe.load_lora_weights(str(out / "final" / "lora"))
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900, 400]))
    kwargs = dict(encoder_hidden_states=torch.randn(2, 16, 32, generator=g), return_dict=False)
    with torch.no_grad():
        ours = trainer.denoiser(*args, **kwargs)[0]
        theirs = pipe.unet(*args, **kwargs)[0]
        pipe.disable_lora()
        base = pipe.unet(*args, **kwargs)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base, theirs)
