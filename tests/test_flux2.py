"""The FLUX.2 [klein] adapter (:mod:`genalign.pipelines.flux2`) on a tiny offline ``Flux2KleinPipeline``.

The rollout reproduces the diffusers pipeline (schedule, every step's latents, the returned latents and the
decoded images), recomputed log-probs equal the rollout's, the real trainer runs an epoch from a
``save_pretrained`` directory (adapter picked from ``model_index.json``) and its exported LoRA loads in plain
diffusers, and decoding / shape errors behave.
"""

from __future__ import annotations

import pytest
import torch

from genalign.config import load_config
from genalign.pipelines.flux2 import FLUX2_LORA_TARGETS, Flux2KleinPolicy, pack_tokens, unpack_tokens
from genalign.policy import Policy
from genalign.rollout import recompute_log_probs, rollout
from genalign.trainer import Trainer

from .test_train_models import assert_diffusers_lora_matches
from .test_trainer import tiny_overrides, prompts_file  # noqa: F401
from .tiny_flux2 import TEXT_DIM, TINY_FLUX2_RES, tiny_flux2_klein
from .tiny_models import save_pipeline

RES = TINY_FLUX2_RES
PROMPTS = ["a cat", "a dog"]



@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
    return save_pipeline(tiny_flux2_klein(with_text_encoders=True), tmp_path_factory.mktemp("flux2"))



def _embeds(batch=2, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, TEXT_DIM, generator=g), torch.randn(batch, seq, TEXT_DIM, generator=g)


def _policy(guidance_scale=4.0, is_distilled=False):
    policy = Flux2KleinPolicy(tiny_flux2_klein(is_distilled=is_distilled), guidance_scale=guidance_scale,
                              height=RES, width=RES)
    pos, neg = _embeds()
    return policy, policy.cond_from_embeds(pos, negative_prompt_embeds=neg), (pos, neg)


