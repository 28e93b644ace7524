"""The Z-Image adapter on a tiny offline ``ZImagePipeline`` (CPU): it reproduces diffusers' sampling loop, its
schedule is the pipeline's, recomputed log-probs equal the rollout's, one epoch of the real trainer runs from a
``save_pretrained`` directory and exports a LoRA that plain diffusers loads, and decoding / bad shapes behave."""

from __future__ import annotations

import pytest
import torch

from genalign.pipelines.z_image import ZImagePolicy, pad_embeds, unpad_embeds
from genalign.policy import Policy
from genalign.rollout import recompute_log_probs, rollout

from .test_train_models import _train_one_epoch
from .test_trainer import tiny_overrides, prompts_file  # noqa: F401
from .tiny_models import save_pipeline
from .tiny_z_image import CAP_DIM, Z_IMAGE_RES, tiny_z_image

RES = Z_IMAGE_RES
PROMPTS = ["a cat", "a dog"]



def _embeds(lengths, seed):
    """Per-sample caption features ``[L_i, CAP_DIM]`` (the pipeline's list format)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, CAP_DIM, generator=g) for n in lengths]


def _policy(guidance_scale=None, **kw):
    pipe = tiny_z_image(**kw.pop("build", {}))
    pipe.set_progress_bar_config(disable=True)
    return ZImagePolicy(pipe, guidance_scale=guidance_scale, height=RES, width=RES, device="cpu", **kw)


CFG_CASES = {  # pipeline keyword arguments; guidance 0 is Z-Image-Turbo's setting (no negative)
    "turbo": dict(guidance_scale=0.0),
    "cfg": dict(guidance_scale=3.0),
    "cfg-normalized-truncated": dict(guidance_scale=3.0, cfg_normalization=1.0, cfg_truncation=0.2),
}


@pytest.mark.parametrize("case", list(CFG_CASES))
def test_ode_rollout_reproduces_the_pipeline(case):
    """diffusers' loop (variable-length captions, its CFG and negation) and an ODE rollout from the same noise and
    embeddings give the same final latents over 2 steps, on the pipeline's schedule."""
    from diffusers import ZImagePipeline

    kwargs = CFG_CASES[case]
    options = {k: v for k, v in kwargs.items() if k != "guidance_scale"}
    policy = _policy(kwargs["guidance_scale"], **options)
    pipe = policy.pipe
    assert isinstance(pipe, ZImagePipeline) and isinstance(policy, Policy)
    assert policy.uses_cfg == (kwargs["guidance_scale"] > 0)
    pos, neg = _embeds([5, 11], seed=1), _embeds([3, 3], seed=2)
    latents = policy.initial_latents(2, torch.Generator().manual_seed(0))
    expected = pipe(prompt_embeds=[e.clone() for e in pos], negative_prompt_embeds=[e.clone() for e in neg],
                    latents=latents.clone(), num_inference_steps=2, height=RES, width=RES, output_type="latent",
                    return_dict=False, **kwargs)[0]
    assert torch.equal(policy.schedule(2)[1], pipe.scheduler.sigmas)
    assert torch.equal(policy.schedule(2)[0], pipe.scheduler.timesteps)

    cond = policy.cond_from_embeds(pos, negative_prompt_embeds=neg if policy.uses_cfg else None)
    assert set(cond) == set(policy.required_cond_keys())
    assert cond["prompt_embeds"].shape == (2, policy.max_sequence_length, CAP_DIM)
    assert cond["prompt_embeds_mask"].sum(1).tolist() == [5, 11]
    traj = rollout(policy, cond, PROMPTS, num_steps=2, noise_levels=0.0, step_kind="sde", latents=latents)
    assert traj.latents.shape == (2, 3, 16, RES // 8, RES // 8)
    torch.testing.assert_close(traj.final, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(traj.final, latents)
    if options:  # the options change the result (else the test would not test them)
        plain = _policy(kwargs["guidance_scale"])
        other = rollout(plain, plain.cond_from_embeds(pos, negative_prompt_embeds=neg), PROMPTS, num_steps=2,
                        noise_levels=0.0, latents=latents).final
        assert not torch.allclose(other, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dynamic_shift", [False, True])
@pytest.mark.parametrize("num_steps", [1, 9])
def test_schedule_is_the_pipelines(dynamic_shift, num_steps):
    """Static shift (Z-Image-Turbo's 3.0) and dynamic (token-count) shift: sigmas and timesteps are the ones the
    pipeline's own loop sets (default Z-Image sigmas ``linspace(1, 1/N, N)``)."""
    policy = _policy(0.0, build=dict(dynamic_shift=dynamic_shift))
    policy.pipe(prompt_embeds=_embeds([4], seed=0), num_inference_steps=num_steps, guidance_scale=0.0, height=RES,
                width=RES, output_type="latent", generator=torch.Generator().manual_seed(0))
    timesteps, sigmas = policy.schedule(num_steps)
    assert torch.equal(sigmas, policy.pipe.scheduler.sigmas) and torch.equal(timesteps, policy.pipe.scheduler.timesteps)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and timesteps.shape == (num_steps,)


@pytest.mark.parametrize("options", [{}, dict(cfg_normalization=1.0, cfg_truncation=0.5)])
def test_recomputed_log_probs_equal_rollout(options):
    """SDE rollout with CFG (default guidance 5.0) and variable-length captions: recomputed log-probs are exact."""
    policy = _policy(**options)
    assert policy.guidance_scale == 5.0 and policy.cfg_scale == 6.0
    cond = policy.cond_from_embeds(_embeds([7, 2], seed=3), negative_prompt_embeds=_embeds([4], seed=4))
    traj = rollout(policy, cond, PROMPTS, num_steps=4, noise_levels=0.7, step_kind="sde",
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        recomputed = recompute_log_probs(policy, traj, list(range(4)))
    assert torch.equal(recomputed, traj.log_probs)
    assert torch.isfinite(traj.log_probs).all() and (traj.stds > 0).all()
    # a sample's velocity does not depend on the other captions of its batch (padding is masked)
    x, t = traj.latents[:, 1], traj.timesteps[:, 1]
    with torch.no_grad():
        both = policy.predict(x, t, cond)
        alone = policy.predict(x[1:], t[1:], {k: v[1:] for k, v in cond.items()})
    torch.testing.assert_close(alone, both[1:], rtol=1e-4, atol=1e-5)  # float32, batch-shape-dependent kernels


def test_predict_is_the_negated_guided_model_output():
    """``predict`` = -(pos + g (pos - neg)) of the raw transformer at model time (1000 - t) / 1000."""
    policy = _policy(2.0)
    pos, neg = _embeds([6, 9], seed=5), _embeds([2, 2], seed=6)
    cond = policy.cond_from_embeds(pos, negative_prompt_embeds=neg)
    x = policy.initial_latents(2, torch.Generator().manual_seed(1))
    t = torch.tensor([900.0, 300.0])
    with torch.no_grad():
        v = policy.predict(x, t, cond)
        raw = policy.denoiser()(list(x.unsqueeze(2)) * 2, torch.tensor([0.1, 0.7] * 2), pos + neg,
                                return_dict=False)[0]
    raw = torch.stack(raw).squeeze(2)
    p, n = raw[:2], raw[2:]
    torch.testing.assert_close(v, -(p + 2.0 * (p - n)), rtol=1e-5, atol=1e-5)


def test_conditioning_padding_and_errors():
    policy = _policy(5.0)
    items = _embeds([3, 6], seed=7)
    padded, mask = pad_embeds(items, 8)
    assert padded.shape == (2, 8, CAP_DIM) and mask.dtype == torch.bool and mask.sum(1).tolist() == [3, 6]
    assert all(torch.equal(a, b) for a, b in zip(unpad_embeds(padded, mask.float()), items))
    # [B, L, D] + mask (e.g. a text encoder's padded output) and the list give the same conditioning
    neg = _embeds([2], seed=8)
    a = policy.cond_from_embeds(items, negative_prompt_embeds=neg)
    b = policy.cond_from_embeds(padded, mask, negative_prompt_embeds=neg[0][None])
    assert all(torch.equal(a[k], b[k]) for k in a) and a["negative_prompt_embeds"].shape[0] == 2
    with pytest.raises(ValueError, match="negative_prompt_embeds.*guidance 5.0 > 0"):
        policy.cond_from_embeds(items)
    with pytest.raises(ValueError, match=r"cap_feat_dim 16"):
        policy.cond_from_embeds([torch.randn(3, 8)], negative_prompt_embeds=neg)
    with pytest.raises(ValueError, match="513 tokens"):
        policy.cond_from_embeds([torch.randn(513, CAP_DIM)], negative_prompt_embeds=neg)
    turbo = _policy(0.0)  # Z-Image-Turbo: no negative needed, none stored
    assert not turbo.uses_cfg and set(turbo.cond_from_embeds(items)) == {"prompt_embeds", "prompt_embeds_mask"}


def test_encode_matches_the_pipelines_prompt_encoding():
    """``encode`` stores exactly the pipeline's variable-length Qwen3 features (positive and the empty negative)."""
    policy = _policy(4.0, build=dict(with_text_encoders=True))
    prompts = ["a cat", "A red car, at night!"]
    cond = policy.encode(prompts)
    assert prompts == ["a cat", "A red car, at night!"]  # diffusers templates its list in place: ours is a copy
    pos, neg = policy.pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=True)
    for key, ref in (("prompt_embeds", pos), ("negative_prompt_embeds", neg)):
        got = unpad_embeds(cond[key], cond[key + "_mask"])
        assert [g.shape for g in got] == [r.shape for r in ref]
        assert all(torch.equal(g, r) for g, r in zip(got, ref))
    assert cond["prompt_embeds_mask"].sum(1)[0] < cond["prompt_embeds_mask"].sum(1)[1]
    # cache_prompt_embeds: the same conditioning assembled from cached rows (prompts in another order)
    policy.cache_prompt_embeds = True
    cached = policy.encode(prompts[::-1] + prompts)
    assert all(torch.equal(cached[k], torch.cat([cond[k].flip(0), cond[k]])) for k in cond)
    # a prompt set's per-prompt negative prompt replaces the empty negative of its row only
    rows = policy.encode(prompts, conditioning=[{"negative_prompt": "blurry, dark"}, None])
    blurry = policy.pipe.encode_prompt(["blurry, dark"], device="cpu", do_classifier_free_guidance=False)[0][0]
    negs = unpad_embeds(rows["negative_prompt_embeds"], rows["negative_prompt_embeds_mask"])
    assert torch.equal(negs[0], blurry) and torch.equal(negs[1], neg[1])
    assert torch.equal(rows["prompt_embeds"], cond["prompt_embeds"])
    turbo = ZImagePolicy(policy.pipe, guidance_scale=0.0)
    with pytest.raises(ValueError, match="guidance_scale = 0; Z-Image's convention: > 0"):
        turbo.encode(prompts, conditioning=[{"negative_prompt": "blurry"}, None])


def test_decode_shape_range_and_latent_shape_error():
    policy = _policy(0.0)
    with torch.no_grad():
        images = policy.decode(3 * policy.initial_latents(2, torch.Generator().manual_seed(1)))
    assert images.shape == (2, 3, RES, RES) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert policy.encode_images(images).shape == (2, 16, RES // 8, RES // 8)  # data-set training's VAE encoding
    cond = policy.cond_from_embeds(_embeds([4, 4], seed=0))
    with pytest.raises(ValueError, match=r"\[B, 16, 8, 8\] \(for 64x64 px\), got \(2, 16, 4, 4\)"):
        policy.predict(torch.zeros(2, 16, 4, 4), torch.tensor([500.0, 500.0]), cond)
    with pytest.raises(ValueError, match=r"\[B, 16, 8, 8\].*got \(2, 4, 8, 8\)"):
        policy.decode(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="multiples of 16"):
        ZImagePolicy(tiny_z_image(), height=72, width=64)
    assert ZImagePolicy(tiny_z_image()).height == 1024  # the pipeline's default resolution


# ---------------------------------------------------------------------------- training from a saved directory
@pytest.fixture(scope="module")
def z_image_dir(tmp_path_factory):
    return save_pipeline(tiny_z_image(with_text_encoders=True), tmp_path_factory.mktemp("z_image"))



def test_loading_by_path_picks_the_adapter_with_its_options(z_image_dir):
    from genalign.pipelines import load_policy, policy_class

    assert policy_class(z_image_dir) is ZImagePolicy
    policy = load_policy(z_image_dir, device="cpu", height=RES, width=RES, cfg_truncation=0.5, max_sequence_length=64)
    assert isinstance(policy, ZImagePolicy) and policy.pipe.text_encoder is not None
    assert (policy.cfg_truncation, policy.max_sequence_length, policy.guidance_scale) == (0.5, 64, 5.0)
    assert policy.encode(["a cat"])["prompt_embeds"].shape == (1, 64, CAP_DIM)
    bare = ZImagePolicy.from_pretrained(z_image_dir, device="cpu", height=RES, width=RES, text_encoder=None,
                                        tokenizer=None)
    with pytest.raises(ValueError, match="cond_from_embeds"):
        bare.encode(["a cat"])


def test_trains_one_epoch_and_lora_loads_in_diffusers(z_image_dir, tmp_path, prompts_file):
    """One epoch of the real trainer (CFG on, SDE steps): LoRA weights change, the only step's ratios are exactly
    1, and the exported diffusers LoRA reproduces the trained transformer in a plain ``ZImagePipeline``."""
    from diffusers import ZImagePipeline


    out = tmp_path / "run"
    trainer, _ = _train_one_epoch(z_image_dir, out, prompts_file, **{
        "model.guidance_scale": 2.0, "model.height": RES, "model.width": RES, "sampling.step_kind": "sde",
        "sampling.noise_level": 0.7, "train.ema": False})
    policy = trainer.policy
    assert isinstance(policy, ZImagePolicy) and policy.uses_cfg and policy.pipe.text_encoder is not None
    lora_dir = out / "final" / "lora"

    pipe = ZImagePipeline.from_pretrained(z_image_dir)
    pipe.load_lora_weights(str(lora_dir))
    cond = policy.encode(["a cat", "a red car"])
    caps = unpad_embeds(cond["prompt_embeds"], cond["prompt_embeds_mask"])
    x = policy.initial_latents(2, torch.Generator().manual_seed(0))
    args = (list(x.unsqueeze(2)), torch.tensor([0.1, 0.6]), caps)
    with torch.no_grad():
        ours = torch.stack(trainer.denoiser(*args, return_dict=False)[0])
        theirs = torch.stack(pipe.transformer(*args, return_dict=False)[0])
        pipe.disable_lora()
        base = torch.stack(pipe.transformer(*args, return_dict=False)[0])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base, theirs)
