"""The Qwen-Image adapter on a tiny offline ``QwenImagePipeline``: the pipeline's own transformer calls and
denoising, exact log-prob recomputation, decoding, and one epoch of the real trainer with a LoRA that loads in
plain diffusers."""

from __future__ import annotations

import warnings

import pytest
import torch

from genalign.pipelines.qwen_image import QwenImagePolicy, pack_latents, pad_prompt_embeds, unpack_latents
from genalign.policy import Policy
from genalign.rollout import recompute_log_probs, rollout

from .test_train_models import _train_one_epoch, assert_diffusers_lora_matches
from .test_trainer import prompts_file  # noqa: F401
from .tiny_models import save_pipeline
from .tiny_qwen_image import QWEN_TEXT_DIM, TINY_QWEN_RES, tiny_qwen_image

RES = TINY_QWEN_RES
PROMPTS = ["a cat", "a red car on a street"]



def _policy(with_text_encoders=False, **kw):
    kw = {"height": RES, "width": RES, **kw}
    return QwenImagePolicy(tiny_qwen_image(with_text_encoders=with_text_encoders), **kw)


def _random_cond(policy, lengths=(5, 9), seed=0):
    """Embeddings of different valid lengths per prompt (zero-padded to the longest, as the pipeline returns them)."""
    g = torch.Generator().manual_seed(seed)
    longest = max(lengths)

    def one():
        embeds = torch.randn(len(lengths), longest, QWEN_TEXT_DIM, generator=g)
        mask = torch.tensor([[1] * n + [0] * (longest - n) for n in lengths])
        return embeds * mask[..., None], mask

    pe, mask = one()
    kw = dict(prompt_embeds=pe, prompt_embeds_mask=mask)
    if policy.uses_cfg:
        npe, nmask = one()
        kw.update(negative_prompt_embeds=npe[:1, :lengths[0]], negative_prompt_embeds_mask=nmask[:1, :lengths[0]])
    return policy.cond_from_embeds(**kw)


class TransformerCalls:
    """Records the keyword arguments and outputs of every call of ``module``."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.calls.append((dict(kwargs), output[0].detach().clone()))

    def __enter__(self):
        return self.calls

    def __exit__(self, *exc):
        self.handle.remove()


def test_one_step_velocity_and_ode_rollout_equal_the_pipeline():
    """Given the same conditioning, ``predict`` is bit for bit the pipeline's transformer call at each step
    (same timestep / 1000, mask, image shapes), and an ODE rollout ends where the pipeline's denoising does."""
    policy = _policy(max_sequence_length=24)
    pipe = policy.pipe
    cond = _random_cond(policy)
    assert cond["prompt_embeds"].shape == (2, 24, QWEN_TEXT_DIM) and cond["prompt_embeds_mask"].shape == (2, 24)
    x0 = policy.initial_latents(2, torch.Generator().manual_seed(0))
    # the pipeline draws [B, 1, C, h, w] noise and packs it: the same numbers
    noise = pipe.prepare_latents(2, policy.latent_channels, RES, RES, torch.float32, "cpu",
                                 torch.Generator().manual_seed(0))
    assert torch.equal(noise, x0)
    with TransformerCalls(pipe.transformer) as calls, torch.no_grad():
        final = pipe(prompt_embeds=cond["prompt_embeds"], prompt_embeds_mask=cond["prompt_embeds_mask"], latents=x0,
                     height=RES, width=RES, num_inference_steps=2, true_cfg_scale=1.0, output_type="latent").images
    timesteps, sigmas = policy.schedule(2)
    assert len(calls) == 2 and sigmas[0] == 1 and sigmas[-2] == pytest.approx(0.02) and sigmas[-1] == 0
    with torch.no_grad():
        for j, (kwargs, velocity) in enumerate(calls):
            assert torch.equal(kwargs["timestep"], timesteps[j].expand(2) / 1000)
            assert kwargs["img_shapes"] == policy._img_shapes(2) == [[(1, 4, 4)]] * 2
            assert torch.equal(kwargs["encoder_hidden_states_mask"], cond["prompt_embeds_mask"])
            assert torch.equal(policy.predict(kwargs["hidden_states"], timesteps[j].expand(2), cond), velocity)
        traj = rollout(policy, cond, PROMPTS, num_steps=2, noise_levels=0.0, latents=x0)
    torch.testing.assert_close(traj.final, final, rtol=1e-6, atol=1e-6)


