"""The bad-input matrix items not covered next to their feature's tests: each gets a clear message."""

import re
import subprocess
from pathlib import Path

import pytest

from genalign.config import ConfigError, load_config
from genalign.lora import add_lora, load_lora, save_lora
from genalign.pipelines import load_policy
from genalign.policy import ModelNotAvailableError

from .tiny_models import save_pipeline, tiny_sd3

ROOT = Path(__file__).resolve().parents[1]


def test_lora_from_another_base_model_is_refused(tmp_path):
    digits = load_policy("digits", device="cpu")
    add_lora(digits.denoiser(), rank=2, alpha=2, target_modules=digits.lora_target_modules)
    save_lora(digits, str(tmp_path / "lora"), "digits")
    sd3 = load_policy(save_pipeline(tiny_sd3(), tmp_path / "sd3"), device="cpu")
    with pytest.raises(ValueError, match="trained on base model 'digits'.*does not match"):
        load_lora(sd3, str(tmp_path / "lora"))


def test_missing_lora_path_lists_where_it_looked(tmp_path):
    digits = load_policy("digits", device="cpu")
    with pytest.raises(FileNotFoundError, match="no LoRA found.*final/lora/.*denoiser.safetensors"):
        load_lora(digits, str(tmp_path))


def test_digits_prompt_too_long_names_the_prompt():
    digits = load_policy("digits", device="cpu")
    with pytest.raises(ValueError, match="has 8 words; the digits encoder takes at most"):
        digits.encode(["the the the the the the the seven"])


def test_out_of_range_noise_level_and_fractions_name_the_key():
    with pytest.raises(ConfigError, match="sampling.noise_level"):
        load_config(None, ["sampling.noise_level=-0.5"]).validate()
    with pytest.raises(ConfigError, match="sampling.noise_level"):
        load_config(None, ["sampling.step_kind=cps", "sampling.noise_level=1.5"]).validate()
    with pytest.raises(ConfigError, match="train.timestep_fraction"):
        load_config(None, ["train.timestep_fraction=0"]).validate()
    with pytest.raises(ConfigError, match="model.dtype"):
        load_config(None, ["model.dtype=float8"]).validate()


def test_unavailable_model_id_offline_says_how_to_fetch(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="hf download some-org/missing-model"):
        load_policy("some-org/missing-model")
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        load_policy("./no/such/dir")


def test_every_torch_load_is_weights_only():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    offenders = []
    for name in files:
        for i, line in enumerate((ROOT / name).read_text().splitlines(), 1):
            if re.search(r"torch\.load\(", line) and "weights_only=True" not in line and not line.lstrip().startswith(
                    ("#", '"', "'")) and "``" not in line:
                offenders.append(f"{name}:{i}")
    assert not offenders, offenders
