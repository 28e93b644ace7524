"""Compare Flow-GRPO, Flow-GRPO-Fast, TempFlow-GRPO, GRPO-Guard and MixGRPO on the digits task, over seeds.

Every method runs the ONE trainer (configs/digits_flow_grpo.yaml + its ``method``'s defaults) with the same budget of
generated images, once per training seed. Periodic ODE evaluations report prompt accuracy, the Frechet distance
(FD) of the digit classifier's penultimate features to the real held-out digits (the reward's own feature space,
blind to reward hacking) and the independent judge the digits adapter logs (``eval/fd_independent``,
``eval/diversity_ratio``: pixel PCA fitted on the real train split, see ``genalign/judge.py``). Writes
``benchmarks/results/compare_digits.json``::

    {"methods": {name: {"seeds": [{"seed", "samples_to_target", "model_calls_to_target", "final_accuracy",
                                   "final_fd", "final_fd_independent", "final_diversity_ratio", "model_calls",
                                   "train_s", "curve": [{"samples", "model_calls", "accuracy", "fd",
                                                        "fd_independent", "diversity_ratio"}, ...]}, ...],
                        "summary": {key: {"mean", "std", "values"}}}},
     "real_fd_floor": float, "target_accuracy": float, "budget_images": int}

and ``compare_digits.png`` (seed-mean accuracy and independent FD vs generated images and model calls).
Usage: ``OMP_NUM_THREADS=1 python benchmarks/compare_digits.py configs/compare_digits.yaml [--seeds 0 1 2]
[--methods a b] [--budget N] [--out FILE]``; ``--merge A.json B.json ...`` merges files written by runs over
disjoint seeds (e.g. two processes on two cores) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import yaml

import _common as C  # benchmarks/ is on sys.path when this script runs

RESULTS = C.RESULTS


def frechet(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance of two feature sets (the project's one implementation, :mod:`genalign.judge`)."""
    from genalign.judge import frechet_distance

    return float(frechet_distance(feats_a, feats_b))


def real_images():
    """Held-out real digits as reward images ``[N, 3, 8, 8]`` in ``[0, 1]``."""
    from genalign.pipelines.digits_pretrain import load_split

    x = load_split()[2]
    return ((x + 1) / 2).expand(-1, 3, -1, -1)


def first_crossing(curve, key: str, target: float):
    return next((p[key] for p in curve if p["accuracy"] >= target), None)


def run_method(name: str, overrides, spec, fd_hook, seed: int) -> dict:
    from genalign.config import load_config
    from genalign.trainer import Trainer

    per_epoch = 8 * 16
    epochs = spec["budget_images"] // per_epoch
    extra = [f"seed={seed}", f"num_epochs={epochs}", f"eval.every={max(1, spec['eval_every_images'] // per_epoch)}",
             f"output_dir={os.path.join(spec['output_dir'], f'{name}-seed{seed}')}"]
    cfg = load_config(spec["base"], list(spec.get("overrides", [])) + list(overrides) + extra)
    trainer = Trainer(cfg, overwrite=True)
    trainer.eval_hooks.append(fd_hook)
    t0 = time.time()
    trainer.train()
    with open(trainer.metrics_path) as fh:
        rows = [json.loads(line) for line in fh]
    acc_key = next(k for k in rows[0] if k.startswith("eval/") and k.endswith("accuracy"))
    curve, seconds = [], 0.0
    for r in rows:  # seconds: sampling + training time so far, evaluations excluded
        seconds += r.get("time/sample_s", 0.0) + r.get("time/train_s", 0.0)
        if acc_key in r:
            curve.append({"samples": r["samples_seen"], "model_calls": r.get("model_calls", 0), "seconds": seconds,
                          "accuracy": r[acc_key], "fd": r["eval/fd"], "fd_independent": r.get("eval/fd_independent"),
                          "diversity_ratio": r.get("eval/diversity_ratio")})
    target = spec["target_accuracy"]
    out = {"seed": seed, "samples_to_target": first_crossing(curve, "samples", target),
           "model_calls_to_target": first_crossing(curve, "model_calls", target),
           "final_accuracy": curve[-1]["accuracy"], "final_fd": curve[-1]["fd"],
           "final_fd_independent": curve[-1]["fd_independent"], "final_diversity_ratio": curve[-1]["diversity_ratio"],
           "model_calls": trainer.model_calls, "train_s": time.time() - t0, "curve": curve}
    out.update(at_targets(curve, spec.get("targets", [target])))
    out.update(best_within_judge(curve, spec.get("max_fd_rise", 0.10), spec.get("min_diversity_ratio", 0.90)))
    return out


def at_targets(curve, targets) -> dict:
    """Per accuracy target t: images, model calls and seconds to the first evaluation reaching it, and the
    independent FD / diversity ratio at that evaluation (None when never reached)."""
    out = {}
    for t in targets:
        hit = next((p for p in curve if p["accuracy"] >= t), None)
        for key, src in (("samples_to", "samples"), ("seconds_to", "seconds"), ("fd_independent_at", "fd_independent"),
                         ("diversity_at", "diversity_ratio")):
            out[f"{key}_{t}"] = hit[src] if hit else None
    return out


