"""Memory and speed options: ``model.drop_t5``, ``model.offload_text_encoders``, ``model.cache_prompt_embeds``,
``train.optimizer`` (``build_optimizer``) and the GPU smoke script's CPU refusal (tiny offline SD3)."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch

from . import tiny_models as tm
from genalign.config import ConfigError, load_config
from genalign.optim import build_optimizer
from genalign.pipelines.sd3 import SD3Policy
from genalign.rollout import recompute_log_probs, rollout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_TOKENS = 16  # the tiny CLIP tokenizer's model_max_length: SD3's prompt_embeds are [CLIP tokens; T5 tokens]
PROMPTS = ["a cat", "a dog"]


def _sd3_with_t5():
    pipe = tm.tiny_sd3(with_text_encoders=True)
    pipe.register_modules(text_encoder_3=tm.tiny_t5_encoder(d_model=2 * tm.CLIP_DIM), tokenizer_3=tm.tiny_t5_tokenizer())
    return pipe


@pytest.fixture(scope="module")
def sd3_t5_dir(tmp_path_factory):
    return tm.save_pipeline(_sd3_with_t5(), tmp_path_factory.mktemp("sd3t5"))


def test_drop_t5_skips_t5_and_zero_pads_consistently(sd3_t5_dir):
    full = SD3Policy.from_pretrained(sd3_t5_dir, device="cpu")
    dropped = SD3Policy.from_pretrained(sd3_t5_dir, device="cpu", drop_t5=True)
    assert full.pipe.text_encoder_3 is not None and dropped.pipe.text_encoder_3 is None
    a, b = full.encode(PROMPTS), dropped.encode(PROMPTS)
    assert a["prompt_embeds"].shape == b["prompt_embeds"].shape  # same token budget: diffusers pads T5 with zeros
    assert a["prompt_embeds"][:, CLIP_TOKENS:].abs().sum() > 0
    assert torch.equal(b["prompt_embeds"][:, CLIP_TOKENS:], torch.zeros_like(b["prompt_embeds"][:, CLIP_TOKENS:]))
    assert torch.equal(a["prompt_embeds"][:, :CLIP_TOKENS], b["prompt_embeds"][:, :CLIP_TOKENS])
    assert torch.equal(a["pooled_prompt_embeds"], b["pooled_prompt_embeds"])
    # rollout and training see the same conditioning: recomputed log-probs equal the rollout's exactly
    traj = rollout(dropped, b, PROMPTS, num_steps=3, noise_levels=0.7, step_kind="sde",
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(recompute_log_probs(dropped, traj, list(range(3))), traj.log_probs)
    # an in-memory pipeline too, and a re-encoding gives the identical conditioning
    built = SD3Policy(_sd3_with_t5(), drop_t5=True)
    assert built.pipe.text_encoder_3 is None
    assert all(torch.equal(built.encode(PROMPTS)[k], v) for k, v in b.items())


def test_drop_t5_refused_for_flux():
    from genalign.pipelines.flux import FluxPolicy

    with pytest.raises(ValueError, match="drop_t5"):
        FluxPolicy.from_pretrained("unused", drop_t5=True)


def test_offload_text_encoders_moves_them_only_while_encoding(sd3_t5_dir, monkeypatch):
    policy = SD3Policy.from_pretrained(sd3_t5_dir, device="cpu", offload_text_encoders=True)
    encoders = [policy.pipe.text_encoder, policy.pipe.text_encoder_2, policy.pipe.text_encoder_3]
    moves = []
    for i, module in enumerate(encoders):
        original = module.to
        monkeypatch.setattr(module, "to", lambda *a, _i=i, _o=original, **k: (moves.append((_i, str(a[0]))), _o(*a, **k))[1])
    calls = []
    encode = policy._encode
    monkeypatch.setattr(policy, "_encode", lambda *a, **k: (calls.append(list(moves)), encode(*a, **k))[1])
    cond = policy.encode(PROMPTS)
    # each encoding (the prompts, then the CFG negative) ran with every encoder moved to the device, and after it
    # every encoder went back to the CPU
    assert len(calls) == 2
    assert sorted(calls[0]) == [(i, "cpu") for i in range(3)]  # policy.device is the CPU here
    assert moves[-3:] == [(0, "cpu"), (1, "cpu"), (2, "cpu")] and len(moves) == 12
    plain = SD3Policy.from_pretrained(sd3_t5_dir, device="cpu")
    assert all(torch.equal(plain.encode(PROMPTS)[k], v) for k, v in cond.items())


def test_cache_prompt_embeds_encodes_each_prompt_once(sd3_t5_dir, monkeypatch):
    policy = SD3Policy.from_pretrained(sd3_t5_dir, device="cpu", cache_prompt_embeds=True)
    plain = SD3Policy.from_pretrained(sd3_t5_dir, device="cpu")
    encoded = []
    encode = policy._encode
    monkeypatch.setattr(policy, "_encode", lambda prompts, **k: (encoded.append(list(prompts)), encode(prompts, **k))[1])
    first = policy.encode(["a cat", "a dog", "a cat"])
    again = policy.encode(["a dog", "a red car", "a cat", "a dog"])
    assert encoded == [["a cat", "a dog"], [""], ["a red car"]]  # distinct prompts once; the negative once
    for prompts, cond in ((["a cat", "a dog", "a cat"], first), (["a dog", "a red car", "a cat", "a dog"], again)):
        ref = plain.encode(prompts)
        assert set(cond) == set(ref)
        for k in ref:
            torch.testing.assert_close(cond[k], ref[k], rtol=1e-5, atol=1e-5)
    assert torch.equal(first["prompt_embeds"][0], again["prompt_embeds"][2])  # a cached row is reused as is


def test_model_config_options_reach_the_policy_kwargs():
    cfg = load_config(None, ["model.drop_t5=true", "model.cache_prompt_embeds=true", "model.height=128"])
    assert cfg.model.policy_kwargs() == {"height": 128, "drop_t5": True, "cache_prompt_embeds": True}
    assert load_config(None, []).model.policy_kwargs() == {}


def test_eval_settings_take_the_run_s_model_options(tmp_path):
    from genalign.cli import build_parser, eval_settings

    path = tmp_path / "run.yaml"
    path.write_text("model: {id: some/sd3, drop_t5: true, offload_text_encoders: true, width: 128}\n"
                    "reward: jpeg_compressibility\nprompts_file: digits:prompts_eval.txt\n")
    args = build_parser().parse_args(["eval", "--config", str(path), "--prompt", "x", "--out", "o",
                                      "--height", "64", "--dtype", "bfloat16"])
    s = eval_settings(args)
    assert s["model_kwargs"] == {"width": 128, "height": 64, "drop_t5": True, "offload_text_encoders": True}
    assert s["dtype"] == "bfloat16"


def _train_cfg(**kw):
    return load_config(None, [f"train.{k}={v}" for k, v in kw.items()]).train


def test_build_optimizer_adamw_and_errors(monkeypatch):
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = build_optimizer(params, _train_cfg(lr=0.01, weight_decay=0.5, adam_eps=1e-6), "cpu")
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["eps"], group["betas"]) == (0.01, 0.5, 1e-6, (0.9, 0.999))
    with pytest.raises(ConfigError, match="adamw, adamw8bit|'adamw', 'adamw8bit'"):
        build_optimizer(params, _train_cfg(optimizer="sgd"), "cpu")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, installed or not
    with pytest.raises(ConfigError, match=r"genalign\[bnb\]"):
        build_optimizer(params, _train_cfg(optimizer="adamw8bit"), "cpu")


def test_build_optimizer_adamw8bit_uses_bitsandbytes(monkeypatch):
    made = {}

    class FakeAdamW8bit(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            made.update(kwargs)
            super().__init__(params, **kwargs)

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=FakeAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], _train_cfg(optimizer="adamw8bit", lr=0.002), "cpu")
    assert isinstance(opt, FakeAdamW8bit)
    assert made == {"lr": 0.002, "betas": (0.9, 0.999), "weight_decay": 1e-4, "eps": 1e-8}


def test_trainer_builds_its_optimizer_with_build_optimizer(tmp_path, monkeypatch):
    from genalign.trainer import Trainer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    prompts = tmp_path / "p.txt"
    prompts.write_text("the digit 3\n")
    cfg = load_config(None, ["train.optimizer=adamw8bit", f"output_dir={tmp_path / 'run'}",
                             f"prompts_file={prompts}", "eval_prompts_file=null"])
    with pytest.raises(ConfigError, match=r"genalign\[bnb\]"):
        Trainer(cfg)


def test_gpu_smoke_refuses_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "gpu_smoke.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_smoke.py"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "CUDA" in proc.stderr and not out.exists()
