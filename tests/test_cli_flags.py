"""``genalign sample`` / ``grid`` / ``eval`` flags: --height, --width, --dtype, --reward-options, and the base model
read from a LoRA's ``base_model.json`` when --model is omitted (tiny offline Flux pipeline)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from . import tiny_models as tm
from genalign import reward_api, sampling
from genalign.cli import main
from genalign.lora import add_lora, save_lora

H, W = 96, 64  # not the tiny model's size (its default would be 1024 px): the flags must reach the policy


@pytest.fixture(scope="module")
def flux_lora(tmp_path_factory):
    """``(model dir, LoRA dir)``: a tiny Flux pipeline with text encoders and a non-trivial LoRA saved on it."""
    from genalign.pipelines.flux import FluxPolicy

    root = tmp_path_factory.mktemp("flux")
    model = tm.save_pipeline(tm.tiny_flux(with_text_encoders=True), root / "model")
    policy = FluxPolicy.from_pretrained(model, device="cpu", height=tm.TINY_RES, width=tm.TINY_RES)
    add_lora(policy.denoiser(), rank=2, alpha=4, target_modules=policy.lora_target_modules)
    tm.randomize_lora(policy.denoiser(), 0.05)
    lora = str(root / "run" / "final" / "lora")
    save_lora(policy, lora, model)
    return model, lora


@pytest.fixture
def loaded(monkeypatch):
    """Records every policy ``load_policy_with_loras`` returns (and the model id it was given)."""
    seen = []
    original = sampling.load_policy_with_loras

    def spy(model, loras=(), *args, **kwargs):
        policy, names = original(model, loras, *args, **kwargs)
        seen.append((sampling.resolve_model(model, loras), policy))
        return policy, names

    for module in ("genalign.sampling", "genalign.grid", "genalign.evaluate"):
        monkeypatch.setattr(f"{module}.load_policy_with_loras", spy)
    return seen


def _check_policy(seen, model):
    (resolved, policy), = seen
    assert resolved == model  # read from base_model.json
    assert (policy.height, policy.width) == (H, W)
    assert policy.dtype == torch.bfloat16
    lora = [p for n, p in policy.denoiser().named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # the LoRA stays float32 as in training


FLAGS = ["--prompt", "a cat", "--steps", "2", "--height", str(H), "--width", str(W), "--dtype", "bfloat16"]


def test_sample_flags_reach_the_policy_and_base_model_comes_from_the_lora(flux_lora, loaded, tmp_path):
    model, lora = flux_lora
    assert main(["sample", "--lora", lora, "--num-per-prompt", "2", "--out", str(tmp_path / "s"), *FLAGS]) == 0
    _check_policy(loaded, model)
    with Image.open(tmp_path / "s" / "00000.png") as im:
        assert im.size == (W, H)


def test_grid_flags_and_reward_options(flux_lora, loaded, tmp_path, monkeypatch):
    model, lora = flux_lora
    calls = []
    original = reward_api.load_reward

    def record(spec, **kwargs):
        calls.append((spec, kwargs))
        return original(spec, **kwargs)

    monkeypatch.setattr(reward_api, "load_reward", record)
    out = str(tmp_path / "grid.png")
    assert main(["grid", "--lora", lora, "--rewards", "jpeg_compressibility", "--out", out,
                 "--reward-options", '{"jpeg_compressibility": {"quality": 50}}', *FLAGS]) == 0
    _check_policy(loaded, model)
    assert calls == [("jpeg_compressibility", {"default_device": "cpu", "quality": 50})]
    with Image.open(os.path.join(str(tmp_path), "grid_files", "r000_c00.png")) as im:
        assert im.size == (W, H)


def test_eval_flags_and_reward_options(flux_lora, loaded, tmp_path, monkeypatch):
    model, lora = flux_lora
    calls = []
    original = reward_api.load_reward
    monkeypatch.setattr(reward_api, "load_reward", lambda spec, **kw: calls.append(kw) or original(spec, **kw))
    out = str(tmp_path / "eval")
    assert main(["eval", "--lora", lora, "--baseline", "base", "--rewards", "jpeg_compressibility",
                 "--num-per-prompt", "2", "--reward-options", '{"jpeg_compressibility": {"quality": 50}}',
                 "--guidance-scale", "2.5", "--out", out, *FLAGS]) == 0
    _check_policy(loaded, model)
    assert calls == [{"default_device": "cpu", "quality": 50}]
    with open(os.path.join(out, "eval.json")) as fh:
        result = json.load(fh)
    assert result["model"] == model and result["num_samples"] == 2 and result["guidance_scale"] == 2.5


def test_missing_base_model_json_is_named(flux_lora, tmp_path, capsys):
    import shutil

    _, lora = flux_lora
    copy = str(tmp_path / "lora")
    shutil.copytree(lora, copy)
    os.remove(os.path.join(copy, "base_model.json"))
    assert main(["sample", "--lora", copy, "--out", str(tmp_path / "s"), *FLAGS]) == 2
    err = capsys.readouterr().err
    assert os.path.join(copy, "base_model.json") in err and "--model" in err


def test_bad_reward_options_json_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["grid", "--prompt", "x", "--out", "g.png", "--reward-options", "{not json"])
    assert "--reward-options" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["pretrain-digits", "--out", "X", "--generator-steps", "5"],
                                  ["pretrain-digits", "--", "--out", "X", "--generator-steps", "5"]])
def test_pretrain_digits_passes_its_options_through_with_or_without_double_dash(argv, monkeypatch):
    import genalign.plugins
    from genalign.cli import main

    seen = []
    monkeypatch.setattr(genalign.plugins, "load_command", lambda name: lambda rest: seen.append(rest) or 0)
    assert main(argv) == 0
    assert seen == [["--out", "X", "--generator-steps", "5"]]
