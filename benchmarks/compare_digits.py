"""Compare Flow-GRPO, Flow-GRPO-Fast, TempFlow-GRPO, GRPO-Guard and MixGRPO on the digits task.

Every method runs the ONE trainer (configs/digits.yaml + its ``method``'s defaults) with the same seed and
the same budget of generated images. Periodic ODE evaluations report prompt accuracy and the Frechet
distance (FD) of the digit classifier's penultimate features to the real held-out digits. Writes
``benchmarks/results/compare_digits.json``::

    {"methods": {name: {"samples_to_target": int | null, "model_calls_to_target": int | null,
                        "final_accuracy": float, "final_fd": float, "model_calls": int, "train_s": float,
                        "curve": [{"samples": int, "model_calls": int, "accuracy": float, "fd": float}, ...]}},
     "real_fd_floor": float, "target_accuracy": float, "budget_images": int}

and ``compare_digits.png`` (accuracy and FD vs generated images and vs sampling model calls).
Usage: ``OMP_NUM_THREADS=1 python benchmarks/compare_digits.py configs/compare_digits.yaml [--methods a b]
[--budget N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch
import yaml

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def feature_stats(feats: torch.Tensor):
    f = feats.double()
    return f.mean(0), torch.cov(f.T)


def frechet(a, b) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` from ``(mean, cov)`` pairs."""
    import scipy.linalg

    warnings.filterwarnings("ignore", message="Matrix is singular")
    (mu_a, s_a), (mu_b, s_b) = a, b
    root = scipy.linalg.sqrtm(s_a.numpy() @ s_b.numpy()).real
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(s_a + s_b).item() - 2 * root.trace())


def real_images():
    """Held-out real digits as reward images ``[N, 3, 8, 8]`` in ``[0, 1]``."""
    from genalign.pipelines.digits_pretrain import load_split

    x = load_split()[2]
    return ((x + 1) / 2).expand(-1, 3, -1, -1)


def first_crossing(curve, key: str, target: float):
    return next((p[key] for p in curve if p["accuracy"] >= target), None)


def run_method(name: str, overrides, spec, fd_hook) -> dict:
    from genalign.config import load_config
    from genalign.trainer import Trainer

    per_epoch = 8 * 16
    epochs = spec["budget_images"] // per_epoch
    extra = [f"num_epochs={epochs}", f"eval.every={max(1, spec['eval_every_images'] // per_epoch)}",
             f"output_dir={os.path.join(spec['output_dir'], name)}"]
    cfg = load_config(spec["base"], list(spec.get("overrides", [])) + list(overrides) + extra)
    trainer = Trainer(cfg)
    trainer.eval_hooks.append(fd_hook)
    t0 = time.time()
    trainer.train()
    with open(trainer.metrics_path) as fh:
        rows = [json.loads(line) for line in fh]
    acc_key = next(k for k in rows[0] if k.startswith("eval/") and k.endswith("accuracy"))
    curve = [{"samples": r["samples_seen"], "model_calls": r.get("model_calls", 0), "accuracy": r[acc_key],
              "fd": r["eval/fd"]} for r in rows if acc_key in r]
    target = spec["target_accuracy"]
    return {"samples_to_target": first_crossing(curve, "samples", target),
            "model_calls_to_target": first_crossing(curve, "model_calls", target),
            "final_accuracy": curve[-1]["accuracy"], "final_fd": curve[-1]["fd"], "model_calls": trainer.model_calls,
            "train_s": time.time() - t0, "curve": curve}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for name, r in results["methods"].items():
        for col, x in enumerate(("samples", "model_calls")):
            xs = [p[x] for p in r["curve"]]
            axes[0, col].plot(xs, [p["accuracy"] for p in r["curve"]], label=name)
            axes[1, col].plot(xs, [p["fd"] for p in r["curve"]], label=name)
    for col, x in enumerate(("generated images", "sampling model calls")):
        axes[0, col].axhline(results["target_accuracy"], color="grey", ls=":")
        axes[1, col].axhline(results["real_fd_floor"], color="grey", ls=":")
        axes[0, col].set_ylabel("eval accuracy")
        axes[1, col].set_ylabel("FD to held-out digits")
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
    parser.add_argument("--out", default=os.path.join(RESULTS, "compare_digits.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with open(args.config) as fh:
        spec = yaml.safe_load(fh)
    if args.budget:
        spec["budget_images"] = args.budget
    from genalign.rewards.digits import DigitCorrectReward

    scorer = DigitCorrectReward("digits")
    real = real_images()
    half = len(real) // 2
    real_stats = feature_stats(scorer.features(real))
    floor = frechet(feature_stats(scorer.features(real[:half])), feature_stats(scorer.features(real[half:])))

    def fd_hook(images, prompts):
        return {"eval/fd": frechet(feature_stats(scorer.features(images)), real_stats)}

    for name in args.methods or list(spec["methods"]):
        r = run_method(name, spec["methods"][name], spec, fd_hook)
        print(f"{name}: to {spec['target_accuracy']}: {r['samples_to_target']} images / {r['model_calls_to_target']} "
              f"calls; final acc {r['final_accuracy']:.3f} FD {r['final_fd']:.2f} ({r['train_s']:.0f} s)", flush=True)
        # merge into the results file after every method (runs with disjoint --methods may share one file)
        results = {"methods": {}}
        if os.path.isfile(args.out):
            with open(args.out) as fh:
                results = json.load(fh)
        results.update(real_fd_floor=floor, target_accuracy=spec["target_accuracy"], budget_images=spec["budget_images"])
        results["methods"][name] = r
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
        plot(results, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
