"""Adapters for diffusers pipelines on tiny random models (offline, CPU)."""

from __future__ import annotations

import pytest
import torch

from . import tiny_models as tm
from genalign.pipelines.ddpm import DDPMPolicy
from genalign.pipelines.flux import FluxPolicy, pack_latents, unpack_latents
from genalign.pipelines.sd3 import SD3Policy
from genalign.policy import ModelNotAvailableError, Policy
from genalign.rollout import recompute_log_probs, rollout

RES = tm.TINY_RES
PROMPTS = ["a cat", "a dog"]


def _sd3():
    return SD3Policy(tm.tiny_sd3(), guidance_scale=4.5)


def _flux():
    return FluxPolicy(tm.tiny_flux(guidance_embeds=True), height=RES, width=RES)


def _sd():
    return DDPMPolicy(tm.tiny_sd(), guidance_scale=5.0)


def _sdxl():
    return DDPMPolicy(tm.tiny_sdxl(), guidance_scale=5.0)


# (builder, cond_from_embeds sizes (seq, dim, pooled dim), step kind, noise level)
CASES = {
    "sd3": (_sd3, (7, 64, 64), "sde", 0.7),
    "sd3-cps": (_sd3, (7, 64, 64), "cps", 0.8),
    "flux": (_flux, (7, 32, 32), "sde", 0.7),
    "sd": (_sd, (7, 32, None), "ddim", 1.0),
    "sdxl": (_sdxl, (7, 64, 32), "ddim", 1.0),
}


def _policy_and_cond(name):
    build, (seq, dim, pooled), _, _ = CASES[name]
    policy = build()
    embeds = tm.random_embeds(len(PROMPTS), seq, dim, pooled, negative=policy.uses_cfg)
    return policy, policy.cond_from_embeds(**embeds)


@pytest.mark.parametrize("name", list(CASES))
def test_recomputed_log_probs_equal_rollout(name):
    policy, cond = _policy_and_cond(name)
    assert isinstance(policy, Policy)
    _, _, step_kind, level = CASES[name]
    traj = rollout(policy, cond, PROMPTS, num_steps=4, noise_levels=level, step_kind=step_kind,
                   generator=torch.Generator().manual_seed(0))
    assert traj.latents.dtype == torch.float32
    with torch.no_grad():
        recomputed = recompute_log_probs(policy, traj, list(range(4)))
    assert torch.equal(recomputed, traj.log_probs)
    assert torch.isfinite(traj.log_probs).all()


def test_cfg_is_applied():
    policy, cond = _policy_and_cond("sd3")
    x = policy.initial_latents(2, torch.Generator().manual_seed(0))
    t = torch.full((2,), 500.0)
    guided = policy.predict(x, t, cond)
    policy.guidance_scale = 1.0
    plain = policy.predict(x, t, cond)
    assert not torch.allclose(guided, plain)


def test_flux_pack_unpack_round_trip():
    x = torch.randn(3, 4, 8, 6)
    packed = pack_latents(x)
    assert packed.shape == (3, 4 * 3, 16)
    assert torch.equal(unpack_latents(packed, 8, 6), x)
    policy = _flux()
    assert policy.initial_latents(2).shape == (2, (RES // 16) ** 2, 16)


@pytest.mark.parametrize("name", ["sd3", "flux", "sd"])
def test_decode_shape_and_range(name):
    policy, _ = _policy_and_cond(name)
    with torch.no_grad():
        images = policy.decode(3 * policy.initial_latents(2, torch.Generator().manual_seed(1)))
    assert images.shape == (2, 3, RES, RES) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("name", ["sd3", "flux", "sdxl"])
def test_wrong_latent_shape_names_shapes(name):
    policy, cond = _policy_and_cond(name)
    bad = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"expects latents of shape \[B, .*got \(2, 3, 5\)"):
        policy.predict(bad, torch.zeros(2), cond)


def test_sd3_schedule_matches_scheduler():
    policy = _sd3()
    timesteps, sigmas = policy.schedule(10)
    assert timesteps.dtype == sigmas.dtype == torch.float32
    assert timesteps.shape == (10,) and sigmas.shape == (11,)
    assert torch.equal(sigmas[:-1] * 1000, timesteps)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and torch.all(sigmas[1:] < sigmas[:-1])
    sched = type(policy.pipe.scheduler).from_config(policy.pipe.scheduler.config)
    sched.set_timesteps(10)
    assert torch.allclose(sched.timesteps.float(), timesteps)


def test_flux_schedule_dynamic_shift():
    timesteps, sigmas = _flux().schedule(4)
    assert sigmas.shape == (5,) and sigmas[0] == 1 and sigmas[-1] == 0
    assert torch.allclose(sigmas[:-1] * 1000, timesteps)


def test_ddpm_schedule_sigmas_are_sqrt_one_minus_alpha_bar():
    policy = _sd()
    timesteps, sigmas = policy.schedule(4)
    ac = policy.pipe.scheduler.alphas_cumprod
    assert torch.allclose(sigmas[:-1] ** 2, 1 - ac[timesteps.long()])
    assert torch.allclose(sigmas[-1] ** 2, 1 - ac[0])  # set_alpha_to_one=False


def test_v_prediction_converted_to_epsilon():
    eps_policy = DDPMPolicy(tm.tiny_sd("epsilon"), guidance_scale=1.0)
    v_policy = DDPMPolicy(tm.tiny_sd("v_prediction"), guidance_scale=1.0)
    cond = eps_policy.cond_from_embeds(**tm.random_embeds(2, 7, 32, negative=False))
    x = eps_policy.initial_latents(2, torch.Generator().manual_seed(0))
    t = torch.full((2,), 501.0)
    ab = eps_policy.pipe.scheduler.alphas_cumprod[501]
    raw = eps_policy.predict(x, t, cond)  # same weights: read the raw output as v
    assert torch.allclose(v_policy.predict(x, t, cond), ab.sqrt() * raw + (1 - ab).sqrt() * x, atol=1e-6)
    bad = tm.tiny_sd("sample")
    with pytest.raises(ValueError, match="prediction type"):
        DDPMPolicy(bad)


@pytest.mark.parametrize("name", ["sd3", "flux", "sd"])
def test_save_and_from_pretrained_round_trip(name, tmp_path):
    policy, cond = _policy_and_cond(name)
    path = tm.save_pipeline(policy.pipe, tmp_path / name)
    loaded = type(policy).from_pretrained(path, device="cpu", guidance_scale=policy.guidance_scale,
                                          height=policy.height, width=policy.width)
    x = policy.initial_latents(2, torch.Generator().manual_seed(0))
    t = policy.schedule(4)[0][1].expand(2)
    with torch.no_grad():
        assert torch.equal(loaded.predict(x, t, cond), policy.predict(x, t, cond))
    assert loaded.lora_target_modules == policy.lora_target_modules


def test_uncached_model_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="hf download"):
        SD3Policy.from_pretrained("some-org/not-cached-model")