def test_encode_and_true_cfg_match_the_pipeline_from_prompts():
    """From prompt strings, with true CFG (scale 4, empty negative prompt): the adapter's encoding is the pipeline's
    (padded to max_sequence_length, padding masked out), and its guided velocity (rescaled to the conditional norm
    per token) and ODE rollout match the pipeline's, which runs negative and positive prompts separately and unpadded."""
    policy = _policy(with_text_encoders=True, true_cfg_scale=4.0)
    pipe = policy.pipe
    cond = policy.encode(PROMPTS)
    assert set(cond) == {"prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds", "negative_prompt_embeds_mask"}
    assert all(v.shape[:2] == (2, policy.max_sequence_length) == (2, 512) for v in cond.values())
    ref, ref_mask = pipe.encode_prompt(PROMPTS, device="cpu")
    lengths = ref_mask.sum(1)
    assert lengths[0] < lengths[1] and torch.equal(cond["prompt_embeds_mask"].sum(1), lengths)
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(cond["prompt_embeds"][i, :n], ref[i, :n])
        assert not cond["prompt_embeds"][i, n:].any() and not cond["prompt_embeds_mask"][i, n:].any()
    assert torch.equal(cond["negative_prompt_embeds"][0], cond["negative_prompt_embeds"][1])
    policy.cache_prompt_embeds = True  # per-prompt cached rows (fixed length) assemble the same conditioning
    cached = policy.encode(PROMPTS[::-1] + PROMPTS)
    assert all(torch.equal(cached[k], torch.cat([v[[1, 0]], v])) for k, v in cond.items())

    x0 = policy.initial_latents(2, torch.Generator().manual_seed(1))
    with TransformerCalls(pipe.transformer) as calls, torch.no_grad():
        final = pipe(prompt=PROMPTS, negative_prompt=[""] * 2, latents=x0, height=RES, width=RES,
                     num_inference_steps=2, true_cfg_scale=4.0, output_type="latent").images
    (_, pos), (_, neg) = calls[:2]  # step 0: conditional, then unconditional call
    guided = neg + 4.0 * (pos - neg)
    guided = guided * (pos.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
    t0 = policy.schedule(2)[0][0].expand(2)
    with torch.no_grad():
        ours = policy.predict(x0, t0, cond)
        traj = rollout(policy, cond, PROMPTS, num_steps=2, noise_levels=0.0, latents=x0)
    torch.testing.assert_close(ours, guided, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, neg + 4.0 * (pos - neg), rtol=1e-3, atol=1e-3)  # the rescale matters
    torch.testing.assert_close(traj.final, final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg,step_kind", [(1.0, "sde"), (4.0, "sde"), (1.0, "cps")])
def test_recomputed_log_probs_equal_rollout(cfg, step_kind):
    policy = _policy(true_cfg_scale=cfg, max_sequence_length=16)
    assert isinstance(policy, Policy) and policy.uses_cfg == (cfg > 1)
    cond = _random_cond(policy)
    traj = rollout(policy, cond, PROMPTS, num_steps=3, noise_levels=0.7, step_kind=step_kind,
                   generator=torch.Generator().manual_seed(0))
    assert traj.latents.shape == (2, 4, 16, 16) and torch.isfinite(traj.log_probs).all()
    # the stored conditioning is batch-first: a trajectory's rows can be selected and concatenated
    halves = type(traj).cat([traj.select([1]), traj.select([0])])
    with torch.no_grad():
        assert torch.equal(recompute_log_probs(policy, traj, [0, 1, 2]), traj.log_probs)
        assert torch.equal(recompute_log_probs(policy, halves, [0, 2]), traj.log_probs[[1, 0]][:, [0, 2]])


def test_padding_is_masked_out_and_conditioning_is_validated():
    policy = _policy(max_sequence_length=16)
    cond = _random_cond(policy, lengths=(5, 9))
    x = policy.initial_latents(2, torch.Generator().manual_seed(0))
    t = torch.full((2,), 700.0)
    with torch.no_grad():
        padded = policy.predict(x, t, cond)
        policy.max_sequence_length = 9  # same tokens, less padding
        short = policy.predict(x, t, policy.cond_from_embeds(cond["prompt_embeds"][:, :9],
                                                             cond["prompt_embeds_mask"][:, :9]))
        # garbage in the padded positions changes nothing: they are masked out of the attention
        noisy = dict(cond, prompt_embeds=cond["prompt_embeds"] + 5 * (1 - cond["prompt_embeds_mask"][..., None]))
        policy.max_sequence_length = 16
        assert torch.allclose(policy.predict(x, t, noisy), padded, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(short, padded, rtol=1e-5, atol=1e-6)
    # truncation to max_sequence_length, as the pipeline does; a missing mask means every token is valid
    pe, mask = pad_prompt_embeds(torch.ones(1, 20, 3), None, 16)
    assert pe.shape == (1, 16, 3) and mask.dtype == torch.long and mask.all()
    with pytest.raises(ValueError, match="prompt_embeds_mask has shape"):
        policy.cond_from_embeds(torch.zeros(2, 5, QWEN_TEXT_DIM), torch.ones(2, 4))
    with pytest.raises(ValueError, match="negative_prompt_embeds.*true CFG"):
        _policy(true_cfg_scale=3.0).cond_from_embeds(torch.zeros(2, 5, QWEN_TEXT_DIM))
    with pytest.raises(ValueError, match="cond_from_embeds"):
        policy.encode(PROMPTS)  # no text encoder
    with pytest.raises(ValueError, match="guidance_embeds=False.*true_cfg_scale"):
        _policy(guidance_scale=4.0)
    with pytest.raises(ValueError, match="max_sequence_length"):
        _policy(max_sequence_length=2048)


def test_decode_matches_the_pipeline_and_bad_latent_shape_is_named():
    policy = _policy(max_sequence_length=16)
    pipe, cond = policy.pipe, _random_cond(policy)
    x0 = policy.initial_latents(2, torch.Generator().manual_seed(2))
    kw = dict(prompt_embeds=cond["prompt_embeds"], prompt_embeds_mask=cond["prompt_embeds_mask"], latents=x0,
              height=RES, width=RES, num_inference_steps=2, true_cfg_scale=1.0)
    with torch.no_grad():
        latents = pipe(output_type="latent", **kw).images
        expected = pipe(output_type="pt", **kw).images
        images = policy.decode(latents)
        chunked = policy.decode(3 * latents, batch_size=1)
    assert images.shape == (2, 3, RES, RES) and images.dtype == torch.float32
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-6)
    assert chunked.min() >= 0 and chunked.max() <= 1 and not torch.allclose(chunked, images)
    # encode_images normalises what decode de-normalises: z = vae mode, latents = (z - mean) / std, packed
    pixels = images[:, :, None] * 2 - 1
    with torch.no_grad():
        encoded = policy.encode_images(images)
        mode = pipe.vae.encode(pixels).latent_dist.mode()
    assert encoded.shape == (2, 16, 16) and encoded.dtype == torch.float32
    std = torch.tensor(pipe.vae.config.latents_std).view(1, 4, 1, 1, 1)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(policy._vae_latents(encoded) * std + mean, mode, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"encode_images expects \[B, 3, 32, 32\]"):
        policy.encode_images(torch.zeros(1, 3, 16, 16))
    # packing is the pipeline's and round-trips through the VAE's one-frame layout
    z = torch.randn(3, 4, 1, 8, 6)
    assert pack_latents(z).shape == (3, 12, 16) and torch.equal(unpack_latents(pack_latents(z), 8, 6), z)
    with pytest.raises(ValueError, match=r"expects latents of shape \[B, 16, 16\] \(for 32x32 px\), got \(2, 8, 8\)"):
        policy.predict(torch.zeros(2, 8, 8), torch.zeros(2), cond)
    with pytest.raises(ValueError, match=r"expects latents of shape \[B, 16, 16\].*got \(2, 4, 8, 8\)"):
        policy.decode(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="multiples of 8"):
        _policy(height=36)
    with pytest.raises(ValueError, match="non-finite sigmas for 1 step"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # shift_terminal: diffusers divides 0 by 0 for a single step
        policy.schedule(1)


def test_save_and_from_pretrained_round_trip_picks_the_adapter(tmp_path):
    from genalign.pipelines import load_policy, policy_class

    policy = _policy(max_sequence_length=16, true_cfg_scale=2.5)
    path = save_pipeline(policy.pipe, tmp_path / "qwen")
    assert policy_class(path) is QwenImagePolicy
    loaded = load_policy(path, device="cpu", height=RES, width=RES, max_sequence_length=16, true_cfg_scale=2.5)
    assert isinstance(loaded, QwenImagePolicy) and loaded.uses_cfg and loaded.pipe.text_encoder is None
    assert loaded.lora_target_modules == policy.lora_target_modules == list(policy.default_lora_targets)
    cond = _random_cond(policy)
    x = policy.initial_latents(2, torch.Generator().manual_seed(0))
    t = policy.schedule(4)[0][1].expand(2)
    with torch.no_grad():
        assert torch.equal(loaded.predict(x, t, cond), policy.predict(x, t, cond))


def test_default_lora_covers_both_streams_mlps():
    """Multi-part target suffixes (img_mlp.net.0.proj, ...) get adapters too (they were once dropped silently)."""
    from genalign.lora import add_lora

    policy = _policy()
    add_lora(policy.denoiser(), 2, 2.0, policy.lora_target_modules)
    names = {n for n, _ in policy.denoiser().named_parameters() if "lora_A" in n}
    for suffix in ("attn.to_q", "attn.add_q_proj", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.2"):
        assert any(f".{suffix}.lora_A" in n for n in names), suffix


# ------------------------------------------------------------------------------------------ real trainer


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_pipeline(tiny_qwen_image(with_text_encoders=True), tmp_path_factory.mktemp("qwen_image"))


def test_trains_one_epoch_from_a_saved_pipeline_and_lora_loads_in_diffusers(qwen_dir, tmp_path, prompts_file):
    """Loaded by path (model_index.json picks the adapter), prompts encoded by the tiny Qwen2.5-VL, one optimizer
    step over 8 samples (ratio exactly 1), and the exported LoRA reproduces the trained transformer in diffusers."""
    from diffusers import QwenImagePipeline


    out = tmp_path / "run"
    trainer, _ = _train_one_epoch(qwen_dir, out, prompts_file, **{
        "model.guidance_scale": "null", "model.height": RES, "model.width": RES, "sampling.step_kind": "sde",
        "sampling.noise_level": 0.7, "train.ema": False})
    policy = trainer.policy
    assert isinstance(policy, QwenImagePolicy) and policy.pipe.text_encoder is not None and not policy.uses_cfg
    lora_dir = out / "final" / "lora"

    pipe = QwenImagePipeline.from_pretrained(qwen_dir)
    pipe.load_lora_weights(str(lora_dir))
    cond = policy.encode(["a cat", "a red car"])
    x = policy.initial_latents(2, torch.Generator().manual_seed(0))
    kwargs = dict(hidden_states=x, timestep=torch.tensor([0.9, 0.4]), encoder_hidden_states=cond["prompt_embeds"],
                  encoder_hidden_states_mask=cond["prompt_embeds_mask"], img_shapes=policy._img_shapes(2),
                  return_dict=False)
    assert_diffusers_lora_matches(trainer, pipe, **kwargs)
