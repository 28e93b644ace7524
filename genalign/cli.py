"""``genalign`` command line: train, sample, pretrain-digits, config (grid and eval: not yet available)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

NOT_YET = {
    "grid": "comparison grids (rows = prompts, columns = checkpoints / RLG strengths)",
    "eval": "evaluation with bootstrap confidence intervals and win rates",
}


def _cmd_train(args) -> int:
    from .config import load_config
    from .trainer import train

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not os.path.isfile(config):  # only overrides, no config file
        config, overrides = None, [config] + overrides
    cfg = load_config(config, overrides)
    metrics = train(cfg, resume=args.resume)
    summary = {k: v for k, v in metrics.items() if k.startswith(("eval/", "reward/mean", "epoch", "samples_seen"))}
    print(json.dumps(summary, indent=1))
    return 0


def _cmd_config(args) -> int:
    from .config import describe

    print("\n".join(describe()))
    return 0


def _seeded_latents(policy, seeds: List[int]):
    import torch

    return torch.cat([policy.initial_latents(1, torch.Generator(policy.device).manual_seed(s)) for s in seeds])


def sample_to_dir(model: str, prompts: List[str], num_per_prompt: int, seed: int, out: str, lora: Optional[str] = None,
                  num_steps: Optional[int] = None, guidance_scale: Optional[float] = None, batch_size: int = 32,
                  device: Optional[str] = None) -> str:
    """Generate ``num_per_prompt`` ODE samples per prompt; image i uses seed ``seed + i`` (reproducible
    one by one). Writes PNGs and ``manifest.jsonl`` lines ``{"file", "prompt", "seed"}``."""
    import torch
    from PIL import Image

    from .lora import load_lora
    from .pipelines import load_policy
    from .rollout import rollout

    policy = load_policy(model, device=device, guidance_scale=guidance_scale)
    if lora:
        load_lora(policy, lora)
    steps = num_steps or getattr(policy, "num_steps", None) or 28  # the adapter's default (digits: 10)
    jobs = [(p, seed + i) for i, p in enumerate(pp for pp in prompts for _ in range(num_per_prompt))]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "manifest.jsonl"), "w") as manifest, torch.no_grad():
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            chunk_prompts = [p for p, _ in chunk]
            latents = _seeded_latents(policy, [s for _, s in chunk])
            traj = rollout(policy, policy.encode(chunk_prompts), chunk_prompts, steps, 0.0,
                           "ddim" if policy.kind == "ddpm" else "sde", latents=latents)
            images = policy.decode(traj.final).clamp(0, 1)
            for k, ((prompt, s), img) in enumerate(zip(chunk, images)):
                name = f"{start + k:05d}.png"
                arr = (img * 255).round().byte().permute(1, 2, 0).cpu().numpy()
                Image.fromarray(arr).save(os.path.join(out, name))
                manifest.write(json.dumps({"file": name, "prompt": prompt, "seed": s}) + "\n")
    return out


def _cmd_sample(args) -> int:
    from .prompts import read_prompts

    prompts = read_prompts(args.prompts_file) if args.prompts_file else list(args.prompt)
    if not prompts:
        raise SystemExit("genalign sample: give --prompts-file FILE or --prompt TEXT")
    out = sample_to_dir(args.model, prompts, args.num_per_prompt, args.seed, args.out, args.lora, args.steps,
                        args.guidance_scale, args.batch_size, args.device)
    print(f"wrote {len(prompts) * args.num_per_prompt} images and manifest.jsonl to {out}")
    return 0


def _cmd_pretrain_digits(args) -> int:
    from .digits import main as digits_main

    return digits_main(args.rest) or 0


def _not_yet(name: str):
    def run(args) -> int:
        print(f"genalign {name}: {NOT_YET[name]} is not yet available in this version.", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genalign", description="Align diffusion / flow image generators with rewards.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="align a model: genalign train CONFIG [key=value ...]")
    p.add_argument("config", nargs="?", default=None, help="YAML config (e.g. configs/digits.yaml); omitted = defaults")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 reward=my.py:score")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", help="generate images (PNG + manifest.jsonl)")
    p.add_argument("--model", default="digits", help="'digits', a hub id or a local diffusers directory")
    p.add_argument("--prompts-file", default=None)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--num-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--lora", default=None, help="a LoRA directory, a checkpoint or a run directory")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the model's)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("pretrain-digits", help="train the shipped digits model and classifier from scratch")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="--out DIR [--seed S]")
    p.set_defaults(func=_cmd_pretrain_digits)

    p = sub.add_parser("config", help="list every config key with its default and documentation")
    p.set_defaults(func=_cmd_config)

    for name, what in NOT_YET.items():
        p = sub.add_parser(name, help=f"{what} (not yet available)")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_not_yet(name))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"genalign {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