def test_encode_requires_text_encoders():
    with pytest.raises(ValueError, match="cond_from_embeds"):
        _sd3().encode(PROMPTS)


def test_cfg_requires_negative_embeds():
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        _sd3().cond_from_embeds(**tm.random_embeds(2, 7, 64, 64, negative=False))


def test_sd3_encode_with_tiny_clip_encoders(tmp_path):
    policy = SD3Policy(tm.tiny_sd3(with_text_encoders=True), guidance_scale=4.5)
    policy.max_sequence_length = 8
    cond = policy.encode(["a cat", "a dog"])
    assert set(cond) == {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                         "negative_pooled_prompt_embeds"}
    assert all(v.shape[0] == 2 for v in cond.values())
    assert cond["prompt_embeds"].shape == (2, 16 + 8, 64) and cond["pooled_prompt_embeds"].shape == (2, 64)
    assert not torch.equal(cond["prompt_embeds"][0], cond["prompt_embeds"][1])
    assert torch.equal(cond["negative_prompt_embeds"][0], cond["negative_prompt_embeds"][1])
    traj = rollout(policy, cond, ["a cat", "a dog"], num_steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(recompute_log_probs(policy, traj, [0, 1]), traj.log_probs)
    # the tokenizers and encoders survive save_pretrained / from_pretrained
    loaded = SD3Policy.from_pretrained(tm.save_pipeline(policy.pipe, tmp_path / "sd3clip"), device="cpu")
    loaded.max_sequence_length = 8
    assert torch.equal(loaded.encode(["a cat"])["prompt_embeds"], cond["prompt_embeds"][:1])


def test_chunked_decode_and_cached_cfg_embeddings_change_nothing():
    policy, cond = _policy_and_cond("sd3")
    latents = policy.initial_latents(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        # chunks of 1 vs the whole batch: batched convolutions may differ in the last bits
        torch.testing.assert_close(policy.decode(latents, batch_size=1), policy.decode(latents), rtol=1e-4, atol=1e-5)
        t = policy.schedule(4)[0][1].expand(2)
        first = policy.predict(latents, t, cond)
        again = policy.predict(latents, t, cond)  # served from the CFG embedding cache
        fresh = policy.predict(latents, t, {k: v.clone() for k, v in cond.items()})
        cond["prompt_embeds"].mul_(2)  # in-place change invalidates the cache
        changed = policy.predict(latents, t, cond)
    assert torch.equal(first, again) and torch.equal(first, fresh) and not torch.equal(first, changed)
    assert policy.enable_xformers() is False  # CPU: PyTorch SDPA stays


def test_flux_default_lora_targets_include_the_feed_forward_layers():
    """Every default target of the Flux adapter gets an adapter, multi-part suffixes (ff.net.0.proj) included."""
    from genalign.lora import add_lora

    policy = _flux()
    add_lora(policy.denoiser(), 2, 4.0, policy.lora_target_modules)
    names = {n for n, _ in policy.denoiser().named_parameters() if "lora_A" in n}
    for suffix in policy.lora_target_modules:
        assert any(f".{suffix}.lora_A" in n for n in names), suffix
    assert any(".ff.net.0.proj.lora_A" in n for n in names)


def test_adapter_options_reach_the_adapter_from_the_config(tmp_path):
    """model.options: keywords of the adapter's constructor go to it (Flux's true_cfg_scale was once handed to
    diffusers, which dropped it); the others go to diffusers; a key set twice is refused."""
    from genalign.config import ConfigError, load_config

    path = tm.save_pipeline(tm.tiny_flux(), tmp_path / "flux")
    cfg = load_config(None, [f"model.id={path}", "model.height=64", "model.width=64",
                             "model.options={true_cfg_scale: 3.0}"])
    kwargs = cfg.model.policy_kwargs()
    assert kwargs == {"height": 64, "width": 64, "true_cfg_scale": 3.0}
    policy = FluxPolicy.from_pretrained(path, device="cpu", **kwargs)
    assert policy.true_cfg_scale == 3.0 and policy.uses_cfg
    with pytest.raises(ConfigError, match="model.options sets \\['height'\\], which model.height already sets"):
        load_config(None, ["model.height=64", "model.options={height: 32}"]).model.policy_kwargs()
