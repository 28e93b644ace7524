"""The Wan 2.1 text-to-video adapter on a tiny offline pipeline, and the per-video reward protocol.

- the adapter's rollout (ODE steps) and decode reproduce ``WanPipeline``'s own sampling and decoding;
- recomputed log-probs equal the rollout's (SDE steps);
- rewards on videos: a ``modality = "video"`` reward sees ``[N, F, 3, H, W]``, an image reward every frame with its
  scores averaged per video, wrong ranks are refused naming the reward;
- grids of a video policy show middle frames;
- one epoch of the real trainer from a ``save_pretrained`` directory, with eval and the before/after grid, and
  the exported LoRA in plain diffusers.
"""

from __future__ import annotations

import pytest
import torch

from genalign.pipelines.wan import WanPolicy
from genalign.policy import Policy
from genalign.reward_api import RewardError, RewardSet
from genalign.rollout import recompute_log_probs, rollout

from .test_trainer import prompts_file  # noqa: F401
from . import tiny_models as tm
from .test_train_models import _train_one_epoch, assert_diffusers_lora_matches
from .tiny_wan import TINY_FRAMES, TINY_SHIFT, TINY_WAN_RES, tiny_wan

RES, FRAMES = TINY_WAN_RES, TINY_FRAMES
PROMPTS = ["a cat", "a red car"]



def _policy(with_text_encoders=False, **kw):
    kw = {"height": RES, "width": RES, "num_frames": FRAMES, "device": "cpu", **kw}
    return WanPolicy(tiny_wan(with_text_encoders=with_text_encoders), **kw)


def test_adapter_reproduces_the_pipeline_sampling_and_decoding():
    policy = _policy(with_text_encoders=True)
    pipe = policy.pipe
    assert isinstance(policy, Policy) and policy.guidance_scale == 5.0 and policy.uses_cfg
    assert policy.latent_shape == (16, 2, RES // 8, RES // 8)  # (5 - 1) / 4 + 1 latent frames
    assert set(policy.lora_target_modules) == {"to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"}

    # conditioning: the pipeline's umT5 embeddings, the negative is the empty prompt's
    cond = policy.encode(PROMPTS)
    with torch.no_grad():
        pe, npe = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, max_sequence_length=512, device="cpu")
    assert torch.equal(cond["prompt_embeds"], pe) and torch.equal(cond["negative_prompt_embeds"], npe)
    # a prompt record's own negative prompt (Wan's official sampling uses a long one) replaces the empty one
    with torch.no_grad():
        _, npe2 = pipe.encode_prompt(PROMPTS, ["blurry, static", ""], max_sequence_length=512, device="cpu")
    cond2 = policy.encode(PROMPTS, [{"negative_prompt": "blurry, static"}, None])
    torch.testing.assert_close(cond2["negative_prompt_embeds"], npe2, rtol=0, atol=1e-6)
    assert not torch.allclose(cond2["negative_prompt_embeds"][0], npe[0])

    # schedule = the pipeline scheduler's (FlowMatchEuler, shift 3)
    timesteps, sigmas = policy.schedule(2)
    ref = type(pipe.scheduler).from_config(pipe.scheduler.config)
    ref.set_timesteps(2)
    assert torch.equal(timesteps, ref.timesteps) and torch.equal(sigmas, ref.sigmas)

    # 2 ODE steps from the same noise (the pipeline's own draw for this generator) with CFG 5.0
    x0 = policy.initial_latents(2, torch.Generator().manual_seed(0))
    assert torch.equal(x0, pipe.prepare_latents(2, 16, RES, RES, FRAMES, torch.float32, "cpu",
                                                torch.Generator().manual_seed(0)))
    with torch.no_grad():
        traj = rollout(policy, cond, PROMPTS, num_steps=2, noise_levels=0.0, latents=x0)
    call = dict(prompt=PROMPTS, latents=x0, height=RES, width=RES, num_frames=FRAMES, num_inference_steps=2,
                guidance_scale=5.0)
    theirs = pipe(**call, output_type="latent").frames
    # the pipeline runs the negative and positive halves in two calls, the adapter in one batch: round-off only
    torch.testing.assert_close(traj.final, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(traj.final, x0)

    # decode = the pipeline's decoded video [B, F, 3, H, W] in [0, 1]
    video = pipe(**call, output_type="pt").frames
    with torch.no_grad():
        ours = policy.decode(theirs)
    assert ours.shape == (2, FRAMES, 3, RES, RES) and ours.dtype == torch.float32
    assert torch.equal(ours, video)
    with torch.no_grad():  # decoding one video at a time: the same videos up to batched-kernel round-off
        torch.testing.assert_close(policy.decode(theirs, batch_size=1), ours, rtol=0, atol=1e-6)


def test_num_frames_schedule_options_and_refusals():
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    with pytest.raises(ValueError, match=r"num_frames=6.*multiple of the VAE's temporal factor 4"):
        _policy(num_frames=6)
    assert WanPolicy(tiny_wan(), device="cpu").num_frames == 81 and _policy().num_frames == FRAMES
    # the official UniPC scheduler lends its flow_shift to the Euler sigma grid
    policy = _policy()
    euler = policy.schedule(10)
    policy.pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                    flow_shift=TINY_SHIFT)
    for a, b in zip(policy.schedule(10), euler):
        assert torch.equal(a, b)
    policy.flow_shift = 5.0  # e.g. 720p
    ref = FlowMatchEulerDiscreteScheduler(shift=5.0)
    ref.set_timesteps(10)
    assert torch.equal(policy.schedule(10)[1], ref.sigmas)
    pipe = tiny_wan()
    pipe.register_to_config(boundary_ratio=0.9)
    with pytest.raises(ValueError, match="Wan 2.1"):
        WanPolicy(pipe, device="cpu")


