"""Shipped real-model configs, the ``genalign config`` dry run, the eval-prompts rule, the ``prompts:`` prefix and
hub-id resolution (README "Real models"; batch arithmetic: the module docstring of genalign/config.py). Offline:
no model is loaded and the hub is never contacted (``hf_hub_download`` is monkeypatched)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest
import yaml

from genalign import cli, plugins
from genalign.config import ConfigError, load_config
from genalign.pipelines.digits import resolve_digits_dir
from genalign.policy import ModelNotAvailableError
from genalign.prompts import read_prompts

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
REAL = ["sd35m_pickscore", "sd35m_compositional", "sd35m_ocr", "sd35l_lora", "flux_dev", "flux_schnell",
        "sd15_aesthetic", "sdxl_compressibility", "flux2_klein_pickscore", "qwen_image_pickscore",
        "z_image_turbo_pickscore", "wan21_t2v_pickscore"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_every_real_config_is_shipped():
    assert {p.stem for p in CONFIGS} >= set(REAL)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_dry_run_of_every_shipped_config(path, capsys, monkeypatch, tmp_path):
    def no_model(*args, **kwargs):
        raise AssertionError("the dry run must not load a model")

    monkeypatch.setattr(plugins, "load_policy", no_model)
    monkeypatch.setattr(plugins, "policy_class", no_model)
    spec = yaml.safe_load(path.read_text())
    if "base" in spec:  # a benchmark spec (benchmarks/compare_digits.py): dry-run each of its method configs
        # a digits model the spec's header says to build (pretrain-digits): a stand-in, here as on a clean checkout
        model = next((o.split("=", 1)[1] for o in spec.get("overrides", []) if o.startswith("model.id=")), "digits")
        if model != "digits" and not os.path.isabs(model):
            monkeypatch.chdir(tmp_path)
            os.makedirs(model)
            shutil.copy(os.path.join(resolve_digits_dir("digits"), "policy.json"), model)
        for extra in spec["methods"].values():
            assert cli.main(["config", str(ROOT / spec["base"]), *spec.get("overrides", []), *extra]) == 0, extra
        return
    assert cli.main(["config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "samples per epoch" in out and "micro-batches per optimizer step" in out
    rows = [line for line in out.splitlines() if line.startswith(("# 1 |", "# 2 |", "# 4 |", "# 8 |"))]
    assert len(rows) == 4 and rows[0].startswith("# 1 | yes")
    cfg = load_config(str(path))
    if path.stem in REAL:  # ready to launch on 1 and 8 processes, evaluating on their own prompts
        assert all(" | yes | " in row for row in rows), rows
        assert cfg.model.id != "digits" and cfg.output_dir == f"runs/{path.stem}"
        assert cfg.prompts_file.startswith("prompts:") and cfg.eval_prompts_file.startswith("prompts:")
        assert "configs/accelerate/" in path.read_text()


def test_real_config_settings():
    c = load_config(str(ROOT / "configs/sd35m_pickscore.yaml"))
    assert (c.model.id, c.model.height, c.sampling.num_steps, c.sampling.noise_level) == (
        "stabilityai/stable-diffusion-3.5-medium", 512, 10, 0.7)
    assert 16 <= c.sampling.group_size <= 24 and c.reward == "pickscore"
    assert (c.train.kl_beta, c.train.kl_form, c.lora.rank, c.lora.alpha) == (0.01, "flow_grpo", 32, 64)
    f = load_config(str(ROOT / "configs/flux_dev.yaml"))
    assert (f.model.guidance_scale, f.sampling.noise_level, f.lora.rank, f.lora.alpha, f.model.dtype) == (
        3.5, 0.9, 64, 128, "bfloat16")
    s = load_config(str(ROOT / "configs/sd15_aesthetic.yaml"))
    assert (s.sampling.step_kind, s.sampling.noise_level, s.reward) == ("ddim", 1.0, "aesthetic")
    assert load_config(str(ROOT / "configs/sd35m_ocr.yaml")).reward == "ocr"
    assert all('"' in p for p in read_prompts("prompts:ocr_train.txt") + read_prompts("prompts:ocr_eval.txt"))


def test_dry_run_with_overrides_and_key_listing(capsys):
    assert cli.main(["config", str(ROOT / "configs/sd35m_pickscore.yaml"), "sampling.groups_per_epoch=6"]) == 0
    out = capsys.readouterr().out
    assert "groups_per_epoch: 6" in out and "6 groups x 24 images = 144 samples per epoch" in out
    assert cli.main(["config"]) == 0
    assert "sampling.batch_size = 32" in capsys.readouterr().out


def test_dry_run_marks_invalid_process_counts(capsys):
    assert cli.main(["config", str(ROOT / "configs/digits_flow_grpo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "# 1 | yes" in out and "# 8 | no: " in out and "use sampling.batch_size 16" in out


def test_dry_run_of_a_bad_batch_config_suggests_values(capsys):
    rc = cli.main(["config", str(ROOT / "configs/sd35m_pickscore.yaml"), "sampling.batch_size=7"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "sampling.batch_size" in err and "use sampling.batch_size 6 or 8" in err
    with pytest.raises(ConfigError, match="use train.batch_size 8 or 16"):
        load_config(None, ["train.batch_size=12"]).validate()
    with pytest.raises(ConfigError, match="use train.num_minibatches 2 or 4"):
        load_config(None, ["train.num_minibatches=3"]).validate()
    with pytest.raises(ConfigError, match="8 \\* 32; use sampling.batch_size 16$"):
        load_config(None, ["sampling.batch_size=32"]).validate(world_size=8)


def test_non_digits_model_with_digits_eval_prompts_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="eval_prompts_file"):
        load_config(None, ["model.id=stabilityai/stable-diffusion-3.5-medium"]).validate()
    load_config(None, ["model.id=stabilityai/stable-diffusion-3.5-medium", "eval_prompts_file=null"]).validate()
    load_config(None, ["model.id=stabilityai/stable-diffusion-3.5-medium",
                       "eval_prompts_file=prompts:pickscore_eval.txt"]).validate()
    load_config(None).validate()  # the digits model keeps its digits eval prompts
    (tmp_path / "policy.json").write_text("{}")  # a digits asset directory is the digits model too
    load_config(None, [f"model.id={tmp_path}"]).validate()


def test_prompts_prefix_resolves_shipped_sets():
    for task, (lo, hi) in {"pickscore": (60, 200), "compositional": (60, 200), "ocr": (60, 200),
                           "aesthetic": (60, 200), "compressibility": (60, 200)}.items():
        train, ev = read_prompts(f"prompts:{task}_train.txt"), read_prompts(f"prompts:{task}_eval.txt")
        assert lo <= len(train) <= hi and 20 <= len(ev) <= 40, task
        assert not set(train) & set(ev), task
    assert read_prompts("digits:prompts_eval.txt")  # the digits prefix still works
    with pytest.raises(FileNotFoundError, match="no_such_set.txt"):
        read_prompts("prompts:no_such_set.txt")


def test_uncached_hub_id_fetches_model_index_online(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import huggingface_hub

    def no_snapshot(repo_id, **kwargs):  # not cached: resolve_pretrained hands the id back unchanged
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        path = tmp_path / "model_index.json"
        path.write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    cls = plugins.policy_class("some-org/not-cached-yet")
    assert cls is plugins.pipeline_adapter("sd3")
    assert calls == [("some-org/not-cached-yet", "model_index.json")]


def test_uncached_hub_id_offline_names_what_to_fetch(monkeypatch):
    import huggingface_hub

    def offline_download(repo_id, filename, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline_download)
    with pytest.raises(ModelNotAvailableError, match="hf download some-org/missing"):
        plugins.hub_model_index("some-org/missing")
    with pytest.raises(ModelNotAvailableError, match="hf download some-org/missing"):
        plugins.policy_class("some-org/missing")
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online: the hub's reason is kept
    with pytest.raises(ValueError, match="cannot fetch model_index.json of hub model 'some-org/missing'"):
        plugins.hub_model_index("some-org/missing")
