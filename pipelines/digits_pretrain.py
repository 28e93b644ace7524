"""Pretraining and evaluation of the embedded digits model (``genalign pretrain-digits``, the ``main``
entry of the ``genalign.commands`` entry point of the digits plugin; installed as
``genalign.pipelines.digits_pretrain``).

Data: scikit-learn's bundled 8x8 digits (1797 images, values 0..16) scaled to ``[-1, 1]``, split once
into a stratified train set (75%) and a held-out set (25%) with a fixed ``random_state`` (independent
of ``seed``), so every asset set is evaluated on the same held-out digits.

:func:`pretrain` trains, reproducibly for a given seed:

1. a small CNN classifier (the reward, ``genalign.rewards.digits``) on the train split with +-1 pixel
   shift augmentation; held-out accuracy ~0.98-0.99;
2. the generator (pixel-space ``SD3Transformer2DModel``) jointly with the word-level prompt encoder, by
   rectified flow matching (``x_s = (1 - s) x0 + s noise``, target ``noise - x0``, ``s ~ U(0, 1)``), with
   EMA weights. For alignment headroom the prompts are deliberately unreliable: with probability
   ``label_noise`` (0.4) a sample's prompt names a uniformly random digit (docs/algorithms.md §10.3: training
   to convergence on partly random labels gives digit-like samples at a weak prompt accuracy, whereas
   early checkpoints in that accuracy band look like noise). Prompts are dropped (-> empty prompt) with
   probability ``cond_dropout`` so CFG is available. Default sampling (``policy.json``): 10 uniform ODE
   steps, guidance 1.0 (no CFG: keeps diversity within a prompt, so GRPO groups have reward variance,
   and halves the rollout cost); the measured base prompt accuracy (~0.58) and its dependence on the
   guidance scale go to ``metrics.json``. Raising the guidance scale is the training-free baseline that
   RL must beat.

Metrics sample through :mod:`genalign.sampling`, the sampler of every genalign command: image i of a
``(prompts, num_per_prompt, seed)`` request (prompt-major) uses seed ``seed + i`` for its initial noise, so
the numbers do not depend on the batch size. ``--measure-only`` recomputes ``metrics.json`` for an existing
asset directory without training (the model files are left untouched).

Architecture: ``--patch-size 4`` (default, the shipped model: 4 image tokens) or ``2`` (16 image tokens, a closer fit
at about twice the cost per step); ``--num-layers`` (3) and ``--attention-head-dim`` (16; 4 heads) size the
transformer (README, "Aligning without collapse", for what each reaches). Every asset directory also gets the
reference data set of :func:`write_reference_set` (``--reference-set-only`` writes just that).

Reproducibility: identical outputs for the same seed and the same number of torch threads (thread count
changes float summation order). ``--threads 1`` is much faster than 2 on a machine shared with other jobs.

Prompts: every template below is used in pretraining, with the digit as a word and as a numeral. The
RL prompt files use disjoint phrasings: ``prompts_train.txt`` (TRAIN_TEMPLATES) and
``prompts_eval.txt`` (EVAL_TEMPLATES).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from genalign.pipelines.digits import (  # noqa: F401
    DIGIT_WORDS,
    HELD_OUT_FRACTION,
    SPLIT_RANDOM_STATE,
    DigitsPolicy,
    PromptEncoder,
    build_transformer,
    load_split,
    prompt_digit,
    split_words,
)

TRAIN_TEMPLATES = ("{w}", "a handwritten {w}", "the digit {n}", "a drawing of the number {w}")
EVAL_TEMPLATES = ("the number {w}", "a handwritten digit {n}")
EXTRA_TEMPLATES = ("digit {w}", "an image of the digit {w}", "a picture of a handwritten {n}",
                   "the numeral {n}", "write a {w}", "draw the number {n}")
ALL_TEMPLATES = TRAIN_TEMPLATES + EVAL_TEMPLATES + EXTRA_TEMPLATES
DEFAULT_SAMPLING = {"num_steps": 10, "guidance_scale": 1.0, "noise_level": 0.0, "shift": 1.0}


# ---------------------------------------------------------------------------------------------- prompts
def fill(template: str, digit: int, form: Optional[str] = None) -> str:
    """Fill ``{w}`` (word) / ``{n}`` (numeral) in ``template``; ``form`` ('word'/'numeral') overrides."""
    if form is not None:
        template = template.replace("{w}", "{d}").replace("{n}", "{d}")
        return template.format(d=DIGIT_WORDS[digit] if form == "word" else str(digit))
    return template.format(w=DIGIT_WORDS[digit], n=str(digit))


def prompt_list(templates: Sequence[str]) -> List[str]:
    """Every template for every digit 0-9, template-major."""
    return [fill(t, d) for t in templates for d in range(10)]


def pretraining_prompts() -> List[List[str]]:
    """``[digit][variant]``: all templates, each with the digit as a word and as a numeral."""
    return [[fill(t, d, form) for t in ALL_TEMPLATES for form in ("word", "numeral")] for d in range(10)]


def vocabulary() -> List[str]:
    """Digit words, numerals, then the template words (in order of first appearance)."""
    words = list(DIGIT_WORDS) + [str(d) for d in range(10)]
    for t in ALL_TEMPLATES:
        words += [w for w in split_words(t.replace("{w}", "").replace("{n}", "")) if w not in words]
    return words


# ---------------------------------------------------------------------------------------------- data
def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (background -1 fills the border)."""
    n, _, h, w = x.shape
    k = 2 * max_shift + 1
    pad = F.pad(x, [max_shift] * 4, value=-1.0)
    shifted = torch.stack([pad[:, :, dy:dy + h, dx:dx + w] for dy in range(k) for dx in range(k)])
    return shifted[torch.randint(0, k * k, (n,), generator=g), torch.arange(n)]


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---------------------------------------------------------------------------------------------- training
def train_classifier(x_tr, y_tr, x_te, y_te, seed: int = 0, epochs: int = 20, batch_size: int = 64, lr: float = 2e-3,
                     log=print):
    """Train the reward CNN; returns ``(classifier, held_out_accuracy)``."""
    from genalign.rewards.digits import DigitClassifier

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(y_tr) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, total, steps_per_epoch))
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=g)
        for i in range(0, len(perm), batch_size):
            b = perm[i:i + batch_size]
            loss = F.cross_entropy(model(_shift(x_tr[b], g)), y_tr[b], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval().requires_grad_(False)
    acc = (model(x_te).argmax(-1) == y_te).float().mean().item()
    log(f"classifier: held-out accuracy {acc:.4f} after {epochs} epochs")
    return model, acc


def train_generator(x_tr, y_tr, seed: int = 0, steps: int = 4000, batch_size: int = 256, lr: float = 1e-3,
                    label_noise: float = 0.4, cond_dropout: float = 0.1, ema_decay: float = 0.999,
                    patch_size: int = 4, num_layers: int = 3, attention_head_dim: int = 16, log=print):
    """Flow-matching training of transformer + prompt encoder; returns the EMA ``(transformer, encoder)``.
    ``patch_size`` 4 (the shipped model: 4 image tokens) or 2 (16 tokens, about 2x the cost per step);
    ``num_layers`` / ``attention_head_dim`` (x 4 heads = the width) size the transformer (shipped: 3 / 16)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    transformer = build_transformer(patch_size=patch_size, num_layers=num_layers, attention_head_dim=attention_head_dim)
    encoder = PromptEncoder(vocabulary(), dim=transformer.config.joint_attention_dim)
    variants = pretraining_prompts()
    ids = torch.stack([encoder.tokenize(v) for v in variants])  # [10, V, L]
    modules = torch.nn.ModuleList([transformer, encoder]).train()
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    opt = torch.optim.AdamW(modules.parameters(), lr=lr, weight_decay=1e-4, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, 200))
    start, running = time.time(), 0.0
    for step in range(steps):
        idx = torch.randint(0, len(y_tr), (batch_size,), generator=g)
        x0, labels = x_tr[idx], y_tr[idx].clone()
        noisy = torch.rand(batch_size, generator=g) < label_noise
        labels[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=g)
        tok = ids[labels, torch.randint(0, ids.shape[1], (batch_size,), generator=g)]
        tok[torch.rand(batch_size, generator=g) < cond_dropout] = 0
        s = torch.rand(batch_size, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        seq, pooled = encoder(tok)
        pred = transformer(hidden_states=xs, encoder_hidden_states=seq, pooled_projections=pooled,
                           timestep=1000 * s, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), modules.parameters()):
                pe.lerp_(p, 1 - ema_decay)
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 500 == 0 or step + 1 == steps:
            log(f"generator: step {step + 1}/{steps} loss {running:.4f} ({time.time() - start:.0f} s)")
    return ema[0], ema[1]


# ---------------------------------------------------------------------------------------------- reference set
REFERENCE_SET = "reference_train.jsonl"
"""The asset file of the reference data set (``data.anchor_file: digits:reference_train.jsonl``)."""
REFERENCE_SET_TWO_CAPTIONS = "reference_train_two_captions.jsonl"
"""The same images, each under two training phrasings (the default run's ``data.anchor_file``)."""


def write_reference_set(out_dir: str) -> str:
    """Write the TRAIN split's real digits with their TRUE labels as a demonstration data set for
    ``data.anchor_file`` (:mod:`genalign.objectives.anchor`): ``reference_train/NNNN.png`` (8x8 grey) and
    ``reference_train.jsonl`` records ``{"prompt", "image", "digit"}``; image i's prompt is the RL training
    template ``i % 4`` (``prompts_train.txt``'s phrasings, never the evaluation ones). These are the generator's
    pretraining images with correct captions (pretraining saw 40% of captions randomised); the held-out split the
    judge compares with is not used. Also writes ``reference_train_two_captions.jsonl``: every image twice, under
    template ``i % 4`` and template ``(i + 1) % 4`` (caption augmentation: the anchor then teaches each image under
    more than one phrasing). Returns the first jsonl's path."""
    from PIL import Image

    x_tr, y_tr, _, _ = load_split()
    folder = os.path.join(out_dir, REFERENCE_SET.replace(".jsonl", ""))
    os.makedirs(folder, exist_ok=True)
    pixels = ((x_tr[:, 0] + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    for i, img in enumerate(pixels):
        Image.fromarray(img, mode="L").save(os.path.join(folder, f"{i:04d}.png"))
    n = len(TRAIN_TEMPLATES)
    for name, shifts in ((REFERENCE_SET, (0,)), (REFERENCE_SET_TWO_CAPTIONS, (0, 1))):
        lines = [json.dumps({"prompt": fill(TRAIN_TEMPLATES[(i + shift) % n], digit),
                             "image": f"{os.path.basename(folder)}/{i:04d}.png", "digit": digit})
                 for i, digit in enumerate(y_tr.tolist()) for shift in shifts]
        with open(os.path.join(out_dir, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return os.path.join(out_dir, REFERENCE_SET)


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def prompt_accuracy(policy, classifier, prompts: Sequence[str], num_per_prompt: int = 50, seed: int = 0,
                    num_steps: Optional[int] = None, return_confidence: bool = False):
    """Fraction of ODE samples whose classifier argmax is the prompted digit: ``num_per_prompt`` images per
    prompt, prompt-major, image i seeded ``seed + i`` (:func:`genalign.sampling.expand_jobs`).

    classifier: a ``DigitClassifier`` (or a ``DigitCorrectReward``, whose classifier is used).
    With ``return_confidence`` also returns the mean max-probability (a digit-likeness proxy).
    """
    from genalign.sampling import expand_jobs, sample_images

    clf = getattr(classifier, "classifier", classifier)
    jobs, seeds = expand_jobs(prompts, num_per_prompt, seed)
    images = sample_images(policy, jobs, seeds, num_steps or policy.num_steps, batch_size=1024)
    target = torch.tensor([prompt_digit(p) for p in prompts for _ in range(num_per_prompt)])
    probs = clf.classify(images.to(next(clf.parameters()).device)).softmax(-1).cpu()
    acc = (probs.argmax(-1) == target).float().mean().item()
    return (acc, probs.max(-1).values.mean().item()) if return_confidence else acc


# ---------------------------------------------------------------------------------------------- entry points
def pretrain(out_dir: str, seed: int = 0, generator_steps: int = 4000, classifier_epochs: int = 20,
             label_noise: float = 0.4, guidance_scale: float = DEFAULT_SAMPLING["guidance_scale"],
             num_steps: int = DEFAULT_SAMPLING["num_steps"], patch_size: int = 4, num_layers: int = 3,
             attention_head_dim: int = 16, log=print) -> dict:
    """Train classifier + generator and write the asset directory ``out_dir``; returns the metrics."""
    start = time.time()
    x_tr, y_tr, x_te, y_te = load_split()
    classifier, clf_acc = train_classifier(x_tr, y_tr, x_te, y_te, seed=seed, epochs=classifier_epochs, log=log)
    transformer, encoder = train_generator(x_tr, y_tr, seed=seed, steps=generator_steps, label_noise=label_noise,
                                           patch_size=patch_size, num_layers=num_layers,
                                           attention_head_dim=attention_head_dim, log=log)
    config = {**DEFAULT_SAMPLING, "num_steps": num_steps, "guidance_scale": guidance_scale,
              "schedule": "uniform sigmas linspace(1, 0, num_steps + 1), timesteps = 1000 * sigma",
              "pretrain": {"seed": seed, "generator_steps": generator_steps, "label_noise": label_noise,
                           "classifier_epochs": classifier_epochs, "patch_size": patch_size,
                           "num_layers": num_layers, "attention_head_dim": attention_head_dim,
                           "torch_threads": torch.get_num_threads()}}
    policy = DigitsPolicy(transformer, encoder, config)
    policy.save_pretrained(out_dir)
    classifier.save_pretrained(out_dir, extra={"held_out_accuracy": clf_acc, "input": "[N,1,8,8] in [-1,1]"})
    train_prompts, eval_prompts = prompt_list(TRAIN_TEMPLATES), prompt_list(EVAL_TEMPLATES)
    for name, prompts in (("prompts_train.txt", train_prompts), ("prompts_eval.txt", eval_prompts)):
        with open(os.path.join(out_dir, name), "w") as f:
            f.write("\n".join(prompts) + "\n")
    write_reference_set(out_dir)
    metrics = evaluate_assets(policy, classifier, seed=seed)
    metrics["classifier_held_out_accuracy"] = round(clf_acc, 4)
    metrics["pretrain_seconds"] = round(time.time() - start, 1)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    log(json.dumps(metrics, indent=1))
    return metrics


def evaluate_assets(policy, classifier, seed: int = 0) -> dict:
    """The ``metrics.json`` numbers for a policy at its default sampling settings (ODE)."""
    _, _, x_te, y_te = load_split()
    train_prompts, eval_prompts = prompt_list(TRAIN_TEMPLATES), prompt_list(EVAL_TEMPLATES)
    default = policy.guidance_scale
    acc, conf = prompt_accuracy(policy, classifier, eval_prompts, 100, seed=seed, return_confidence=True)
    metrics = {
        "classifier_held_out_accuracy": round((classifier(x_te).argmax(-1) == y_te).float().mean().item(), 4),
        "base_prompt_accuracy": round(acc, 4),
        "base_prompt_accuracy_settings": {"prompts": "prompts_eval.txt", "num_per_prompt": 100, "seed": seed,
                                          "num_steps": policy.num_steps, "guidance_scale": default,
                                          "sampler": "ODE, image i seeded seed + i (genalign.sampling)"},
        "base_prompt_accuracy_train_prompts": round(prompt_accuracy(policy, classifier, train_prompts, 50,
                                                                    seed=seed), 4),
        "accuracy_by_guidance_scale": {},
        "mean_max_prob_generated": round(conf, 4),
        "mean_max_prob_real_held_out": round(classifier(x_te).softmax(-1).max(-1).values.mean().item(), 4),
    }
    for g in (0.5, 1.0, 1.5, 2.0, 3.0):
        policy.guidance_scale = g
        metrics["accuracy_by_guidance_scale"][str(g)] = round(prompt_accuracy(policy, classifier, eval_prompts, 50,
                                                                              seed=seed), 4)
    policy.guidance_scale = default
    return metrics


def measure(out_dir: str, log=print) -> dict:
    """Recompute ``metrics.json`` of the asset directory ``out_dir`` (``--measure-only``): the sampling-dependent
    numbers of :func:`evaluate_assets` with the pretraining seed from ``policy.json``, keeping every other field
    (e.g. ``pretrain_seconds``); the model files are only read."""
    from genalign.rewards.digits import DigitClassifier

    policy = DigitsPolicy.from_pretrained(out_dir, device="cpu")
    classifier = DigitClassifier.from_pretrained(out_dir)
    with open(os.path.join(out_dir, "policy.json")) as f:
        seed = json.load(f).get("pretrain", {}).get("seed", 0)
    path = os.path.join(out_dir, "metrics.json")
    old = {}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    metrics = {**old, **evaluate_assets(policy, classifier, seed=seed)}
    with open(path, "w") as f:
        json.dump(metrics, f, indent=1)
    log(json.dumps(metrics, indent=1))
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``genalign pretrain-digits --out DIR [--seed S] [--measure-only]``."""
    parser = argparse.ArgumentParser(prog="genalign pretrain-digits",
                                     description="Train the embedded digits generator and classifier reward.")
    parser.add_argument("--out", required=True, help="output asset directory (e.g. assets/digits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generator-steps", type=int, default=4000)
    parser.add_argument("--label-noise", type=float, default=0.4, help="fraction of prompts naming a random digit")
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_SAMPLING["guidance_scale"],
                        help="default CFG scale written to policy.json")
    parser.add_argument("--patch-size", type=int, default=4, choices=(1, 2, 4, 8),
                        help="transformer patch size: 4 = the shipped model (4 image tokens); 2 = 16 tokens, a closer "
                             "fit at about 2x the cost (README, 'Aligning without collapse')")
    parser.add_argument("--num-layers", type=int, default=3, help="transformer blocks (shipped: 3)")
    parser.add_argument("--attention-head-dim", type=int, default=16,
                        help="width per head; 4 heads, so the width is 4x this (shipped: 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--measure-only", action="store_true",
                        help="do not train: recompute DIR/metrics.json for the assets already in --out")
    parser.add_argument("--reference-set-only", action="store_true",
                        help=f"do not train: write the real-digit reference data sets ({REFERENCE_SET}, {REFERENCE_SET_TWO_CAPTIONS}; for "
                             f"data.anchor_file) into --out")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reference_set_only:
        print(f"wrote {write_reference_set(args.out)}")
        return 0
    if args.measure_only:
        measure(args.out)
        return 0
    pretrain(args.out, seed=args.seed, generator_steps=args.generator_steps, label_noise=args.label_noise,
             guidance_scale=args.guidance_scale, patch_size=args.patch_size, num_layers=args.num_layers,
             attention_head_dim=args.attention_head_dim)
    return 0