def test_recomputed_log_probs_equal_rollout():
    policy = _policy()
    cond = policy.cond_from_embeds(**tm.random_embeds(len(PROMPTS), 7, tm.T5_DIM, negative=True))
    traj = rollout(policy, cond, PROMPTS, num_steps=3, noise_levels=0.7, step_kind="sde",
                   generator=torch.Generator().manual_seed(0))
    assert traj.latents.shape == (2, 4, 16, 2, RES // 8, RES // 8)
    with torch.no_grad():
        recomputed = recompute_log_probs(policy, traj, list(range(3)))
    assert torch.equal(recomputed, traj.log_probs)
    assert torch.isfinite(traj.log_probs).all() and (traj.stds > 0).all()


# ----------------------------------------------------------------------------------- per-video rewards
def _videos():
    """2 videos of 3 frames, every frame constant: video 0 = 0.1, 0.2, 0.6; video 1 = 1.0, 0.0, 0.5."""
    values = torch.tensor([[0.1, 0.2, 0.6], [1.0, 0.0, 0.5]])
    return values[:, :, None, None, None].expand(2, 3, 3, 4, 5).clone()


def test_video_reward_sees_videos_and_image_reward_is_averaged_over_frames():
    seen = {}

    def clip_motion(images, prompts, metadata):
        seen["video"] = (tuple(images.shape), list(prompts), list(metadata))
        return (images[:, 1:] - images[:, :-1]).abs().mean(dim=(1, 2, 3, 4))

    clip_motion.modality = "video"

    def frame_brightness(images, prompts, metadata):
        seen["image"] = (tuple(images.shape), list(prompts), list(metadata))
        frames = torch.tensor([float(m.get("frame", -1)) for m in metadata])
        return {"score": images.mean(dim=(1, 2, 3)), "frame": frames}

    rewards = RewardSet({clip_motion: 1.0, frame_brightness: 2.0})
    meta = [{"seed": 7}, {"seed": 8}]
    total, parts = rewards(_videos(), ["a", "b"], meta)

    assert seen["video"] == ((2, 3, 3, 4, 5), ["a", "b"], meta)
    shape, prompts, metadata = seen["image"]
    assert shape == (6, 3, 4, 5) and prompts == ["a"] * 3 + ["b"] * 3
    assert metadata == [{"seed": s, "frame": k} for s in (7, 8) for k in range(3)]
    # by hand: brightness (0.1 + 0.2 + 0.6) / 3 = 0.3 and (1.0 + 0.0 + 0.5) / 3 = 0.5; frame index mean 1;
    # motion |0.2 - 0.1| + |0.6 - 0.2| = 0.5 -> 0.25 and 1.0 + 0.5 = 1.5 -> 0.75
    torch.testing.assert_close(parts["frame_brightness"], torch.tensor([0.3, 0.5]))
    torch.testing.assert_close(parts["frame_brightness.frame"], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(parts["clip_motion"], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(total, torch.tensor([0.25 + 2 * 0.3, 0.75 + 2 * 0.5]))

    # images [N, 3, H, W] reach an image reward unchanged
    images = torch.rand(2, 3, 4, 5)
    _, parts = RewardSet(frame_brightness)(images, ["a", "b"], [{}, {}])
    assert seen["image"][0] == (2, 3, 4, 5) and torch.equal(parts["frame_brightness"], images.mean(dim=(1, 2, 3)))


def test_rewards_refuse_wrong_ranks_naming_the_reward():
    def motion(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3, 4))

    motion.modality = "video"

    def bright(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))

    with pytest.raises(RewardError, match=r"reward 'motion' is a video reward.*\[N, F, 3, H, W\].*\(2, 3, 4, 5\)"):
        RewardSet(motion)(torch.rand(2, 3, 4, 5), ["a", "b"])
    for shape in [(2, 4, 5), (2, 1, 3, 3, 4, 5)]:
        with pytest.raises(RewardError, match=r"reward 'bright' scores images \[N, 3, H, W\] or videos") as err:
            RewardSet(bright)(torch.rand(*shape), ["a", "b"])
        assert err.value.reward == "bright"

    def nan_in_last_frame_of_video_1(images, prompts, metadata):
        scores = images.mean(dim=(1, 2, 3)).clone()
        scores[-1] = float("nan")
        return scores

    with pytest.raises(RewardError, match=r"NaN.*videos \[1\]") as err:
        RewardSet(nan_in_last_frame_of_video_1)(_videos(), ["a", "b"])
    assert err.value.indices == [1]


def test_grid_of_a_video_policy_shows_middle_frames(tmp_path):
    from genalign.grid import compute_grid, render_grid, write_html
    from genalign.sampling import Variant, sample_images

    policy = _policy(with_text_encoders=True)

    def brightness(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))

    rewards = RewardSet(brightness)
    data = compute_grid(policy, ["a cat"], [0, 1], [Variant("base")], num_steps=2, reward_set=rewards)
    videos = sample_images(policy, ["a cat"] * 2, [0, 1], 2)
    assert videos.shape == (2, FRAMES, 3, RES, RES)
    assert torch.equal(data.images[0], videos[:, FRAMES // 2])
    torch.testing.assert_close(data.scores["brightness"][0], videos.mean(dim=(1, 2, 3, 4)))  # all frames, averaged
    render_grid(data, str(tmp_path / "grid.png"))
    write_html(data, str(tmp_path / "grid.html"))
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "grid_files" / "r000_c00.png").is_file()


# ------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return tm.save_pipeline(tiny_wan(with_text_encoders=True), tmp_path_factory.mktemp("wan"))



def test_trains_one_epoch_and_lora_loads_in_diffusers(wan_dir, tmp_path, prompts_file):
    from diffusers import WanPipeline

    from genalign.plugins import policy_class

    assert policy_class(wan_dir) is WanPolicy  # picked from model_index.json
    out = tmp_path / "run"
    trainer, metrics = _train_one_epoch(wan_dir, out, prompts_file, **{
        "model.guidance_scale": 5.0, "model.height": RES, "model.width": RES, "sampling.step_kind": "sde",
        "model.options": f"{{num_frames: {FRAMES}}}",
        "sampling.noise_level": 0.7, "train.ema": False, "eval_prompts_file": prompts_file,
        "eval.num_per_prompt": 2})
    policy = trainer.policy
    assert isinstance(policy, WanPolicy) and policy.num_frames == FRAMES and policy.uses_cfg
    assert policy.pipe.text_encoder is not None
    # the per-frame image reward (brightness) was averaged per video; eval and the before/after grid ran
    assert 0.0 <= metrics["eval/reward"] <= 1.0
    assert (out / "before_after.png").is_file()

    # plain diffusers: the exported LoRA reproduces the trained transformer
    pipe = WanPipeline.from_pretrained(wan_dir)
    pipe.load_lora_weights(str(out / "final" / "lora"))
    cond = policy.encode(["a cat", "a red car"])
    x = policy.initial_latents(2, torch.Generator().manual_seed(0))
    kwargs = dict(hidden_states=x, timestep=torch.tensor([900.0, 400.0]), encoder_hidden_states=cond["prompt_embeds"],
                  return_dict=False)
    assert_diffusers_lora_matches(trainer, pipe, **kwargs)
