"""Reward-hacking diagnostics (genalign/hacking.py), the encoder judge and precision/recall (genalign/judge.py),
and their use by the trainer: warnings, early stop and the best unflagged checkpoint."""

import json
import warnings

import pytest
import torch

from genalign.hacking import HackingMonitor, RewardHackingWarning
from genalign.judge import EncoderJudge, load_image_dir, precision_recall


def ev(reward, fd=None, div=None):
    out = {"eval/reward": reward}
    if fd is not None:
        out["eval/fd_independent"] = fd
    if div is not None:
        out["eval/diversity_ratio"] = div
    return out


def test_monitor_flags_reward_up_with_fd_rise_or_diversity_drop():
    m = HackingMonitor(0.10, 0.10, "warn")
    assert m.update(0, ev(0.5, 1.0, 1.0)) == {"hacking/fd_rise": 0.0, "hacking/diversity_drop": 0.0,
                                              "hacking/flag": 0.0, "hacking/is_best": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = m.update(10, ev(0.7, 1.09, 0.95))  # within both thresholds: no warning
    assert out["hacking/flag"] == 0.0 and out["hacking/is_best"] == 1.0
    assert out["hacking/fd_rise"] == pytest.approx(0.09) and out["hacking/diversity_drop"] == pytest.approx(0.05)
    with pytest.warns(RewardHackingWarning, match=r"eval/fd_independent 1\.3 is \+30\.0% .*eval.max_fd_rise"):
        out = m.update(20, ev(0.9, 1.3, 0.95))
    assert out["hacking/flag"] == 1.0 and out["hacking/is_best"] == 0.0  # flagged: never the best
    with warnings.catch_warnings():  # the same streak: logged, not warned again
        warnings.simplefilter("error")
        assert m.update(25, ev(0.9, 1.4, 0.95))["hacking/flag"] == 1.0
        assert m.update(28, ev(0.6, 1.05, 0.95))["hacking/flag"] == 0.0  # passes: the streak ends
    with pytest.warns(RewardHackingWarning, match=r"eval/diversity_ratio 0\.8 is 20\.0% below"):
        m.update(30, ev(0.95, 1.0, 0.8))
    assert m.best["epoch"] == 10 and not m.stop_requested


def test_monitor_does_not_flag_when_the_reward_did_not_rise_and_stop_requests_a_stop():
    m = HackingMonitor(0.10, 0.10, "stop")
    m.update(0, ev(0.5, 1.0, 1.0))
    assert m.update(5, ev(0.4, 2.0, 0.5))["hacking/flag"] == 0.0  # worse everywhere, but no reward gain
    assert not m.stop_requested
    with pytest.warns(RewardHackingWarning, match="Training stops"):
        m.update(6, ev(0.6, 2.0, 1.0))
    assert m.stop_requested


def test_monitor_thresholds_of_zero_switch_checks_off_and_state_round_trips():
    m = HackingMonitor(0.0, 0.0, "warn")
    m.update(0, ev(0.5, 1.0, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m.update(1, ev(0.9, 5.0, 0.1))["hacking/flag"] == 0.0
    m2 = HackingMonitor(0.1, 0.1)
    m2.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert m2.base == m.base and m2.best == m.best
    with pytest.raises(ValueError, match="eval.on_hacking"):
        HackingMonitor(action="halt")


def test_monitor_uses_absolute_diversity_without_a_ratio_and_ignores_runs_without_judge():
    m = HackingMonitor()
    assert m.update(0, {"eval/reward": 1.0}) == {"hacking/is_best": 1.0}
    m = HackingMonitor()
    m.update(0, {"eval/reward": 0.0, "eval/diversity": 2.0})
    with pytest.warns(RewardHackingWarning, match="eval/diversity 1 is 50.0% below"):
        m.update(1, {"eval/reward": 1.0, "eval/diversity": 1.0})


def test_precision_recall_of_identical_sets_is_one_and_of_disjoint_sets_is_zero():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(x + 100, x) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_separates_collapse_from_off_manifold_samples():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(400, 2, generator=g)
    collapsed = 0.05 * torch.randn(400, 2, generator=g)  # realistic but covers a small part: recall falls
    pr = precision_recall(collapsed, real)
    assert pr["precision"] > 0.9 and pr["recall"] < 0.3
    wide = 3 * torch.randn(400, 2, generator=g)  # covers everything but most samples are off-manifold
    pr = precision_recall(wide, real)
    assert pr["precision"] < 0.5 and pr["recall"] > 0.9
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(real[:3], real)


class MeanColour:
    """A toy encoder: per-channel means and stds."""

    def encode(self, images):
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)


def test_encoder_judge_sees_a_collapsed_model_against_reference_images(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    refs = torch.rand(40, 3, 16, 16, generator=g)
    for i, r in enumerate(refs):
        Image.fromarray((r.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / f"{i:03d}.png")
    loaded = load_image_dir(str(tmp_path), (16, 16))
    assert loaded.shape == (40, 3, 16, 16) and (loaded - refs).abs().max() < 1 / 255
    judge = EncoderJudge(MeanColour(), str(tmp_path))
    prompts = ["a"] * 20 + ["b"] * 20
    good = judge(torch.rand(40, 3, 16, 16, generator=g), prompts)
    collapsed = judge(torch.full((40, 3, 16, 16), 0.5) + 0.01 * torch.rand(40, 3, 16, 16, generator=g), prompts)
    assert set(good) == {"eval/fd_independent", "eval/diversity", "eval/vendi", "eval/precision", "eval/recall"}
    assert collapsed["eval/fd_independent"] > 10 * good["eval/fd_independent"]
    assert collapsed["eval/diversity"] < 0.2 * good["eval/diversity"]
    assert collapsed["eval/recall"] < good["eval/recall"]
    with pytest.raises(ValueError, match="does not exist"):
        EncoderJudge(MeanColour(), str(tmp_path / "missing"))(torch.rand(4, 3, 16, 16), ["a"] * 4)


def test_judge_encoder_needs_references_and_unknown_encoder_is_named():
    from genalign.config import ConfigError, load_config
    from genalign.plugins import load_encoder

    with pytest.raises(ConfigError, match="eval.judge_references"):
        load_config("configs/digits_flow_grpo.yaml", ["eval.judge_encoder=dino"]).validate()
    with pytest.raises(ConfigError, match="eval.on_hacking"):
        load_config("configs/digits_flow_grpo.yaml", ["eval.on_hacking=halt"]).validate()
    with pytest.raises(ValueError, match="unknown judge encoder 'inceptionv9'.*'digits'"):
        load_encoder("inceptionv9")
    assert load_encoder("digits").encode(torch.rand(2, 3, 8, 8)).shape == (2, 128)


def digits_trainer(tmp_path, *overrides):
    from genalign.config import load_config
    from genalign.trainer import Trainer

    cfg = load_config("configs/digits_flow_grpo.yaml", [
        f"output_dir={tmp_path / 'run'}", "num_epochs=3", "sampling.groups_per_epoch=2", "sampling.group_size=8",
        "sampling.batch_size=16", "train.batch_size=8", "train.num_minibatches=2", "eval.every=1",
        "eval.num_per_prompt=4", *overrides])
    return Trainer(cfg)


def test_trainer_keeps_the_best_unflagged_weights_and_logs_hacking_metrics(tmp_path):
    tr = digits_trainer(tmp_path, "eval.on_hacking=ignore")
    tr.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [r for r in rows if "eval/reward" in r]
    assert len(evals) == 4 and all("hacking/fd_rise" in r and "hacking/flag" in r for r in evals)
    ok = [r for r in evals if not r["hacking/flag"]]
    best = max(ok, key=lambda r: r["eval/reward"])
    saved = json.load(open(tmp_path / "run" / "best" / "best.json"))
    assert saved["epoch"] == best["epoch"] and saved["eval/reward"] == pytest.approx(best["eval/reward"])
    assert (tmp_path / "run" / "best" / "lora" / "adapter_model.safetensors").is_file()


def test_trainer_stops_after_a_flagged_evaluation_when_asked(tmp_path, monkeypatch):
    tr = digits_trainer(tmp_path, "eval.on_hacking=stop", "num_epochs=5")
    real = tr.monitor.update

    def update(epoch, metrics):
        out = real(epoch, metrics)
        tr.monitor.stop_requested = epoch == 2  # as if the judge flagged epoch 2
        return out

    monkeypatch.setattr(tr.monitor, "update", update)
    tr.train()
    assert tr.epoch == 2
    assert (tmp_path / "run" / "final" / "lora").is_dir()
    assert any(p.name.startswith("checkpoint-") for p in (tmp_path / "run" / "checkpoints").iterdir())


def test_trainer_uses_the_configured_judge_encoder(tmp_path):
    """eval.judge_encoder + eval.judge_references replace the adapter's judge (here: digit-classifier features
    against real digits written as PNGs) and feed the hacking checks."""
    from PIL import Image

    from genalign.pipelines.digits_pretrain import load_split

    refs = tmp_path / "refs"
    refs.mkdir()
    for i, x in enumerate(load_split()[2][:40]):
        Image.fromarray(((x[0] + 1) / 2 * 255).round().byte().numpy()).save(refs / f"{i:03d}.png")
    tr = digits_trainer(tmp_path, "num_epochs=1", "eval.judge_encoder=digits", f"eval.judge_references={refs}")
    tr.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [r for r in rows if "eval/reward" in r]
    assert len(evals) == 2
    for r in evals:
        assert {"eval/fd_independent", "eval/diversity", "eval/vendi", "eval/precision", "eval/recall"} <= set(r)
        assert "eval/diversity_ratio" not in r  # the pixel-PCA judge of the adapter is replaced
    assert "hacking/fd_rise" in evals[1] and "hacking/diversity_drop" in evals[1]