def best_within_judge(curve, max_fd_rise: float, min_diversity: float) -> dict:
    """The highest accuracy among evaluations that keep realism and diversity (independent FD at most
    ``1 + max_fd_rise`` times the base's, the first evaluation, and diversity ratio at least ``min_diversity``
    of real digits'), with its images: what the run reaches without collapsing."""
    base = curve[0]["fd_independent"]
    ok = [p for p in curve if p["fd_independent"] is not None and p["fd_independent"] <= (1 + max_fd_rise) * base
          and p["diversity_ratio"] >= min_diversity]
    best = max(ok, key=lambda p: p["accuracy"]) if ok else None
    return {"best_ok_accuracy": best["accuracy"] if best else None, "best_ok_samples": best["samples"] if best else None}


SUMMARY_KEYS = ("samples_to_target", "model_calls_to_target", "final_accuracy", "final_fd", "final_fd_independent",
                "final_diversity_ratio", "train_s", "best_ok_accuracy", "best_ok_samples")
TARGET_KEYS = ("samples_to", "seconds_to", "fd_independent_at", "diversity_at")


def summarize(seeds: list) -> dict:
    """Mean and (population) std over seeds of each headline figure; a seed that never reached the target counts
    as missing (its ``values`` entry is None)."""
    out = {}
    keys = list(SUMMARY_KEYS) + sorted({k for r in seeds for k in r if k.startswith(TARGET_KEYS)})
    for key in keys:
        out[key] = C.mean_std([r.get(key) for r in seeds])
    return out


def merge(results: dict, extra: dict) -> dict:
    """Add ``extra``'s per-seed results to ``results`` (same seed of the same method: ``extra`` wins)."""
    for key in ("real_fd_floor", "target_accuracy", "budget_images", "max_fd_rise", "min_diversity_ratio"):
        results.setdefault(key, extra.get(key))
    for name, m in extra.get("methods", {}).items():
        mine = {r["seed"]: r for r in results.setdefault("methods", {}).get(name, {}).get("seeds", [])}
        mine.update({r["seed"]: r for r in m.get("seeds", [])})
        seeds = [mine[k] for k in sorted(mine)]
        results["methods"][name] = {"seeds": seeds, "summary": summarize(seeds)}
    return results


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for name, m in results["methods"].items():
        curves = [r["curve"] for r in m["seeds"]]
        n = min(len(c) for c in curves)
        for col, x in enumerate(("samples", "model_calls")):
            xs = [curves[0][i][x] for i in range(n)]
            for row, key in enumerate(("accuracy", "fd_independent")):
                ys = [sum(c[i][key] or 0.0 for c in curves) / len(curves) for i in range(n)]
                axes[row, col].plot(xs, ys, label=name)
    for col, x in enumerate(("generated images", "sampling model calls")):
        axes[0, col].axhline(results["target_accuracy"], color="grey", ls=":")
        axes[0, col].set_ylabel("eval accuracy (mean over seeds)")
        axes[1, col].set_ylabel("independent FD (pixel PCA, mean over seeds)")
        axes[1, col].set_xlabel(x)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/compare_digits.yaml")
    parser.add_argument("--methods", nargs="*", help="subset of the config's methods")
    parser.add_argument("--budget", type=int, help="override budget_images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--merge", nargs="+", help="merge these result files into --out and exit")
    parser.add_argument("--out", default=os.path.join(RESULTS, "compare_digits.json"))
    args = parser.parse_args()
    if args.merge:
        results: dict = {}
        for path in args.merge:
            with open(path) as fh:
                results = merge(results, json.load(fh))
        write(results, args.out)
        return
    torch.set_num_threads(1)
    with open(args.config) as fh:
        spec = yaml.safe_load(fh)
    if args.budget:
        spec["budget_images"] = args.budget
    from genalign.rewards.digits import DigitCorrectReward

    scorer = DigitCorrectReward("digits")
    real = real_images()
    half = len(real) // 2
    real_feats = scorer.features(real)
    floor = frechet(scorer.features(real[:half]), scorer.features(real[half:]))

    def fd_hook(images, prompts):
        return {"eval/fd": frechet(scorer.features(images), real_feats)}

    for seed in args.seeds:
        for name in args.methods or list(spec["methods"]):
            r = run_method(name, spec["methods"][name], spec, fd_hook, seed)
            print(f"{name} seed {seed}: to {spec['target_accuracy']}: {r['samples_to_target']} images / "
                  f"{r['model_calls_to_target']} calls; final acc {r['final_accuracy']:.3f} FD {r['final_fd']:.2f} "
                  f"FD_ind {r['final_fd_independent']:.3f} div {r['final_diversity_ratio']:.2f} ({r['train_s']:.0f} s)",
                  flush=True)
            # merge into the results file after every run (runs over disjoint seeds may share one file)
            results = {}
            if os.path.isfile(args.out):
                with open(args.out) as fh:
                    results = json.load(fh)
            results = merge(results, {"real_fd_floor": floor, "target_accuracy": spec["target_accuracy"],
                                      "budget_images": spec["budget_images"],
                                      "max_fd_rise": spec.get("max_fd_rise", 0.10),
                                      "min_diversity_ratio": spec.get("min_diversity_ratio", 0.90),
                                      "methods": {name: {"seeds": [r]}}})
            write(results, args.out)


def write(results: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)
    plot(results, os.path.splitext(path)[0] + ".png")


if __name__ == "__main__":
    main()
