"""What a reweighting of the digits base model can reach, without training: the KL-regularised optimum of
reward alignment is the base tilted by ``exp(r / beta)`` (docs/algorithms.md §12.3), measured here by importance
resampling.

``--pool`` ODE images per eval prompt are drawn from the base (seed 12345, 10 steps); for each weighting
``w(x)`` 100 images per prompt are resampled without replacement with probabilities ``w / sum w`` and judged
(prompt accuracy from the reward classifier; independent FD / diversity ratio / Vendi from the pixel-PCA judge,
``genalign/judge.py``). Weightings: none (the base), rejection (correct images only: the limit of every tilt),
``exp(p / beta)`` and ``p^(1 / beta)`` (the log-probability reward) for several beta. ``--model DIR`` measures
another asset directory (e.g. one written by ``genalign pretrain-digits --patch-size 2``).

Writes ``benchmarks/results/tilt_digits.json``; usage: ``OMP_NUM_THREADS=1 python benchmarks/tilt_digits.py
[--pool 1000] [--steps 10] [--model DIR] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool", type=int, default=1000, help="base images per eval prompt")
    parser.add_argument("--keep", type=int, default=100, help="resampled images per eval prompt")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model", default="digits", help="digits asset directory (default: the shipped model)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "tilt_digits.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from genalign.judge import PixelPCA, judge
    from genalign.pipelines.digits import prompt_digit
    from genalign.pipelines.digits_pretrain import load_split
    from genalign.prompts import read_prompts
    from genalign.rewards.digits import DigitCorrectReward
    from genalign.sampling import expand_jobs, load_policy_with_loras, sample_images

    x_tr, _, x_te, y_te = load_split()
    pca, real = PixelPCA.fit((x_tr + 1) / 2), (x_te + 1) / 2
    policy, _ = load_policy_with_loras(args.model, [])
    eval_prompts = read_prompts("digits:prompts_eval.txt")
    prompts, seeds = expand_jobs(eval_prompts, args.pool, 12345)
    images = sample_images(policy, prompts, seeds, num_steps=args.steps, batch_size=1000)
    scores = DigitCorrectReward("digits")(images, prompts)
    p, acc = scores["probability"], scores["accuracy"]
    labels = torch.tensor([prompt_digit(q) for q in prompts])
    prompt_id = torch.arange(len(prompts)) // args.pool
    g = torch.Generator().manual_seed(0)

    def resample(weights: torch.Tensor) -> dict:
        idx = torch.cat([(prompt_id == k).nonzero()[:, 0][torch.multinomial(weights[prompt_id == k], args.keep,
                                                                            generator=g)]
                         for k in range(len(eval_prompts))])
        out = judge(images[idx].mean(1, keepdim=True), labels[idx], real, torch.as_tensor(y_te), pca)
        return {"accuracy": float(acc[idx].mean()), "fd_independent": out["fd_independent"],
                "diversity_ratio": out["diversity_ratio"], "vendi": out["vendi"]}

    rows = {"base": resample(torch.ones_like(p)), "rejection (correct only)": resample(acc + 1e-12)}
    for beta in (1.0, 0.5, 0.3, 0.2, 0.1):
        rows[f"exp(p / {beta})"] = resample(torch.exp(p / beta))
    for beta in (1.0, 0.5, 0.3):
        rows[f"p^(1 / {beta})"] = resample(p.clamp_min(1e-6) ** (1 / beta))
    for name, r in rows.items():
        print(f"{name:26s} acc {r['accuracy']:.3f} FD_ind {r['fd_independent']:.3f} "
              f"diversity {r['diversity_ratio']:.3f} vendi {r['vendi']:.1f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"settings": vars(args), "weightings": rows}, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
