"""Evaluation of a checkpoint: reward statistics with bootstrap confidence intervals and paired win rates.

Images are drawn and scored by :class:`genalign.evaluator.Evaluator`, the evaluator of training runs: image i
(prompt-major: ``num_per_prompt`` images per prompt) uses seed ``seed + i`` for the checkpoint and for the
baseline alike, so both see the same initial noise and the comparison is paired: per prompt, the win rate is
the fraction of seeds where the checkpoint's reward beats the baseline's (ties count one half). Given a run's
config (``genalign eval --config RUN/config.json``) the request, reward, model settings and mixed precision
are the run's, and ``metrics`` (``eval/reward``, ``eval/<part>``) reproduces its evaluation. ``eval.json``
fields are documented in the README ("Compare: grids, RLG, eval, plots") and in :func:`evaluate`.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .evaluator import Evaluator
from .sampling import (Variant, default_steps, display_parts, load_policy_with_loras, mixed_precision_autocast,
                       resolve_model, use_variant)

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def bootstrap_ci(values: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 confidence: float = CONFIDENCE) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (fixed ``seed``, so reproducible)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def wins(scores: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Per pair: 1 if the checkpoint's score is higher, 0.5 on a tie, 0 otherwise."""
    return np.where(scores > baseline, 1.0, np.where(scores == baseline, 0.5, 0.0))