def test_layout_defaults_and_lora_targets():
    policy, cond, _ = _policy()
    assert isinstance(policy, Policy) and policy.kind == "flow"
    assert policy.pipe.vae_scale_factor == 2 and policy.latent_size == (RES // 2, RES // 2)
    assert policy.latent_shape == ((RES // 4) ** 2, 8)  # 8x8 tokens of 4 x 2 latent channels
    assert set(cond) == {"prompt_embeds", "negative_prompt_embeds"} and policy.uses_cfg
    assert Flux2KleinPolicy.default_guidance_scale == 4.0
    assert policy.lora_target_modules == list(FLUX2_LORA_TARGETS)  # every default target exists
    x = torch.randn(3, 8, 4, 6)
    assert torch.equal(unpack_tokens(pack_tokens(x), 4, 6), x)
    assert policy.initial_latents(2, torch.Generator().manual_seed(0)).shape == (2, *policy.latent_shape)
    with pytest.raises(ValueError, match="same length"):
        policy.cond_from_embeds(torch.zeros(2, 7, TEXT_DIM), negative_prompt_embeds=torch.zeros(2, 5, TEXT_DIM))
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        policy.cond_from_embeds(torch.zeros(2, 7, TEXT_DIM))
    with pytest.raises(ValueError, match="multiples of 4"):
        Flux2KleinPolicy(tiny_flux2_klein(), height=RES + 2, width=RES)


@pytest.mark.parametrize("is_distilled", [False, True], ids=["base-cfg", "distilled"])
def test_rollout_reproduces_the_pipeline(is_distilled):
    """ODE rollout (noise level 0) from the pipeline's initial latents: same schedule, same latents after every
    step, same returned latents (``output_type="latent"``) and the same decoded images."""
    policy, cond, (pos, neg) = _policy(guidance_scale=4.0, is_distilled=is_distilled)
    pipe = policy.pipe
    assert policy.uses_cfg is (not is_distilled)
    noise = policy.initial_latents(2, torch.Generator().manual_seed(3))
    grid = unpack_tokens(noise, *policy.token_grid)  # the pipeline takes the unpacked [B, 4C, h/2, w/2] noise
    steps = []

    def keep(_pipe, _i, _t, kwargs):
        steps.append(kwargs["latents"].clone())
        return kwargs

    call = dict(prompt_embeds=pos, negative_prompt_embeds=neg, latents=grid, height=RES, width=RES,
                num_inference_steps=2, guidance_scale=4.0)
    expected = pipe(**call, output_type="latent", callback_on_step_end=keep).images
    timesteps, sigmas = policy.schedule(2)
    assert torch.equal(sigmas, pipe.scheduler.sigmas) and torch.equal(timesteps, pipe.scheduler.timesteps)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and sigmas[1] > 0.8  # unshifted 2-step sigmas: [1, 0.5, 0]

    traj = rollout(policy, cond, PROMPTS, num_steps=2, noise_levels=0.0, step_kind="sde", latents=noise)
    torch.testing.assert_close(traj.latents[:, 1:], torch.stack(steps, dim=1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(traj.final, noise)
    final = policy._vae_latents(traj.final)
    assert final.shape == expected.shape == (2, 2, RES // 2, RES // 2)
    torch.testing.assert_close(final, expected, rtol=1e-5, atol=1e-6)

    images = pipe(**call, output_type="pt").images
    with torch.no_grad():
        torch.testing.assert_close(policy.decode(traj.final), images, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 5, 12])
def test_schedule_equals_the_pipelines(steps):
    """FLUX.2's empirical shift depends on the number of steps too (not only on the image size as FLUX.1's)."""
    policy, _, (pos, _neg) = _policy(guidance_scale=1.0)
    policy.pipe(prompt_embeds=pos, height=RES, width=RES, num_inference_steps=steps, guidance_scale=1.0,
                output_type="latent")
    timesteps, sigmas = policy.schedule(steps)
    assert timesteps.shape == (steps,) and sigmas.shape == (steps + 1,)
    assert torch.equal(sigmas, policy.pipe.scheduler.sigmas)
    assert torch.equal(timesteps, policy.pipe.scheduler.timesteps)
    assert torch.all(sigmas[1:] < sigmas[:-1]) and sigmas[-1] == 0


def test_recomputed_log_probs_equal_rollout():
    policy, cond, _ = _policy(guidance_scale=3.0)
    traj = rollout(policy, cond, PROMPTS, num_steps=4, noise_levels=0.7, step_kind="sde",
                   generator=torch.Generator().manual_seed(0))
    assert traj.latents.dtype == torch.float32 and traj.stochastic_steps.all()
    with torch.no_grad():
        recomputed = recompute_log_probs(policy, traj, list(range(4)))
    assert torch.equal(recomputed, traj.log_probs)
    assert torch.isfinite(traj.log_probs).all()


def test_cfg_and_distillation_change_the_prediction():
    policy, cond, _ = _policy(guidance_scale=4.0)
    x = policy.initial_latents(2, torch.Generator().manual_seed(0))
    t = torch.full((2,), 700.0)
    guided = policy.predict(x, t, cond)
    policy.guidance_scale = 1.0
    assert not policy.uses_cfg
    plain = policy.predict(x, t, cond)
    assert not torch.allclose(guided, plain)
    distilled, _, _ = _policy(guidance_scale=4.0, is_distilled=True)
    assert distilled.cfg_scale == 1.0 and distilled.required_cond_keys() == ["prompt_embeds"]
    torch.testing.assert_close(distilled.predict(x, t, {"prompt_embeds": cond["prompt_embeds"]}), plain)


def test_decode_shape_range_and_wrong_latent_shape():
    policy, cond, _ = _policy()
    with torch.no_grad():
        images = policy.decode(3 * policy.initial_latents(3, torch.Generator().manual_seed(1)))
        chunked = policy.decode(3 * policy.initial_latents(3, torch.Generator().manual_seed(1)), batch_size=2)
    assert images.shape == (3, 3, RES, RES) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    torch.testing.assert_close(chunked, images)
    bad = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"expects latents of shape \[B, 64, 8\] \(for 32x32 px\), got \(2, 3, 5\)"):
        policy.predict(bad, torch.zeros(2), cond)
    with pytest.raises(ValueError, match=r"expects latents of shape \[B, 64, 8\].*got \(2, 2, 16, 16\)"):
        policy.decode(torch.zeros(2, 2, 16, 16))  # VAE-space latents are not what decode takes


def test_encode_images_is_the_pipelines_latent_preparation_and_decode_inverts_the_normalisation():
    policy, _, _ = _policy()
    pipe = policy.pipe
    tokens = policy.initial_latents(2, torch.Generator().manual_seed(2))
    torch.testing.assert_close(policy._from_vae_latents(policy._vae_latents(tokens)), tokens, rtol=1e-5, atol=1e-6)
    images = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0))
    encoded = policy.encode_images(images)
    assert encoded.shape == (2, *policy.latent_shape) and encoded.dtype == torch.float32 and encoded.is_contiguous()
    with torch.no_grad():  # the pipeline's own preparation of (reference) images: argmax latents, patchify, BN
        expected = pack_tokens(pipe._encode_vae_image(images * 2 - 1, generator=None))
    torch.testing.assert_close(encoded, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"expects \[B, 3, 32, 32\] images"):
        policy.encode_images(torch.rand(1, 3, 16, 16))


def test_save_and_from_pretrained_without_text_encoders(tmp_path):
    policy, cond, _ = _policy()
    path = save_pipeline(policy.pipe, tmp_path / "bare")
    from genalign.pipelines import load_policy, policy_class

    assert policy_class(path) is Flux2KleinPolicy
    loaded = load_policy(path, device="cpu", height=RES, width=RES)
    assert isinstance(loaded, Flux2KleinPolicy) and loaded.pipe.text_encoder is None
    assert loaded.guidance_scale == 4.0
    x = policy.initial_latents(2, torch.Generator().manual_seed(0))
    t = policy.schedule(4)[0][1].expand(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(x, t, cond), policy.predict(x, t, cond), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cond_from_embeds"):
        loaded.encode(["a cat"])


def test_encode_matches_the_pipeline(flux2_dir):
    from diffusers import Flux2KleinPipeline

    from genalign.pipelines import load_policy

    policy = load_policy(flux2_dir, device="cpu", guidance_scale=2.0, height=RES, width=RES)
    assert isinstance(policy, Flux2KleinPolicy)
    prompts = ["a cat", "A red car!", ""]
    cond = policy.encode(prompts)
    assert {k: tuple(v.shape) for k, v in cond.items()} == {"prompt_embeds": (3, 512, TEXT_DIM),
                                                             "negative_prompt_embeds": (3, 512, TEXT_DIM)}
    pipe = Flux2KleinPipeline.from_pretrained(flux2_dir)
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(prompts, device="cpu")
    torch.testing.assert_close(cond["prompt_embeds"], expected, rtol=0, atol=0)
    assert not torch.allclose(cond["prompt_embeds"][0], cond["prompt_embeds"][1])
    # the (cached) negative is the empty prompt's embedding, as the pipeline computes it
    torch.testing.assert_close(cond["negative_prompt_embeds"], expected[2:].expand(3, -1, -1))


def _trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.denoiser.named_parameters() if p.requires_grad}


def test_trains_one_epoch_and_lora_loads_in_diffusers(flux2_dir, tmp_path, prompts_file):
    """One epoch, one optimizer step over all 8 samples (2 groups of 4), CFG on: ratios exactly 1; the exported
    LoRA reproduces the trained transformer in plain diffusers."""
    from diffusers import Flux2KleinPipeline

    out = tmp_path / "run"
    trainer = Trainer(load_config(None, tiny_overrides(flux2_dir, out, prompts_file, **{
        "model.guidance_scale": 2.0, "model.height": RES, "model.width": RES,
        "sampling.step_kind": "sde", "sampling.noise_level": 0.7, "train.ema": False})))
    policy = trainer.policy
    assert isinstance(policy, Flux2KleinPolicy) and policy.uses_cfg  # picked from model_index.json
    assert policy.pipe.text_encoder is not None
    before = _trainable(trainer)
    metrics = trainer.train()
    after = _trainable(trainer)
    assert trainer.global_step == 1
    assert before and all("lora_" in n for n in before)
    assert any(not torch.equal(before[n], after[n]) for n in before), "LoRA weights did not change"
    assert any("to_qkv_mlp_proj" in n for n in before) and any("ff_context.linear_out" in n for n in before)
    assert metrics["ratio_mean"] == 1.0 and metrics["clip_frac"] == 0.0
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["grad_norm"] > 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "pytorch_lora_weights.safetensors"):
        assert (out / "final" / "lora" / name).is_file(), name

    pipe = Flux2KleinPipeline.from_pretrained(flux2_dir)
    pipe.load_lora_weights(str(out / "final" / "lora"))
    cond = policy.encode(["a cat", "a red car"])
    x = policy.initial_latents(2, torch.Generator().manual_seed(0))
    img_ids, txt_ids = policy._ids(cond["prompt_embeds"].shape[1])
    kwargs = dict(hidden_states=x, timestep=torch.tensor([0.9, 0.4]), guidance=None,
                  encoder_hidden_states=cond["prompt_embeds"], txt_ids=txt_ids, img_ids=img_ids, return_dict=False)
    assert_diffusers_lora_matches(trainer, pipe, **kwargs)
