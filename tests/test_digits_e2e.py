"""End to end (slow): the default run aligns the shipped digits model (`genalign train configs/digits.yaml`)."""

from pathlib import Path

import pytest

from genalign.config import load_config
from genalign.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"


@pytest.mark.slow
def test_default_digits_run_raises_prompt_accuracy(tmp_path):
    cfg = load_config(str(CONFIG), [f"output_dir={tmp_path / 'run'}", "eval.every=0"])
    metrics = Trainer(cfg).train()
    rows = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    import json

    base = json.loads(rows[0])["eval/digit_correct.accuracy"]
    final = metrics["eval/digit_correct.accuracy"]
    assert 0.4 <= base <= 0.8
    # the measured run reaches >= 0.95 (README); the regression guard leaves room for seed noise
    assert final >= 0.9 and final >= base + 0.25, (base, final)
    assert (tmp_path / "run" / "final" / "lora" / "pytorch_lora_weights.safetensors").exists() or \
        (tmp_path / "run" / "final" / "lora" / "adapter_model.safetensors").exists()
    assert (tmp_path / "run" / "before_after.png").is_file()
