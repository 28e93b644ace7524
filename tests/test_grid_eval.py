"""Comparison grids, RLG (alignment strength), evaluation and learning-curve plots on the digits model."""

import json
import math
import os
import re

import pytest
import torch
from genalign.pipelines import load_policy
from PIL import Image

from genalign import grid as G
from genalign.cli import main
from genalign.lora import add_lora, save_lora
from genalign.rlg import RLGPolicy
from genalign.sampling import Variant, load_policy_with_loras, sample_images

from .tiny_models import randomize_lora

PROMPTS = ["the digit 3", "a handwritten seven"]
STEPS = 4


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA that changes the model (random non-zero B matrices), saved like a trained one."""
    policy = load_policy("digits")
    add_lora(policy.denoiser(), rank=4, alpha=8, target_modules=policy.lora_target_modules)
    randomize_lora(policy.denoiser(), 0.1)
    out = str(tmp_path_factory.mktemp("run") / "final" / "lora")
    save_lora(policy, out, "digits")
    return out


@pytest.fixture(scope="module")
def policies(lora_dir):
    """``(base policy without adapters, policy with the LoRA as adapter 'lora0')``."""
    return load_policy("digits"), load_policy_with_loras("digits", [lora_dir])[0]


def test_rlg_end_points_are_exact_and_middle_mixes(policies):
    base, tuned = policies
    x = base.initial_latents(4, torch.Generator().manual_seed(1))
    t = torch.full((4,), 600.0)
    cond = base.encode(PROMPTS * 2)
    with torch.no_grad():
        v_base, v_tuned = base.predict(x, t, cond), tuned.predict(x, t, cond)
        assert not torch.equal(v_base, v_tuned)
        assert torch.equal(RLGPolicy(tuned, 0.0).predict(x, t, cond), v_base)
        assert torch.equal(RLGPolicy(tuned, 1.0).predict(x, t, cond), v_tuned)
        torch.testing.assert_close(RLGPolicy(tuned, 0.5).predict(x, t, cond), (v_base + v_tuned) / 2)
        torch.testing.assert_close(RLGPolicy(tuned, 2.0).predict(x, t, cond), 2 * v_tuned - v_base)
    seeds = [3, 4]
    images_base = sample_images(base, PROMPTS, seeds, STEPS)
    images_tuned = sample_images(tuned, PROMPTS, seeds, STEPS)
    assert torch.equal(sample_images(RLGPolicy(tuned, 0.0), PROMPTS, seeds, STEPS), images_base)
    assert torch.equal(sample_images(RLGPolicy(tuned, 1.0), PROMPTS, seeds, STEPS), images_tuned)
    assert torch.equal(sample_images(tuned, PROMPTS, seeds, STEPS), images_tuned)  # adapters re-enabled after RLG
    with pytest.raises(ValueError, match="LoRA"):
        RLGPolicy(base, 0.5)


def test_grid_columns_share_noise_and_layout_has_captions(policies, lora_dir, tmp_path):
    from genalign.rewards.base import RewardSet

    _, tuned = policies
    columns = G.build_columns([lora_dir], ["lora0"], rlg=[0.0, 1.0])
    run_name = os.path.basename(os.path.dirname(os.path.dirname(lora_dir)))  # RUN/final/lora -> RUN
    assert [c.label for c in columns] == ["base", run_name, "rlg w=0", "rlg w=1"]
    data = G.compute_grid(tuned, PROMPTS, [0, 1], columns, STEPS, RewardSet({"digit_correct": 1.0}))
    assert data.images.shape == (4, 4, 3, 8, 8)
    assert torch.equal(data.images[2], data.images[0])  # RLG w=0 = base, same seeds -> identical column
    assert torch.equal(data.images[3], data.images[1])  # w=1 = tuned
    assert not torch.equal(data.images[0], data.images[1])
    assert set(data.scores) >= {"digit_correct", "digit_correct.accuracy"} and data.scores["digit_correct"].shape == (4, 4)

    png = G.render_grid(data, str(tmp_path / "g.png"))
    f = math.ceil(G.MIN_CELL / 8)  # 8x8 digits upscaled by an integer factor (nearest)
    cell = 8 * f
    lines = 3  # prompt, seed, digit_correct
    row_h = cell + G.CAPTION_GAP + lines * G.LINE_H + G.PAD
    assert png.size == (G.PAD + 4 * (cell + G.PAD), G.HEADER_H + 4 * row_h)
    assert cell >= G.MIN_CELL
    pixels = torch.tensor(list(png.convert("L").getdata()), dtype=torch.uint8).reshape(png.size[1], png.size[0])
    x0, y0 = G.PAD, G.HEADER_H
    caption = pixels[y0 + cell + G.CAPTION_GAP: y0 + cell + G.CAPTION_GAP + lines * G.LINE_H, x0: x0 + cell]
    assert (caption < 100).any() and (caption > 200).float().mean() > 0.5  # dark text on white
    header = pixels[: G.HEADER_H - G.PAD // 2, x0: x0 + cell]
    assert (header < 100).any()
    # the image is pasted as nearest-neighbour blocks of f x f identical pixels
    block = pixels[y0: y0 + f, x0: x0 + f]
    assert (block == block[0, 0]).all()


def test_cli_grid_writes_png_and_html_referencing_every_image(lora_dir, tmp_path):
    out = tmp_path / "cmp" / "grid.png"
    assert main(["grid", "--model", "digits", "--lora", lora_dir, "--prompt", PROMPTS[0], "--seeds", "0", "1",
                 "--rewards", "digit_correct", "--rlg", "0.5", "1.5", "--steps", str(STEPS), "--out", str(out)]) == 0
    cell = 8 * math.ceil(G.MIN_CELL / 8)
    row_h = cell + G.CAPTION_GAP + 3 * G.LINE_H + G.PAD
    assert Image.open(out).size == (G.PAD + 4 * (cell + G.PAD), G.HEADER_H + 2 * row_h)
    page = (tmp_path / "cmp" / "grid.html").read_text()
    sources = re.findall(r"<img src='([^']+)'", page)
    assert len(sources) == 2 * 4 and len(set(sources)) == 8
    assert all((tmp_path / "cmp" / s).is_file() for s in sources)
    assert "rlg w=0.5" in page and "rlg w=1.5" in page and "base" in page and "digit_correct" in page


EVAL_FIELDS = {"model", "checkpoint", "baseline", "config", "prompts", "num_per_prompt", "seed", "num_steps",
               "guidance_scale", "num_samples", "reward_weights", "metrics", "bootstrap", "rewards", "judge"}
REWARD_FIELDS = {"mean", "std", "ci95", "per_prompt", "baseline", "win_rate", "win_rate_ci95"}


def test_cli_eval_writes_documented_fields_and_self_win_rate_is_half(lora_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--model", "digits", "--lora", lora_dir, "--baseline-lora", lora_dir, "--prompt", PROMPTS[0],
                 "--prompt", PROMPTS[1], "--rewards", "digit_correct", "--num-per-prompt", "3", "--seed", "2",
                 "--steps", str(STEPS), "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result) == EVAL_FIELDS and result["num_samples"] == 6
    assert result["guidance_scale"] == 1.0  # the digits model's own scale: no flag given
    assert result["reward_weights"] == {"digit_correct": 1.0} and result["config"] is None
    assert result["metrics"]["eval/digit_correct"] == pytest.approx(result["rewards"]["digit_correct"]["mean"])
    assert set(result["bootstrap"]) == {"resamples", "seed", "confidence"}
    assert list(result["rewards"]) == ["digit_correct", "digit_correct.probability", "digit_correct.accuracy"]
    judged = result["judge"]  # the digits adapter's independent judge, for both (identical) models
    assert set(judged) == {"checkpoint", "baseline"} and judged["checkpoint"] == judged["baseline"]
    assert {"eval/fd_independent", "eval/diversity_ratio", "eval/vendi"} <= set(judged["checkpoint"])
    assert "Independent judge (checkpoint)" in (out / "eval.md").read_text()
    r = result["rewards"]["digit_correct"]
    assert set(r) == REWARD_FIELDS
    assert r["ci95"][0] <= r["mean"] <= r["ci95"][1] and r["std"] >= 0
    assert r["win_rate"] == 0.5 and r["baseline"]["mean"] == r["mean"]
    assert [p["prompt"] for p in r["per_prompt"]] == PROMPTS
    assert all(p["win_rate"] == 0.5 and set(p) == {"prompt", "mean", "baseline_mean", "win_rate"} for p in r["per_prompt"])
    md = (out / "eval.md").read_text()
    assert "| digit_correct |" in md and "win rate" in md


def test_eval_statistics():
    import numpy as np

    from genalign.evaluate import bootstrap_ci, summarize, wins

    assert wins(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 1.0])).tolist() == [0.0, 0.5, 1.0]
    values = np.linspace(0, 1, 50)
    lo, hi = bootstrap_ci(values)
    assert lo < values.mean() < hi and bootstrap_ci(values) == (lo, hi)  # fixed seed: reproducible
    stats = summarize(["a", "b"], 2, {"r": np.array([1.0, 0.0, 1.0, 1.0])}, {"r": np.array([0.0, 0.0, 1.0, 0.0])})
    assert stats["r"]["win_rate"] == 0.75 and [p["win_rate"] for p in stats["r"]["per_prompt"]] == [0.75, 0.75]


def test_cli_sample_rlg(lora_dir, tmp_path, capsys):
    common = ["sample", "--prompt", PROMPTS[1], "--num-per-prompt", "2", "--steps", str(STEPS)]
    assert main(common + ["--rlg", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "--rlg needs --lora" in capsys.readouterr().err
    for name, extra in [("tuned", []), ("rlg1", ["--rlg", "1"]), ("base", []), ("rlg0", ["--rlg", "0"])]:
        lora = [] if name == "base" else ["--lora", lora_dir]
        assert main(common + lora + extra + ["--out", str(tmp_path / name)]) == 0
    for a, b in [("tuned", "rlg1"), ("base", "rlg0")]:
        assert (tmp_path / a / "00001.png").read_bytes() == (tmp_path / b / "00001.png").read_bytes()


def test_cli_plot_writes_png(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"epoch": e, "samples_seen": 128 * e, "reward/mean": 0.3 + 0.01 * e} for e in range(1, 6)]
    rows[-1].update({"eval/reward": 0.5, "eval/digit_correct": 0.5, "eval/digit_correct.accuracy": 0.6})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(run)]) == 0
    assert Image.open(run / "curves.png").format == "PNG"
    out = tmp_path / "acc.png"
    assert main(["plot", str(run / "metrics.jsonl"), "--keys", "eval/*", "missing", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > Image.open(run / "curves.png").size[0]  # 4 panels vs 3
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert os.path.isfile(out)


def test_variant_requires_adapter_for_rlg(policies):
    from genalign.sampling import use_variant

    with pytest.raises(ValueError, match="adapter"):
        with use_variant(policies[0], Variant("x", None, 0.5)):
            pass
