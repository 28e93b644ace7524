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
# is 0.97, which the default reaches when judged on 2,000 images (README, "The default run": 0.972 over 3 seeds,
# 0.971-0.979 on the runs' own final evaluations); the guard leaves room for seed noise on 1,000 images.
ACCURACY, FD_RISE, DIVERSITY = 0.965, 1.10, 0.90


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


def _load_e2e_benchmark():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "digits_e2e.py"
    spec = importlib.util.spec_from_file_location("digits_e2e_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_e2e_benchmark_reuse_judges_a_finished_run_without_retraining(tmp_path, monkeypatch):
    """``benchmarks/digits_e2e.py --reuse``: a finished run (final EMA weights present) is read, not retrained, and its
    wall time is unknown (None); an unfinished directory is not 'finished'."""
    bench = _load_e2e_benchmark()
    run = tmp_path / "seed0"
    (run / "final").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"eval": {"use_ema": True, "num_steps": 40},
                                                 "sampling": {"num_steps": 10}}))
    assert not bench.finished(str(run))
    (run / "final" / "denoiser_ema.safetensors").write_bytes(b"")
    assert bench.finished(str(run))
    rows = [{"epoch": 0, "samples_seen": 0, KEY: 0.55, "eval/fd_independent": 0.1, "eval/diversity_ratio": 1.1},
            {"epoch": 1, "samples_seen": 128, "elapsed_s": 7.0},
            {"epoch": 2, "samples_seen": 256, "elapsed_s": 12.0, KEY: 0.96, "eval/fd_independent": 0.1,
             "eval/diversity_ratio": 0.92}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    judged = {"base": {"accuracy": 0.57}, "tuned": {"accuracy": 0.97}}
    (run / "judge.json").write_text(json.dumps({"models": judged}))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(bench.subprocess, "run", no_training)
    out = bench.run_seed(0, str(run), [], "configs/digits.yaml", reuse=True)
    assert out["reused"] and out["wall_s"] is None and out["train_elapsed_s"] == 12.0
    assert out["judge_2000"] == judged and out["final_accuracy"] == 0.96 and out["reach_0.95"]["samples_seen"] == 256
    with pytest.raises(AssertionError, match="trained again"):  # without --reuse the run is trained again
        bench.run_seed(0, str(run), [], "configs/digits.yaml", reuse=False)


def test_e2e_benchmark_refuses_a_path_as_out_before_running(monkeypatch, capsys):
    """``--out`` is a file name under benchmarks/results; a path is refused before any run starts."""
    bench = _load_e2e_benchmark()
    monkeypatch.setattr(bench, "run_seed", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a run started")))
    with pytest.raises(SystemExit):
        bench.main(["--out", "benchmarks/results/x.json"])
    assert "--out takes a file name under benchmarks/results" in capsys.readouterr().err
