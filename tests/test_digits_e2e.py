"""End to end (slow): the default run aligns the shipped digits model (`genalign train configs/digits.yaml`), and
the independent judge and the hacking checks see what it costs."""

import json
from pathlib import Path

import pytest

from genalign.config import load_config
from genalign.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"


@pytest.mark.slow
def test_default_digits_run_raises_prompt_accuracy_and_is_judged(tmp_path):
    cfg = load_config(str(CONFIG), [f"output_dir={tmp_path / 'run'}"])
    metrics = Trainer(cfg).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    base, final = first["eval/digit_correct.accuracy"], metrics["eval/digit_correct.accuracy"]
    assert 0.4 <= base <= 0.8
    # measured over 3 seeds (README, "The default run"): 0.97-0.98; the guard leaves room for seed noise
    assert final >= 0.93 and final >= base + 0.3, (base, final)
    # the independent judge (pixel PCA, real held-out digits): base near 0.17 / 1.05; the default pays in realism
    # and diversity (README: FD about 1.6x, diversity ratio about 0.72), which these bounds pin down from both sides
    fd0, div0 = first["eval/fd_independent"], first["eval/diversity_ratio"]
    fd, div = metrics["eval/fd_independent"], metrics["eval/diversity_ratio"]
    assert 0.12 <= fd0 <= 0.22 and 0.95 <= div0 <= 1.15, (fd0, div0)
    assert 1.1 * fd0 < fd < 2.5 * fd0 and 0.6 < div < 0.9, (fd, div)
    # the hacking checks flag that and keep the best unflagged weights
    assert metrics["hacking/flag"] == 1.0
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert best["eval/fd_independent"] <= 1.1 * fd0 and best["eval/digit_correct.accuracy"] > base
    assert (tmp_path / "run" / "best" / "lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "final" / "lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "before_after.png").is_file()
