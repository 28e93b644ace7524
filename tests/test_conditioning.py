"""Per-prompt conditioning from prompt sets: negative prompts and condition images are read from ``.jsonl``
records (checked at load, kept out of the rewards' metadata except the condition image path), passed to the model
by the trainer, the sampling service and the evaluator, and refused (never ignored) by adapters that cannot take
them. The FLUX.1 Kontext adapter, which takes condition images, is tested in ``test_flux_kontext.py``."""

from __future__ import annotations

import json
import os

import pytest
import torch

from genalign.config import ConfigError, load_config
from genalign.policy import check_prompt_conditioning, conditioning_rows, encode_prompts, has_conditioning
from genalign.prompts import read_prompt_records, read_prompts
from genalign.trainer import Trainer

from .test_trainer import sd3_dir, tiny_overrides  # noqa: F401
from .tiny_kontext import write_png
from .tiny_models import TINY_RES, tiny_sd3



def write(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return str(path)


# ---------------------------------------------------------------------- prompt sets

def test_jsonl_conditioning_fields_are_parsed_and_kept_out_of_the_metadata(tmp_path):
    (tmp_path / "img").mkdir()
    a = write_png(tmp_path / "img" / "a.png", 16, 16)
    b = write_png(tmp_path / "b.png", 16, 32, seed=1)
    path = write(tmp_path / "p.jsonl", [
        {"prompt": "a cat", "target": 0.2, "negative_prompt": " blurry ", "metadata": {"tag": "x"}},
        {"prompt": "make it blue", "image": "img/a.png", "target": 0.5},
        {"prompt": "make it red", "condition_image": b, "negative_prompt": "ugly"},  # absolute path
        {"prompt": "add a hat", "images": ["./img/a.png"]},
        {"prompt": "add a tie", "condition_images": ["b.png"], "negative_prompt": "  "},  # blank: the default
        {"prompt": "a dog", "target": 0.8, "images": []},
    ])
    records = read_prompt_records(path)
    assert records == [
        {"prompt": "a cat", "metadata": {"target": 0.2, "tag": "x"}, "conditioning": {"negative_prompt": "blurry"}},
        {"prompt": "make it blue", "metadata": {"target": 0.5, "condition_image": a},
         "conditioning": {"images": [a]}},
        {"prompt": "make it red", "metadata": {"condition_image": b},
         "conditioning": {"negative_prompt": "ugly", "images": [b]}},
        {"prompt": "add a hat", "metadata": {"condition_image": a}, "conditioning": {"images": [a]}},
        {"prompt": "add a tie", "metadata": {"condition_image": b}, "conditioning": {"images": [b]}},
        {"prompt": "a dog", "metadata": {"target": 0.8}},
    ]
    assert all(os.path.isabs(p) for r in records for p in r.get("conditioning", {}).get("images", []))
    assert read_prompts(path)[:2] == ["a cat", "make it blue"]
    # records without conditioning fields are exactly what they were (no "conditioning" key)
    plain = write(tmp_path / "q.jsonl", [{"prompt": "a cat", "target": 0.2}])
    assert read_prompt_records(plain) == [{"prompt": "a cat", "metadata": {"target": 0.2}}]
    # metadata naming the same condition image is fine
    same = write(tmp_path / "s.jsonl", [{"prompt": "x", "image": "b.png", "metadata": {"condition_image": "b.png"}}])
    assert read_prompt_records(same)[0]["metadata"] == {"condition_image": b}


@pytest.mark.parametrize("line, error, match", [
    ({"prompt": "x", "image": "missing.png"}, FileNotFoundError,
     r"line 2: condition image '.*missing\.png' does not exist"),
    ({"prompt": "x", "images": ["a.png", "a.png"]}, ValueError,
     r"line 2: 'images' gives 2 condition images, but at most 1 per prompt"),
    ({"prompt": "x", "image": "a.png", "images": ["a.png"]}, ValueError,
     r"line 2: give the condition image\(s\) in one field"),
    ({"prompt": "x", "image": ["a.png"]}, ValueError, r"line 2: 'image' must be a path \(string\)"),
    ({"prompt": "x", "condition_images": "a.png"}, ValueError, r"line 2: 'condition_images' must be a list of paths"),
    ({"prompt": "x", "negative_prompt": 3}, ValueError, r"line 2: \"negative_prompt\" must be a string"),
    ({"prompt": "x", "image": "a.png", "metadata": {"condition_image": "other.png"}}, ValueError,
     r"line 2: metadata \"condition_image\" 'other.png' differs"),
])
def test_bad_conditioning_fields_name_the_file_and_line(tmp_path, line, error, match):
    write_png(tmp_path / "a.png", 16, 16)
    path = write(tmp_path / "p.jsonl", [{"prompt": "ok"}, line])
    with pytest.raises(error, match=match) as info:
        read_prompt_records(path)
    assert str(tmp_path / "p.jsonl") in str(info.value)


def test_more_images_per_prompt_when_allowed(tmp_path):
    a, b = write_png(tmp_path / "a.png", 16, 16), write_png(tmp_path / "b.png", 16, 16, seed=1)
    path = write(tmp_path / "p.jsonl", [{"prompt": "x", "images": ["a.png", "b.png"]}])
    assert read_prompt_records(path, max_images=2)[0]["conditioning"] == {"images": [a, b]}


# ---------------------------------------------------------------------- the policy protocol helpers

class OldAdapter:
    """An adapter written before per-prompt conditioning: ``encode(prompts)`` only."""

    def __init__(self):
        self.calls = []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return {"prompt_embeds": torch.zeros(len(prompts), 1)}


def test_encode_prompts_keeps_old_adapters_working_and_names_them_when_conditioning_is_given():
    policy = OldAdapter()
    assert encode_prompts(policy, ["a", "b"], [None, {}])["prompt_embeds"].shape == (2, 1)
    assert encode_prompts(policy, ["a"], None)["prompt_embeds"].shape == (1, 1)
    assert policy.calls == [["a", "b"], ["a"]]
    assert not has_conditioning([None, {}, {"images": []}]) and has_conditioning([None, {"negative_prompt": "x"}])
    with pytest.raises(ValueError, match=r"OldAdapter.encode takes no per-prompt conditioning, but prompt 1 \('b'\) "
                                         r"has \['negative_prompt'\]"):
        encode_prompts(policy, ["a", "b"], [None, {"negative_prompt": "x"}])
    with pytest.raises(ValueError, match="OldAdapter.encode takes no per-prompt conditioning"):
        check_prompt_conditioning(policy, ["a"], [{"images": ["x.png"]}])
    with pytest.raises(ValueError, match=r"conditioning of prompt 0 \('a'\) has unknown field\(s\) \['mask'\]"):
        conditioning_rows(["a"], [{"mask": 1}], "X")
    with pytest.raises(ValueError, match="one dict \\(or None\\) per prompt; got 1 for 2 prompts"):
        conditioning_rows(["a", "b"], [{}], "X")


def test_digits_and_llm_adapters_refuse_conditioning():
    from genalign.pipelines.digits import DigitsPolicy
    from genalign.pipelines.llm import CausalLMPolicy

    digits = DigitsPolicy.from_pretrained("digits", device="cpu", guidance_scale=2.0)
    assert digits.encode(["three"], [None])["prompt_embeds"].shape[0] == 1  # empty conditioning is fine
    with pytest.raises(ValueError, match=r"DigitsPolicy: prompt 1 \('four'\) has 'negative_prompt'.*the digits model "
                                         r"takes no per-prompt negative prompts"):
        digits.encode(["three", "four"], [None, {"negative_prompt": "five"}])
    with pytest.raises(ValueError, match=r"DigitsPolicy: prompt 0 \('three'\) has 'images'"):
        check_prompt_conditioning(digits, ["three"], [{"images": ["x.png"]}])
    llm = CausalLMPolicy.__new__(CausalLMPolicy)  # refused before the model is touched
    with pytest.raises(ValueError, match=r"CausalLMPolicy: prompt 0 \('2\+2='\) has 'negative_prompt'"):
        llm.generate(["2+2="], 4, conditioning=[{"negative_prompt": "no"}])


# ---------------------------------------------------------------------- SD3: per-prompt negative prompts

@pytest.fixture(scope="module")
def sd3_pipe():
    return tiny_sd3(with_text_encoders=True)


def _sd3(pipe, guidance_scale, **kw):
    from genalign.pipelines.sd3 import SD3Policy

    return SD3Policy(pipe, guidance_scale=guidance_scale, height=TINY_RES, width=TINY_RES, **kw)


@pytest.mark.parametrize("cache", [False, True])
def test_sd3_negative_prompts_replace_the_empty_negative_of_their_rows(sd3_pipe, cache):
    policy = _sd3(sd3_pipe, 3.0, cache_prompt_embeds=cache)
    prompts = ["a cat", "a dog", "a red car"]
    cond = policy.encode(prompts, [{"negative_prompt": "blurry"}, None, {"negative_prompt": "ugly, dark"}])
    plain = policy.encode(prompts)
    negatives = policy.encode(["blurry", "ugly, dark"])  # the negatives encoded as prompts, in one batch
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        neg = cond["negative_" + key]
        assert neg.shape == plain["negative_" + key].shape
        torch.testing.assert_close(cond[key], plain[key], rtol=0, atol=0)  # positives untouched
        torch.testing.assert_close(neg[[0, 2]], negatives[key], rtol=0, atol=0)
        torch.testing.assert_close(neg[1], plain["negative_" + key][1], rtol=0, atol=0)  # the empty prompt's
    # what diffusers' own encode_prompt gives for that negative prompt
    with torch.no_grad():
        _, npe, _, nppe = sd3_pipe.encode_prompt(prompt=["a cat"], prompt_2=None, prompt_3=None,
                                                 negative_prompt=["blurry"], do_classifier_free_guidance=True,
                                                 max_sequence_length=policy.max_sequence_length)
    torch.testing.assert_close(cond["negative_prompt_embeds"][:1], npe, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond["negative_pooled_prompt_embeds"][:1], nppe, rtol=1e-5, atol=1e-6)
    # the guided prediction of a row changes only where its negative changed
    x = policy.initial_latents(3, torch.Generator().manual_seed(0))
    t = torch.full((3,), 500.0)
    with torch.no_grad():
        out, base = policy.predict(x, t, cond), policy.predict(x, t, plain)
    torch.testing.assert_close(out[1], base[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[0], base[0])


def test_sd3_negative_prompt_with_cfg_off_is_an_error_naming_the_prompt(sd3_pipe):
    policy = _sd3(sd3_pipe, 1.0)
    assert not policy.uses_cfg
    with pytest.raises(ValueError, match=r"SD3Policy: prompt 1 \('a dog'\) has negative_prompt 'blurry', but "
                                         r"classifier-free guidance is off \(guidance_scale = 1 <= 1\)"):
        policy.encode(["a cat", "a dog"], [None, {"negative_prompt": "blurry"}])
    with pytest.raises(ValueError, match=r"SD3Policy does not take condition images, but prompt 0 \('a cat'\)"):
        _sd3(sd3_pipe, 3.0).encode(["a cat"], [{"images": ["/some/image.png"]}])


def test_sampling_service_and_evaluator_pass_each_prompt_s_conditioning(sd3_pipe):
    from genalign.evaluator import Evaluator
    from genalign.sampling import sample_images

    policy = _sd3(sd3_pipe, 3.0)
    seen = []
    encode = policy.encode
    policy.encode = lambda prompts, conditioning=None: seen.append((list(prompts), conditioning)) or encode(
        prompts, conditioning)
    rows = [{"negative_prompt": "blurry"}, None]
    kw = dict(num_steps=2, batch_size=2)
    with_neg = sample_images(policy, ["a cat", "a dog"], [0, 1], conditioning=rows, **kw)
    plain = sample_images(policy, ["a cat", "a dog"], [0, 1], **kw)
    assert seen[0] == (["a cat", "a dog"], rows) and seen[1] == (["a cat", "a dog"], None)
    torch.testing.assert_close(with_neg[1], plain[1], rtol=1e-5, atol=1e-5)  # row 1 had no negative prompt
    assert not torch.allclose(with_neg[0], plain[0])

    seen.clear()
    evaluator = Evaluator(["a cat", "a dog"], 2, seed=0, num_steps=2, batch_size=3,
                          reward_fn=lambda images, prompts, meta: (images.mean(dim=(1, 2, 3)), {}),
                          conditioning=[{"negative_prompt": "blurry"}, None])
    evaluator.score(policy)
    # prompt-major jobs: 2 images of 'a cat' (with its negative), then 2 of 'a dog', in batches of 3
    assert [p for p, _ in seen] == [["a cat", "a cat", "a dog"], ["a dog"]]
    assert seen[0][1] == [{"negative_prompt": "blurry"}] * 2 + [None]
    assert seen[1][1] is None  # nothing to pass: encode(prompts) as before


# ---------------------------------------------------------------------- the trainer

def test_trainer_passes_each_sample_s_negative_prompt_to_rollout_and_training(sd3_dir, tmp_path):  # noqa: F811
    path = write(tmp_path / "p.jsonl", [{"prompt": "a cat", "negative_prompt": "blurry"}, {"prompt": "a dog"},
                                        {"prompt": "a red car", "negative_prompt": "dark"}])
    trainer = Trainer(load_config(None, tiny_overrides(sd3_dir, tmp_path / "run", path)))
    assert trainer.policy.uses_cfg
    calls, encode = [], trainer.policy.encode

    def spy(prompts, conditioning=None):
        calls.append((list(prompts), conditioning))
        return encode(prompts, conditioning)

    trainer.policy.encode = spy
    traj, *_ = trainer.sample_epoch(0)
    wanted = {"a cat": {"negative_prompt": "blurry"}, "a dog": None, "a red car": {"negative_prompt": "dark"}}
    assert calls and all(c == wanted[p] for prompts, conds in calls for p, c in zip(prompts, conds))
    # every stored trajectory row carries the negative of its own prompt (what each training step reuses)
    empty = trainer.policy.encode([""])["prompt_embeds"][0]
    for i, prompt in enumerate(traj.prompts):
        neg = wanted[prompt]["negative_prompt"] if wanted[prompt] else None
        expected = trainer.policy.encode([neg])["prompt_embeds"][0] if neg else empty
        torch.testing.assert_close(traj.cond["negative_prompt_embeds"][i], expected, rtol=1e-5, atol=1e-6)


def test_trainer_refuses_a_negative_prompt_with_cfg_off_before_sampling(sd3_dir, tmp_path):  # noqa: F811
    path = write(tmp_path / "p.jsonl", [{"prompt": "a cat"}, {"prompt": "a dog", "negative_prompt": "blurry"}])
    with pytest.raises(ConfigError, match=r"prompts_file .*p\.jsonl.*SD3Policy: prompt 1 \('a dog'\) has "
                                          r"negative_prompt 'blurry', but classifier-free guidance is off"):
        Trainer(load_config(None, tiny_overrides(sd3_dir, tmp_path / "run", path, **{"model.guidance_scale": 1.0})))


def test_genalign_eval_passes_the_prompt_file_s_conditioning(tmp_path):
    from genalign.cli import build_parser, eval_settings

    path = write(tmp_path / "p.jsonl", [{"prompt": "a cat", "negative_prompt": "blurry"}, {"prompt": "a dog"}])
    args = build_parser().parse_args(["eval", "--prompts-file", path, "--rewards", "jpeg_compressibility",
                                      "--out", str(tmp_path / "o")])
    settings = eval_settings(args)
    assert settings["prompts"] == ["a cat", "a dog"]
    assert settings["conditioning"] == [{"negative_prompt": "blurry"}, None]
