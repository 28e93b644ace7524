"""The FLUX.1 Kontext adapter (arXiv 2506.15742) on a tiny offline ``FluxKontextPipeline``: condition images read
from PNG files give the velocity, ODE samples and condition latents diffusers' pipeline computes (fixed and
preferred condition sizes, true CFG with a negative prompt, prompts without an image); SDE log-probs recompute
exactly; one epoch of the real trainer on a ``.jsonl`` prompt set with condition images learns, and its LoRA loads
in plain diffusers."""

from __future__ import annotations

import json

import pytest
import torch

from genalign.config import load_config
from genalign.rollout import recompute_log_probs, rollout
from genalign.trainer import Trainer

from .test_train_models import _train_one_epoch
from .test_trainer import tiny_overrides  # noqa: F401
from .tiny_kontext import tiny_kontext, write_png
from .tiny_models import TINY_RES, save_pipeline



@pytest.fixture(scope="module")
def pipe():
    return tiny_kontext()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Condition images as PNG files: 48x80 (wide), 64x64 and 80x48 (tall) pixels."""
    folder = tmp_path_factory.mktemp("cond")
    return [write_png(folder / f"c{i}.png", h, w, seed=i) for i, (h, w) in enumerate([(48, 80), (64, 64), (80, 48)])]


def _policy(pipe, **kw):
    from genalign.pipelines.flux_kontext import FluxKontextPolicy

    return FluxKontextPolicy(pipe, height=TINY_RES, width=TINY_RES, **kw)


def _pipeline_latents(pipe, image_path, prompt, steps, latents, **kw):
    """``FluxKontextPipeline`` ODE samples (packed latents) for one prompt, from the initial ``latents``."""
    from PIL import Image

    image = Image.open(image_path) if image_path else None
    with torch.no_grad():
        return pipe(image=image, prompt=prompt, height=TINY_RES, width=TINY_RES, max_area=TINY_RES ** 2,
                    num_inference_steps=steps, output_type="latent", latents=latents.clone(), **kw).images


class CaptureVelocity:
    """Records the noisy-token output of every transformer call of the pipeline (what it steps with)."""

    def __init__(self, transformer, tokens):
        self.outputs, self.tokens = [], tokens
        self.handle = transformer.register_forward_hook(lambda m, args, out: self.outputs.append(
            out[0][:, :self.tokens].detach().clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_condition_latents_and_ids_are_the_pipeline_s(pipe, images):
    from PIL import Image

    policy = _policy(pipe, condition_size=(48, 80))
    cond = policy.encode(["make it blue"], [{"images": [images[0]]}])
    assert cond["image_grid"].tolist() == [[3, 5]] and cond["image_latents"].shape == (1, 15, 16)
    again = policy.encode(["make it blue"], [{"images": [images[0]]}])
    assert torch.equal(cond["image_latents"], again["image_latents"])  # deterministic: the latent mode
    # diffusers' own preparation of the same image (resize, preprocess, VAE mode, shift/scale, pack, ids)
    pixels = pipe.image_processor.preprocess(pipe.image_processor.resize(Image.open(images[0]), 48, 80), 48, 80)
    _, image_latents, _, image_ids = pipe.prepare_latents(pixels, 1, 4, TINY_RES, TINY_RES, torch.float32, "cpu",
                                                          torch.Generator().manual_seed(0))
    torch.testing.assert_close(cond["image_latents"], image_latents, rtol=0, atol=0)
    torch.testing.assert_close(policy._condition_ids(3, 5, torch.float32), image_ids, rtol=0, atol=0)
    assert (image_ids[:, 0] == 1).all()
    # cache_prompt_embeds: each condition image is encoded once (kept on the CPU), with the same latents
    cached = _policy(pipe, condition_size=(48, 80), cache_prompt_embeds=True)
    first = cached.encode(["make it blue"], [{"images": [images[0]]}])
    assert len(cached._image_cache) == 1
    second = cached.encode(["make it red"], [{"images": [images[0]]}])
    assert len(cached._image_cache) == 1
    assert torch.equal(first["image_latents"], cond["image_latents"])
    assert torch.equal(second["image_latents"], cond["image_latents"])


def test_bfloat16_policy_keeps_the_condition_latents_in_the_model_dtype(images):
    policy = _policy(tiny_kontext(), condition_size=(32, 32), dtype=torch.bfloat16)
    cond = policy.encode(["make it blue", "a cat"], [{"images": [images[0]]}, None])
    assert cond["image_latents"].dtype == torch.bfloat16 and cond["image_grid"].dtype == torch.long
    x = policy.initial_latents(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = policy.predict(x, torch.tensor([900.0, 400.0]), cond)
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.isfinite(out).all()


def test_velocity_and_ode_samples_equal_the_pipeline_s(pipe, images):
    policy = _policy(pipe, condition_size=(48, 80))  # the image's own size: the pipeline's _auto_resize=False
    x0 = policy.initial_latents(1, torch.Generator().manual_seed(0))
    cond = policy.encode(["make it blue"], [{"images": [images[0]]}])
    with CaptureVelocity(pipe.transformer, x0.shape[1]) as cap:
        theirs = _pipeline_latents(pipe, images[0], "make it blue", 2, x0, _auto_resize=False)
    timesteps, _ = policy.schedule(2)
    with torch.no_grad():
        ours_v = policy.predict(x0, timesteps[:1], cond)
    torch.testing.assert_close(ours_v, cap.outputs[0], rtol=1e-5, atol=1e-6)  # the first step's velocity
    traj = rollout(policy, cond, ["make it blue"], 2, 0.0, "sde", latents=x0)
    torch.testing.assert_close(traj.final, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(traj.final, rollout(policy, policy.encode(["make it blue"]), ["make it blue"], 2, 0.0,
                                                  "sde", latents=x0).final)  # the image matters


def test_preferred_resolution_by_default_as_the_pipeline(pipe, images):
    policy = _policy(pipe)  # condition_size None: the preferred Kontext resolution nearest the aspect ratio
    x0 = policy.initial_latents(1, torch.Generator().manual_seed(1))
    cond = policy.encode(["make it blue"], [{"images": [images[0]]}])
    assert cond["image_grid"].tolist() == [[800 // 16, 1328 // 16]]  # 48x80 -> 800x1328 (aspect 5:3)
    assert cond["image_latents"].shape[1] == policy.max_condition_tokens >= 50 * 83
    traj = rollout(policy, cond, ["make it blue"], 1, 0.0, "sde", latents=x0)
    torch.testing.assert_close(traj.final, _pipeline_latents(pipe, images[0], "make it blue", 1, x0),
                               rtol=1e-5, atol=1e-5)


def test_true_cfg_with_a_negative_prompt_equals_the_pipeline(pipe, images):
    policy = _policy(pipe, condition_size=(64, 64), true_cfg_scale=2.0)
    x0 = policy.initial_latents(1, torch.Generator().manual_seed(2))
    cond = policy.encode(["add a hat"], [{"images": [images[1]], "negative_prompt": "blurry"}])
    traj = rollout(policy, cond, ["add a hat"], 2, 0.0, "sde", latents=x0)
    theirs = _pipeline_latents(pipe, images[1], "add a hat", 2, x0, negative_prompt="blurry", true_cfg_scale=2.0,
                               _auto_resize=False)
    torch.testing.assert_close(traj.final, theirs, rtol=1e-5, atol=1e-5)


def test_prompts_without_image_are_text_to_image_and_batches_mix_sizes(pipe, images):
    policy = _policy(pipe, condition_size=(48, 80))
    prompts = ["make it blue", "a cat", "add a hat"]
    rows = [{"images": [images[0]]}, None, {"images": [images[2]]}]
    x0 = policy.initial_latents(3, torch.Generator().manual_seed(3))
    cond = policy.encode(prompts, rows)
    assert cond["image_grid"].tolist() == [[3, 5], [0, 0], [3, 5]]
    assert not cond["image_latents"][1].any()  # padding only
    traj = rollout(policy, cond, prompts, 2, 0.0, "sde", latents=x0)
    torch.testing.assert_close(traj.final[1:2], _pipeline_latents(pipe, None, "a cat", 2, x0[1:2]),
                               rtol=1e-5, atol=1e-5)  # the pipeline with image=None
    for i in (0, 2):  # each row as if alone
        alone = rollout(policy, policy.encode(prompts[i:i + 1], rows[i:i + 1]), prompts[i:i + 1], 2, 0.0, "sde",
                        latents=x0[i:i + 1])
        torch.testing.assert_close(traj.final[i:i + 1], alone.final, rtol=1e-5, atol=1e-5)
    # preferred sizes: a wide and a tall image give different grids in one batch (one call per size)
    pref = _policy(pipe)
    grid = pref.encode(prompts[:1] * 2, [{"images": [images[0]]}, {"images": [images[2]]}])["image_grid"]
    assert grid.tolist() == [[50, 83], [83, 50]]


def test_sde_log_probs_recompute_exactly(pipe, images):
    policy = _policy(pipe, condition_size=(32, 32), true_cfg_scale=1.5)
    prompts = ["make it blue", "a cat", "add a hat", "make it red"]
    rows = [{"images": [images[0]]}, {"negative_prompt": "dark"}, {"images": [images[1]]},
            {"images": [images[2]], "negative_prompt": "blurry"}]
    cond = policy.encode(prompts, rows)
    traj = rollout(policy, cond, prompts, 3, 0.7, "sde", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        recomputed = recompute_log_probs(policy, traj, [0, 1, 2])
    torch.testing.assert_close(recomputed, traj.log_probs, rtol=0, atol=0)
    # a sub-batch recomputes its rows' log-probs too (training minibatches regroup rows)
    with torch.no_grad():
        sub = recompute_log_probs(policy, traj.select([3, 1]), [0, 1, 2])
    torch.testing.assert_close(sub, traj.log_probs[[3, 1]], rtol=1e-6, atol=1e-6)


def test_errors_name_the_adapter_prompt_and_file(pipe, images, tmp_path):
    from genalign.pipelines.flux_kontext import FluxKontextPolicy

    policy = _policy(pipe, condition_size=32)
    assert policy.condition_size == (32, 32)
    with pytest.raises(ValueError, match=r"FluxKontextPolicy takes at most 1 condition image\(s\) per prompt, but "
                                         r"prompt 1 \('b'\) has 2"):
        policy.encode(["a", "b"], [None, {"images": images[:2]}])
    bad = tmp_path / "not_an_image.png"
    bad.write_text("no pixels")
    with pytest.raises(ValueError, match=r"FluxKontextPolicy: prompt 0 \('a'\): cannot read condition image "
                                         r"'.*not_an_image\.png'"):
        policy.encode(["a"], [{"images": [str(bad)]}])
    with pytest.raises(ValueError, match=r"FluxKontextPolicy: prompt 0 \('a'\) has negative_prompt 'x', but "
                                         r"classifier-free guidance is off \(true_cfg_scale = 1 <= 1\)"):
        policy.encode(["a"], [{"negative_prompt": "x"}])
    with pytest.raises(ValueError, match="condition_size must be an int or \\[height, width\\], positive multiples "
                                         "of 16"):
        FluxKontextPolicy(pipe, height=TINY_RES, width=TINY_RES, condition_size=(40, 64))


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory):
    return save_pipeline(tiny_kontext(), tmp_path_factory.mktemp("kontext"))


def test_one_epoch_on_a_prompt_set_with_condition_images_and_lora_loads_in_diffusers(kontext_dir, tmp_path):
    from diffusers import FluxKontextPipeline

    from genalign.pipelines.flux_kontext import FluxKontextPolicy

    (tmp_path / "cond").mkdir()
    for i, (h, w) in enumerate([(48, 80), (64, 64), (80, 48)]):
        write_png(tmp_path / "cond" / f"{i}.png", h, w, seed=10 + i)
    records = [{"prompt": "make it blue", "image": "cond/0.png", "target": 0.3},
               {"prompt": "add a hat", "condition_image": "cond/1.png"},
               {"prompt": "make it red", "images": ["cond/2.png"]},
               {"prompt": "a cat"}]  # no image: text-to-image rows in the same batches
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "run"
    extra = {"model.guidance_scale": 3.5, "model.height": TINY_RES, "model.width": TINY_RES,
             "model.condition_size": 32, "sampling.step_kind": "sde", "sampling.noise_level": 0.7,
             "train.ema": False}
    cfg = load_config(None, tiny_overrides(kontext_dir, out, str(path), **extra))
    assert cfg.model.policy_kwargs()["condition_size"] == 32

    seen = []  # what reaches the model and the rewards

    def spying(trainer):
        encode = trainer.policy.encode
        trainer.policy.encode = lambda prompts, conditioning=None: seen.append((list(prompts), conditioning)) or \
            encode(prompts, conditioning)
        name, fn, weight = trainer.reward_fn.components[0]

        def reward(images, prompts, metadata):
            seen.append(("reward", list(prompts), [m.get("condition_image") for m in metadata]))
            return fn(images=images, prompts=prompts, metadata=metadata)

        trainer.reward_fn.components[0] = (name, reward, weight)

    original_init = Trainer.__init__

    def init(self, *a, **kw):
        original_init(self, *a, **kw)
        spying(self)

    Trainer.__init__ = init
    try:
        trainer, metrics = _train_one_epoch(kontext_dir, out, str(path), **extra)
    finally:
        Trainer.__init__ = original_init
    policy = trainer.policy
    assert isinstance(policy, FluxKontextPolicy) and policy.condition_size == (32, 32)
    image_of = {r["prompt"]: str(tmp_path / "cond" / f"{i}.png") if i < 3 else None for i, r in enumerate(records)}
    encodes = [s for s in seen if s[0] != "reward"]
    assert encodes and all((c or {}).get("images", [None])[0] == image_of[p] if c else image_of[p] is None
                           for prompts, conds in encodes for p, c in zip(prompts, conds or [None] * len(prompts)))
    scored = [s for s in seen if s[0] == "reward"]
    assert scored and all(ci == image_of[p] for _, prompts, cis in scored for p, ci in zip(prompts, cis))

    # plain diffusers: the exported LoRA reproduces the trained transformer, condition tokens included
    plain = FluxKontextPipeline.from_pretrained(kontext_dir)
    plain.load_lora_weights(str(out / "final" / "lora"))
    loaded = FluxKontextPolicy(plain, height=TINY_RES, width=TINY_RES, condition_size=32)
    prompts = ["make it blue", "a cat"]
    rows = [{"images": [image_of["make it blue"]]}, None]
    x = policy.initial_latents(2, torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 400.0])
    with torch.no_grad():
        ours = policy.predict(x, t, policy.encode(prompts, rows))
        theirs = loaded.predict(x, t, loaded.encode(prompts, rows))
        plain.disable_lora()
        base = loaded.predict(x, t, loaded.encode(prompts, rows))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base, theirs)
