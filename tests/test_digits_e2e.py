"""End to end (slow). The default run (`genalign train configs/digits.yaml`) aligns the shipped `digits_wide` model
without collapse, judged by the independent judge; Flow-GRPO with a KL on the small model
(`configs/digits_flow_grpo.yaml`) reaches the reward by collapsing, and the hacking checks flag it."""

import json
from pathlib import Path

import pytest

from genalign.config import load_config
from genalign.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KEY = "eval/digit_correct.accuracy"


# The default run's bounds on its own final evaluation (1,000 images, 40 ODE steps, EMA weights). Realism and
# diversity: the alignment target itself (FD within 10% of the base's, diversity ratio >= 0.90). Accuracy: the target
# is 0.97, which the default does not reach yet (README, "The default run": 0.962 over 3 seeds judged on 2,000 images,
# 0.965-0.971 on the runs' own final evaluations), so the guard is what it does reach, with room for seed noise.
ACCURACY, FD_RISE, DIVERSITY = 0.95, 1.10, 0.90


@pytest.mark.slow
def test_default_run_aligns_without_collapse(tmp_path):
    """Accuracy far above the base's while realism and diversity stay within the target's bounds at the end, and the
    hacking checks do not flag the final evaluation."""
    out = tmp_path / "run"
    metrics = Trainer(load_config(str(CONFIGS / "digits.yaml"), [f"output_dir={out}"])).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if KEY in r]
    base = evals[0]
    assert 0.4 <= base[KEY] <= 0.7 and 0.08 <= base["eval/fd_independent"] <= 0.14, base
    final = evals[-1]
    assert final[KEY] >= ACCURACY, final
    assert final["eval/fd_independent"] <= FD_RISE * base["eval/fd_independent"], (base, final)
    assert final["eval/diversity_ratio"] >= DIVERSITY, final
    assert metrics["hacking/flag"] == 0.0  # the final evaluation is within the hacking checks' bounds
    assert metrics["anchor/units"] > 0
    # the evaluated (EMA) weights are exported with their base model's id, loadable by sample / grid / eval
    from genalign.sampling import base_model_of

    assert base_model_of(str(out / "final" / "denoiser_ema.safetensors")) == "digits_wide"
    assert (out / "before_after.png").is_file()


@pytest.mark.slow
def test_flow_grpo_run_raises_prompt_accuracy_and_is_judged(tmp_path):
    cfg = load_config(str(CONFIGS / "digits_flow_grpo.yaml"), [f"output_dir={tmp_path / 'run'}"])
    metrics = Trainer(cfg).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    base, final = first["eval/digit_correct.accuracy"], metrics["eval/digit_correct.accuracy"]
    assert 0.4 <= base <= 0.8
    # measured over 3 seeds (README, "Flow-GRPO on the small model"): 0.97-0.98; the guard leaves room for seed noise
    assert final >= 0.93 and final >= base + 0.3, (base, final)
    # the independent judge (pixel PCA, real held-out digits): base near 0.17 / 1.05; the run pays in realism
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
