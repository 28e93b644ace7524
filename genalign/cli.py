"""``genalign`` command line: train, sample, grid, eval, plot, pretrain-digits, config."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


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


def _prompts(args) -> List[str]:
    from .prompts import read_prompts

    prompts = read_prompts(args.prompts_file) if args.prompts_file else list(args.prompt)
    if not prompts:
        raise SystemExit(f"genalign {args.command}: give --prompts-file FILE or --prompt TEXT")
    return prompts


def _cmd_sample(args) -> int:
    from .sampling import sample_to_dir

    prompts = _prompts(args)
    out = sample_to_dir(args.model, prompts, args.num_per_prompt, args.seed, args.out, args.lora, args.steps,
                        args.guidance_scale, args.batch_size, args.device, rlg=args.rlg)
    print(f"wrote {len(prompts) * args.num_per_prompt} images and manifest.jsonl to {out}")
    return 0


def _cmd_pretrain_digits(args) -> int:
    from .digits import main as digits_main

    return digits_main(args.rest) or 0


def _cmd_grid(args) -> int:
    from .grid import make_grid

    data = make_grid(args.model, _prompts(args), args.seeds, args.out, args.lora, args.rewards, args.rlg, args.steps,
                     args.guidance_scale, args.device, args.batch_size)
    html_path = os.path.splitext(args.out)[0] + ".html"
    print(f"wrote {len(data.rows)} rows x {len(data.columns)} columns "
          f"({', '.join(c.label for c in data.columns)}) to {args.out} and {html_path}")
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import evaluate, to_markdown, write_eval

    baseline = args.baseline_lora or args.baseline
    result = evaluate(args.model, _prompts(args), args.rewards, args.num_per_prompt, args.seed, args.lora, baseline,
                      args.steps, args.guidance_scale, args.device, args.batch_size, args.resamples)
    json_path, _ = write_eval(result, args.out)
    print(to_markdown(result).split("\n## ")[0])
    print(f"wrote {json_path} and eval.md")
    return 0


def _cmd_plot(args) -> int:
    from .plots import plot_metrics

    run_dir = args.run_dir if os.path.isdir(args.run_dir) else os.path.dirname(args.run_dir) or "."
    out = args.out or os.path.join(run_dir, "curves.png")
    plot_metrics(args.run_dir, out, args.keys or None)
    print(f"wrote {out}")
    return 0


def _add_model_args(p: argparse.ArgumentParser, prompt_help: str = "a prompt (repeatable)") -> None:
    p.add_argument("--model", default="digits", help="'digits', a hub id or a local diffusers directory")
    p.add_argument("--prompts-file", default=None, help="one prompt per line ('digits:NAME' = a shipped list)")
    p.add_argument("--prompt", action="append", default=[], help=prompt_help)
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the model's)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genalign", description="Align diffusion / flow image generators with rewards.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="align a model: genalign train CONFIG [key=value ...]")
    p.add_argument("config", nargs="?", default=None, help="YAML config (e.g. configs/digits.yaml); omitted = defaults")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 reward=my.py:score")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.set_defaults(func=_cmd_train)

    lora_help = "a LoRA directory, a checkpoint or a run directory"
    p = sub.add_parser("sample", help="generate images (PNG + manifest.jsonl)")
    _add_model_args(p)
    p.add_argument("--num-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--lora", default=None, help=lora_help)
    p.add_argument("--rlg", type=float, default=None, metavar="W",
                   help="alignment strength: v_base + W (v_lora - v_base); 0 = base, 1 = the LoRA (needs --lora)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("grid", help="comparison grid: rows = prompts x seeds, columns = checkpoints / RLG strengths")
    _add_model_args(p)
    p.add_argument("--lora", action="append", default=[], help=f"{lora_help} (repeatable: one column each)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per prompt (same noise in every column)")
    p.add_argument("--rewards", nargs="*", default=[], help="rewards captioned under each image, e.g. digit_correct")
    p.add_argument("--rlg", type=float, nargs="*", default=[], metavar="W",
                   help="RLG strengths: one extra column per LoRA and strength")
    p.add_argument("--out", required=True, help="grid PNG; the HTML page goes next to it (same basename)")
    p.set_defaults(func=_cmd_grid)

    p = sub.add_parser("eval", help="reward means, bootstrap CIs and paired win rates (eval.json, eval.md)")
    _add_model_args(p)
    p.add_argument("--lora", default=None, help=f"the checkpoint to evaluate: {lora_help} (default: the base model)")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--baseline-lora", default=None, help="compare against this LoRA (paired, same seeds)")
    base.add_argument("--baseline", choices=["base"], default=None, help="compare against the base model")
    p.add_argument("--rewards", nargs="+", required=True, help="reward names or file.py:function specs")
    p.add_argument("--num-per-prompt", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED + i (checkpoint and baseline alike)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (fixed seed 0)")
    p.add_argument("--out", required=True, help="directory for eval.json and eval.md")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="learning curves of a run's metrics.jsonl")
    p.add_argument("run_dir", help="a run directory or a metrics.jsonl file")
    p.add_argument("--keys", nargs="+", default=None, help="metric keys or globs (default: reward/mean and eval/*)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("pretrain-digits", help="train the shipped digits model and classifier from scratch")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="--out DIR [--seed S]")
    p.set_defaults(func=_cmd_pretrain_digits)

    p = sub.add_parser("config", help="list every config key with its default and documentation")
    p.set_defaults(func=_cmd_config)

    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"genalign {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a failing reward or a non-finite loss: the message says what to do next
        from genalign.rewards import RewardError

        from .trainer import NonFiniteError

        if not isinstance(exc, (RewardError, NonFiniteError)):
            raise
        print(f"genalign {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
