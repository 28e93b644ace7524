"""DRAGON and Adv-GRPO on the digits task (the ONE trainer, configs/digits_flow_grpo.yaml + overrides).

(a) DRAGON: reward ``exemplar_similarity`` (mean cosine of the digit classifier's penultimate features to
    the 5 nearest real TRAIN digits: the exemplar set), ``method=dragon``, per-prompt halves, Diffusion-DPO
    on pairs within prompt groups (beta 500; 5000 overshot here). Goal: a lower batch FD than the base model.
    (``frechet_set`` with leave-one-out contributions of 128-image batches moved FD less in a sweep: the FD of
    128 samples in 128 dimensions is a noisy per-sample signal.)
(b) Adv-GRPO: reward ``adversarial`` (discriminator on the classifier's conv features standing in for
    DINO patch tokens and its penultimate features for CLS, real TRAIN digits as references; head lr 1e-3,
    as 1e-4 barely moved the head on this stand-in in 90 steps), 3 discriminator steps of 128 fresh images
    per round, GRPO with KL 0.3. Goal: a lower FD without the prompt accuracy collapsing.

Evaluation (ODE, eval prompts x ``num_per_prompt``): FD to the real HELD-OUT digits and prompt accuracy
under the shipped classifier; ``real_fd_floor`` = FD(train digits, held-out digits). Writes
``benchmarks/results/{dragon_digits,adv_grpo_digits}.{json,png}``::

    {"curve": [{"epoch", "samples", "fd", "accuracy"}, ...], "base": {...}, "final": {...},
     "real_fd_floor": float, "train_s": float, "overrides": [...]}

Usage: ``OMP_NUM_THREADS=1 python benchmarks/dragon_adv_digits.py [--only dragon|adv] [--epochs N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COMMON = ["sampling.groups_per_epoch=8", "sampling.group_size=16", "sampling.batch_size=128", "eval.num_per_prompt=50",
          "lora.rank=16", "lora.alpha=32"]
DEMOS = {  # settings from short sweeps (see the module docstring); reward options are set in run()
    "dragon": {"epochs": 30, "reward": "exemplar_similarity", "options": {"mode": "knn", "k": 5}, "overrides": [
        "method=dragon", "dragon.criterion=instance", "dragon.loss=dpo", "dragon.pairing=paired", "dragon.beta=500",
        "train.lr=5e-4", "train.num_minibatches=4", "train.num_inner_epochs=2", "train.batch_size=32"]},
    "adv": {"epochs": 30, "reward": "adversarial", "options": {"lr": 1e-3}, "overrides": [
        "method=adv_grpo", "adversarial.steps=3", "adversarial.num_samples=128", "train.kl_beta=0.3"]},
}
OUT = {"dragon": "dragon_digits", "adv": "adv_grpo_digits"}


def write_references(directory: str) -> str:
    """The real TRAIN digits as 8x8 PNGs (a reference directory)."""
    from PIL import Image

    from genalign.pipelines.digits_pretrain import load_split

    os.makedirs(directory, exist_ok=True)
    x = ((load_split()[0][:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    for i, img in enumerate(x):
        Image.fromarray(img.numpy(), "L").save(os.path.join(directory, f"{i:04d}.png"))
    return directory


def eval_hook_and_floor():
    """``(hook(images, prompts) -> {"eval/fd", "eval/accuracy"}, real FD floor)`` on held-out digits."""
    from genalign.pipelines.digits_pretrain import load_split, prompt_digit
    from genalign.rewards.digits import DigitCorrectReward
    from genalign.rewards.distributional import DigitsEncoder, feature_stats, frechet_distance

    enc, scorer = DigitsEncoder(), DigitCorrectReward()
    x_tr, _, x_te, _ = load_split()
    held = feature_stats(enc.encode(((x_te + 1) / 2).expand(-1, 3, -1, -1)))
    floor = frechet_distance(*feature_stats(enc.encode(((x_tr + 1) / 2).expand(-1, 3, -1, -1))), *held).item()

    def hook(images, prompts):
        target = torch.tensor([prompt_digit(p) for p in prompts])
        acc = (scorer.classifier.classify(images).argmax(-1) == target).float().mean().item()
        return {"eval/fd": frechet_distance(*feature_stats(enc.encode(images)), *held).item(), "eval/accuracy": acc}

    return hook, floor


def run(name: str, epochs: int, hook, refs: str) -> dict:
    from genalign.config import load_config
    from genalign.trainer import Trainer

    out_dir = os.path.join("runs", OUT[name])
    overrides = COMMON + DEMOS[name]["overrides"] + [f"num_epochs={epochs}", f"eval.every={max(1, epochs // 3)}",
                                                     f"output_dir={out_dir}"]
    cfg = load_config("configs/digits_flow_grpo.yaml", overrides)
    key = DEMOS[name]["reward"]
    cfg.reward = key
    cfg.reward_options = {key: {"encoder": "digits", "references": refs, **DEMOS[name]["options"]}}
    trainer = Trainer(cfg)
    trainer.eval_hooks.append(hook)
    t0 = time.time()
    trainer.train()
    rows = [json.loads(line) for line in open(trainer.metrics_path)]
    curve = [{"epoch": r["epoch"], "samples": r["samples_seen"], "fd": r["eval/fd"], "accuracy": r["eval/accuracy"]}
             for r in rows if "eval/fd" in r]
    return {"curve": curve, "base": curve[0], "final": curve[-1], "train_s": time.time() - t0,
            "overrides": overrides, "reward": key,
            "reward_options": {key: {"encoder": "digits", "references": "real train digits", **DEMOS[name]["options"]}}}


def plot(result: dict, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["samples"] for p in result["curve"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(xs, [p["fd"] for p in result["curve"]], marker="o")
    axes[0].axhline(result["real_fd_floor"], color="grey", ls=":", label="real train vs held-out")
    axes[0].set_ylabel("FD to held-out digits")
    axes[0].legend(fontsize=8)
    axes[1].plot(xs, [p["accuracy"] for p in result["curve"]], marker="o")
    axes[1].set_ylabel("prompt accuracy")
    for ax in axes:
        ax.set_xlabel("generated images")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(DEMOS))
    parser.add_argument("--epochs", type=int, help="override the demos' epochs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hook, floor = eval_hook_and_floor()
    refs = write_references(os.path.join("runs", "digits_references"))
    for name in [args.only] if args.only else list(DEMOS):
        result = run(name, args.epochs or DEMOS[name]["epochs"], hook, refs)
        result["real_fd_floor"] = floor
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, OUT[name] + ".json"), "w") as fh:
            json.dump(result, fh, indent=1)
        plot(result, {"dragon": "DRAGON (exemplar kNN, Diffusion-DPO)", "adv": "Adv-GRPO (digits stand-in)"}[name],
             os.path.join(RESULTS, OUT[name] + ".png"))
        print(f"{name}: FD {result['base']['fd']:.2f} -> {result['final']['fd']:.2f} (floor {floor:.2f}); accuracy "
              f"{result['base']['accuracy']:.3f} -> {result['final']['accuracy']:.3f} ({result['train_s']:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