def describe(values: np.ndarray, **bootstrap) -> Dict[str, object]:
    """``{"mean", "std" (ddof 1; 0 for one value), "ci95": [lo, hi]}`` of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "ci95": list(bootstrap_ci(values, **bootstrap))}


def score_variant(policy, variant: Variant, evaluator: Evaluator, autocast=None, judge=None):
    """Sample and score the evaluator's request with ``variant``: every reward component (and ``reward``, the
    weighted total) as ``[N]`` per-image values, all processes' images combined; with a ``judge`` (one process)
    also its metrics ``{"eval/fd_independent", ...}`` as the second value (else ``{}``)."""
    use_judge = judge is not None and evaluator.world == 1
    with use_variant(policy, variant) as sampler:
        result = evaluator.score(sampler, autocast, keep_images=use_judge)
    judged = judge(result.images, result.prompts) if use_judge else {}
    return {name: v.numpy() for name, v in result.scores.items()}, judged


def summarize(prompts: Sequence[str], num_per_prompt: int, scores: Dict[str, np.ndarray],
              baseline: Optional[Dict[str, np.ndarray]] = None, **bootstrap) -> Dict[str, dict]:
    """Per reward component: statistics, baseline statistics and win rate, and per-prompt values."""
    out = {}
    for name, values in scores.items():
        by_prompt = values.reshape(len(prompts), num_per_prompt)
        entry = describe(values, **bootstrap)
        rows = [{"prompt": p, "mean": float(v.mean())} for p, v in zip(prompts, by_prompt)]
        if baseline is not None:
            base = baseline[name]
            won = wins(values, base)
            entry["baseline"] = describe(base, **bootstrap)
            entry["win_rate"] = float(won.mean())
            entry["win_rate_ci95"] = list(bootstrap_ci(won, **bootstrap))
            for row, b, w in zip(rows, base.reshape(by_prompt.shape), won.reshape(by_prompt.shape)):
                row.update(baseline_mean=float(b.mean()), win_rate=float(w.mean()))
        entry["per_prompt"] = rows
        out[name] = entry
    return out


def evaluate(model: Optional[str], prompts: Sequence[str], rewards, num_per_prompt: int = 8, seed: int = 0,
             lora: Optional[str] = None, baseline: Optional[str] = None, num_steps: Optional[int] = None,
             guidance_scale: Optional[float] = None, device: Optional[str] = None, batch_size: int = 32,
             resamples: int = BOOTSTRAP_RESAMPLES, bootstrap_seed: int = BOOTSTRAP_SEED, *,
             reward_options: Optional[Dict[str, dict]] = None, dtype: Optional[str] = None,
             mixed_precision: str = "no", model_kwargs: Optional[dict] = None, accelerator=None,
             config: Optional[str] = None, judge: bool = True, judge_encoder: Optional[str] = None,
             judge_references: Optional[str] = None, judge_options: Optional[dict] = None,
             metadata: Optional[Sequence[dict]] = None, conditioning: Optional[Sequence[Optional[dict]]] = None
             ) -> dict:
    """Evaluate ``model`` (+ ``lora``) against ``baseline`` (``"base"``, a LoRA path, or None).

    model: a model id or directory; None = the base model recorded in the LoRA's ``base_model.json``
    (:func:`genalign.sampling.resolve_model`). metadata: one dict per prompt passed to the rewards with each of
    its images (a ``.jsonl`` prompt file's fields). conditioning: one per-prompt conditioning dict (or None) per
    prompt, passed to the model (a ``.jsonl`` record's ``"conditioning"``: negative prompt, condition image).
    rewards: reward specs (weight 1 each) or a mapping ``{spec: weight}`` (a run's ``reward``), with
    ``reward_options`` as in the config. dtype, model_kwargs (``height``, ``width``, ``drop_t5``, ...),
    mixed_precision: as the config keys ``model.dtype``, ``model.*`` and ``mixed_precision``. accelerator: for several processes
    (see :class:`genalign.evaluator.Evaluator`). config: the config file the settings came from (recorded).

    Returns the ``eval.json`` dict: ``model``, ``checkpoint`` (LoRA path or null = base), ``baseline``,
    ``config``, ``prompts``, ``num_per_prompt``, ``seed``, ``num_steps``, ``num_samples``, ``reward_weights``,
    ``metrics`` (``eval/reward`` and ``eval/<part>`` of the checkpoint, as a training run logs them),
    ``bootstrap`` (``resamples``, ``seed``, ``confidence``) and ``rewards``: per reward component ``mean``,
    ``std``, ``ci95``, ``per_prompt`` (``prompt``, ``mean``, and with a baseline ``baseline_mean``,
    ``win_rate``) and, with a baseline, ``baseline`` (``mean``, ``std``, ``ci95``), ``win_rate``,
    ``win_rate_ci95``; ``judge``: the independent realism / diversity judge of the checkpoint and the baseline
    (``{"checkpoint": {"eval/fd_independent", ...}, "baseline": {...}}``, one process only; the judge of
    :func:`genalign.judge.build_judge` from ``judge_encoder`` / ``judge_references`` / ``judge_options``, or the
    model adapter's own; ``{}`` when ``judge`` is false or none exists).
    """
    from .reward_api import RewardSet

    if not rewards:
        raise ValueError("genalign eval: give at least one reward (--rewards NAME ...)")
    weights = dict(rewards) if isinstance(rewards, Mapping) else (
        {rewards: 1.0} if isinstance(rewards, str) else {r: 1.0 for r in rewards})
    baseline_lora = baseline if baseline not in (None, "base") else None
    loras = [p for p in (lora, baseline_lora) if p]
    names = [n for n, p in (("checkpoint", lora), ("baseline", baseline_lora)) if p]
    model = resolve_model(model, loras)
    policy, _ = load_policy_with_loras(model, loras, guidance_scale, device, names=names, dtype=dtype,
                                       **(model_kwargs or {}))
    reward_set = RewardSet(weights, reward_options, device=str(policy.device))
    steps = default_steps(policy, num_steps)
    evaluator = Evaluator(prompts, num_per_prompt, seed, steps, batch_size, reward_set, accelerator,
                          metadata=metadata, conditioning=conditioning)
    autocast = mixed_precision_autocast(mixed_precision, policy.device)

    from .judge import build_judge

    judge_fn = build_judge(policy, judge_encoder, judge_references, judge_options, policy.device) if judge else None
    judged = {}

    def score(variant: Variant) -> Dict[str, np.ndarray]:
        values, judged[variant.label] = score_variant(policy, variant, evaluator, autocast, judge_fn)
        return values

    scores = score(Variant("checkpoint", "checkpoint" if lora else None))
    metrics = Evaluator.metrics({k: torch.from_numpy(v) for k, v in scores.items()})
    parts = {name: scores[name] for name in display_parts([k for k in scores if k != "reward"], reward_set.names)}
    base_scores = None if baseline is None else score(Variant("baseline", "baseline" if baseline_lora else None))
    bootstrap = {"resamples": resamples, "seed": bootstrap_seed}
    return {
        "model": model, "checkpoint": lora, "baseline": baseline, "config": config, "prompts": list(prompts),
        "num_per_prompt": num_per_prompt, "seed": seed, "num_steps": steps,
        "guidance_scale": getattr(policy, "guidance_scale", guidance_scale), "num_samples": evaluator.num_images,
        "reward_weights": weights, "metrics": metrics, "bootstrap": {**bootstrap, "confidence": CONFIDENCE},
        "rewards": summarize(prompts, num_per_prompt, parts, base_scores, **bootstrap),
        "judge": {k: v for k, v in judged.items() if v},
    }


def _fmt_ci(ci: Sequence[float]) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def to_markdown(result: dict) -> str:
    """``eval.md``: a summary table over reward components, then a per-prompt table per component."""
    has_base = result["baseline"] is not None
    head = "| reward | mean | std | 95% CI |" + (" baseline mean | baseline 95% CI | win rate |" if has_base else "")
    lines = [f"# Evaluation of {result['checkpoint'] or 'the base model'} ({result['model']})", "",
             f"{result['num_samples']} images: {len(result['prompts'])} prompts x {result['num_per_prompt']} seeds "
             f"from {result['seed']}, {result['num_steps']} steps"
             + (f", guidance scale {result['guidance_scale']:g}" if result.get("guidance_scale") is not None else "")
             + f"; baseline: {result['baseline'] or 'none'}. "
             f"CIs: percentile bootstrap, {result['bootstrap']['resamples']} resamples.", "",
             "As a training run logs it: " + ", ".join(f"{k} = {v:.4f}" for k, v in result["metrics"].items())
             + ".", ""]
    for who, values in result.get("judge", {}).items():
        lines += [f"Independent judge ({who}): " + ", ".join(f"{k.split('/')[-1]} = {v:.4f}" for k, v in values.items())
                  + ".", ""]
    lines += [head, "|" + "---|" * head.count(" |")]
    for name, r in result["rewards"].items():
        row = f"| {name} | {r['mean']:.4f} | {r['std']:.4f} | {_fmt_ci(r['ci95'])} |"
        if has_base:
            row += f" {r['baseline']['mean']:.4f} | {_fmt_ci(r['baseline']['ci95'])} | {r['win_rate']:.3f} |"
        lines.append(row)
    for name, r in result["rewards"].items():
        lines += ["", f"## {name} per prompt", "",
                  "| prompt | mean |" + (" baseline mean | win rate |" if has_base else ""),
                  "|---|---|" + ("---|---|" if has_base else "")]
        for row in r["per_prompt"]:
            extra = f" {row['baseline_mean']:.4f} | {row['win_rate']:.3f} |" if has_base else ""
            lines.append(f"| {row['prompt']} | {row['mean']:.4f} |{extra}")
    return "\n".join(lines) + "\n"


def write_eval(result: dict, out_dir: str) -> Tuple[str, str]:
    """Write ``eval.json`` and ``eval.md`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, "eval.json"), os.path.join(out_dir, "eval.md")
    with open(json_path, "w") as fh:
        json.dump(result, fh, indent=1)
    with open(md_path, "w") as fh:
        fh.write(to_markdown(result))
    return json_path, md_path
