"""Judge the digits base model (and a tuned LoRA) with the independent judge of ``genalign/judge.py``.

Realism is measured in a pixel-PCA space fitted on the TRAIN split of scikit-learn's real digits, against the
HELD-OUT split as the real reference (fit and reference differ); no reward's features are involved, so reward
hacking cannot hide there. Accuracy comes from the reward classifier (``genalign.rewards.digits``).

Images: the eval prompts (``digits:prompts_eval.txt``) x 100 per prompt = 2000, drawn by the project's sampling
service (``genalign.sampling.expand_jobs`` / ``sample_images``) with seed 777 and 10 deterministic ODE steps.

Writes ``benchmarks/results/judge_digits.json``::

    {"settings": {...}, "real_reference": {"fd_train_vs_held_out", "diversity", "vendi", ...},
     "models": {"base": {"accuracy", "fd_independent", "diversity", "diversity_ratio", "vendi"},
                "tuned": {...}}}

Usage: ``OMP_NUM_THREADS=1 python benchmarks/judge_digits.py [--lora RUN/final/lora] [--rlg 0.3 0.5 0.7]
[--num-per-prompt 100] [--model NAME=DIR ...]`` (``--lora``: tuned weights, a LoRA or a full fine-tune's
``denoiser*.safetensors``; the base judged beside them is their base model, else ``--base``, default ``digits``;
``--rlg``: the LoRA also judged at those alignment strengths,
``genalign.rlg``; ``--model``: other digits asset directories judged beside the base, e.g. the generators that
``genalign pretrain-digits --label-noise 0`` trains on correct captions, the README's oracles).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def to_reward_images(x: torch.Tensor) -> torch.Tensor:
    """Real digits ``[N, 1, 8, 8]`` in ``[-1, 1]`` -> reward images ``[N, 3, 8, 8]`` in ``[0, 1]``."""
    return ((x + 1) / 2).expand(-1, 3, -1, -1)


def evaluate(policy, prompts, seeds, labels, reward, real_images, real_labels, pca, num_steps, batch_size) -> dict:
    from genalign.judge import judge
    from genalign.sampling import sample_images

    t0 = time.perf_counter()
    images = sample_images(policy, prompts, seeds, num_steps=num_steps, batch_size=batch_size)
    sample_s = time.perf_counter() - t0
    scores = reward(images, prompts)
    out = {"accuracy": float(scores["accuracy"].mean()), "reward": float(scores["score"].mean())}
    out.update(judge(images, labels, real_images, real_labels, pca))
    out["sample_s"] = round(sample_s, 2)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lora", default=None, help="a trained run's final/lora (or final/lora_ema) directory, or a "
                        "full fine-tune's final/denoiser.safetensors (or denoiser_ema.safetensors)")
    parser.add_argument("--base", default=None, help="the base model (default: the tuned weights' base model, else "
                        "'digits')")
    parser.add_argument("--rlg", type=float, nargs="*", default=[],
                        help="also judge the LoRA at these RLG strengths w (v_base + w (v_tuned - v_base))")
    parser.add_argument("--prompts", default="digits:prompts_eval.txt")
    parser.add_argument("--num-per-prompt", type=int, default=100)
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--pca-dim", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="also judge the digits asset directory DIR as NAME (repeatable)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "judge_digits.json"))
    args = parser.parse_args(argv)
    extra = []
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--model takes NAME=DIR, got {item!r}")
        extra.append((name, path))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from genalign.judge import PixelPCA, frechet_distance, vendi_score, within_class_diversity
    from genalign.pipelines.digits import prompt_digit
    from genalign.pipelines.digits_pretrain import load_split
    from genalign.prompts import read_prompts
    from genalign.rewards.digits import DigitCorrectReward
    from genalign.sampling import expand_jobs, load_policy_with_loras

    x_tr, y_tr, x_te, y_te = load_split()
    train_images, real_images = to_reward_images(x_tr), to_reward_images(x_te)
    pca = PixelPCA.fit(train_images, dim=args.pca_dim)  # fitted on TRAIN; the reference is HELD-OUT
    train_f, real_f = pca.features(train_images), pca.features(real_images)
    real_ref = {"n_train": int(len(y_tr)), "n_held_out": int(len(y_te)),
                "fd_train_vs_held_out": frechet_distance(train_f, real_f),
                "diversity": within_class_diversity(real_f, y_te), "vendi": vendi_score(real_f)}

    prompts, seeds = expand_jobs(read_prompts(args.prompts), args.num_per_prompt, args.seed)
    labels = torch.tensor([prompt_digit(p) for p in prompts])
    reward = DigitCorrectReward("digits")
    common = (prompts, seeds, labels, reward, real_images, y_te, pca, args.num_steps, args.batch_size)

    models = {}
    from genalign.sampling import resolve_model

    base_id = args.base or resolve_model(None, [args.lora] if args.lora else [])
    base, _ = load_policy_with_loras(base_id, [])
    models["base"] = evaluate(base, *common)
    print("base ", json.dumps(models["base"]))
    for name, path in extra:
        other, _ = load_policy_with_loras(path, [])
        models[name] = evaluate(other, *common)
        print(name, json.dumps(models[name]))
    if args.lora:
        tuned, _ = load_policy_with_loras(base_id, [args.lora])
        models["tuned"] = evaluate(tuned, *common)
        print("tuned", json.dumps(models["tuned"]))
        from genalign.rlg import RLGPolicy

        for w in args.rlg:
            models[f"rlg_{w:g}"] = evaluate(RLGPolicy(tuned, w), *common)
            print(f"rlg {w:g}", json.dumps(models[f"rlg_{w:g}"]))

    result = {"settings": {"prompts": args.prompts, "num_images": len(prompts), "num_per_prompt": args.num_per_prompt,
                           "seed": args.seed, "num_steps": args.num_steps, "pca_dim": args.pca_dim,
                           "pca_fit": "train split of sklearn digits", "reference": "held-out split",
                           "base": base_id, "lora": args.lora, "rlg": args.rlg, "models": dict(extra)},
              "real_reference": real_ref, "models": models}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("real ", json.dumps(real_ref))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
