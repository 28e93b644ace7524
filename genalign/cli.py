"""``genalign`` command line: train, sample, grid, eval, plot, pretrain-digits, config."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _cmd_train(args) -> int:
    from .config import load_config
    from .trainer import Trainer

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not os.path.isfile(config):  # only overrides, no config file
        config, overrides = None, [config] + overrides
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    metrics = trainer.train()
    if trainer.is_main:  # other processes return no metrics: print nothing there
        summary = {k: v for k, v in metrics.items() if k.startswith(("eval/", "reward/mean", "epoch", "samples_seen"))}
        print(json.dumps(summary, indent=1))
    return 0


DRY_RUN_PROCESSES = (1, 2, 4, 8)
"""Process counts whose batch arithmetic ``genalign config CONFIG`` prints."""


def _check_config_files(cfg) -> List[str]:
    """Dry-run checks that load nothing: the prompt files are read (``digits:`` / ``prompts:`` assets resolved),
    each reward is a registered name or an existing ``file.py:function`` script (not imported: that would run
    it). Returns the '# ...' summary lines."""
    from .prompts import run_prompt_records
    from .reward_api import available_rewards

    train, held = run_prompt_records(cfg)
    lines = [f"# prompts_file: {len(train)} prompts" + (" (after eval_split)" if cfg.eval_split else "")]
    if held:
        lines.append(f"# {'eval_split' if cfg.eval_split else 'eval_prompts_file'}: {len(held)} prompts")
    names = list(cfg.reward) if isinstance(cfg.reward, dict) else [cfg.reward]
    for name in names:
        if not isinstance(name, str):
            continue
        if ".py:" in name:
            if not os.path.isfile(name.split(".py:", 1)[0] + ".py"):
                raise FileNotFoundError(f"reward script of {name!r} does not exist")
        elif name not in available_rewards():
            raise ValueError(f"unknown reward {name!r}; registered rewards: {available_rewards()} "
                             f"(or give 'path/to/file.py:function')")
    return lines


def _batch_arithmetic(cfg) -> List[str]:
    """The derived batch arithmetic (module docstring of :mod:`genalign.config`) for DRY_RUN_PROCESSES, as
    '# ...' lines; a process count the config does not divide is marked invalid with the reason."""
    from .config import ConfigError

    s, t, n = cfg.sampling, cfg.train, cfg.samples_per_epoch
    lines = [f"# batch arithmetic: {s.groups_per_epoch} groups x {s.group_size} images = {n} samples per epoch; "
             f"{t.num_minibatches} minibatches x {t.num_inner_epochs} inner epochs = "
             f"{t.num_minibatches * t.num_inner_epochs} optimizer steps per epoch",
             "# processes | valid | samples per process | rollout batches per process | optimizer steps per epoch "
             "| micro-batches per optimizer step (per process)"]
    for ws in DRY_RUN_PROCESSES:
        try:
            cfg.validate(ws)
        except ConfigError as exc:
            lines.append(f"# {ws} | no: {exc}")
            continue
        lines.append(f"# {ws} | yes | {n // ws} | {n // (ws * s.batch_size)} x {s.batch_size} | "
                     f"{t.num_minibatches * t.num_inner_epochs} | "
                     f"{n // (t.num_minibatches * ws * t.batch_size)} x {t.batch_size}")
    return lines


def _cmd_config(args) -> int:
    """``genalign config``: every key with its default and documentation. ``genalign config CONFIG [key=value
    ...]``: a dry run that loads no model: the merged config, validated for one process, as YAML, then (as
    YAML comments) the prompt counts and the batch arithmetic for 1, 2, 4 and 8 processes."""
    import yaml

    from .config import describe, load_config, to_dict

    config, overrides = args.config, list(args.overrides)
    if config is None and not overrides:
        print("\n".join(describe()))
        return 0
    if config is not None and "=" in config and not os.path.isfile(config):  # only overrides, no config file
        config, overrides = None, [config] + overrides
    cfg = load_config(config, overrides)
    cfg.validate(1)
    notes = _check_config_files(cfg)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None).rstrip())
    print("\n".join(notes + _batch_arithmetic(cfg)))
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
    conditioning = None
    if args.prompts_file:  # a .jsonl record's negative prompt / condition image goes to the model
        from .prompts import read_prompt_records

        conditioning = [r.get("conditioning") for r in read_prompt_records(args.prompts_file)]
    out = sample_to_dir(args.model, prompts, args.num_per_prompt, args.seed, args.out, args.lora, args.steps,
                        args.guidance_scale, args.batch_size, args.device, rlg=args.rlg, dtype=args.dtype,
                        conditioning=conditioning, **_size_kwargs(args))
    print(f"wrote {len(prompts) * args.num_per_prompt} images and manifest.jsonl to {out}")
    return 0


def _cmd_pretrain_digits(args) -> int:
    from .plugins import load_command

    return load_command("pretrain-digits")(args.rest) or 0


def _cmd_grid(args) -> int:
    from .grid import make_grid

    data = make_grid(args.model, _prompts(args), args.seeds, args.out, args.lora, args.rewards, args.rlg, args.steps,
                     args.guidance_scale, args.device, args.batch_size, dtype=args.dtype,
                     reward_options=args.reward_options, **_size_kwargs(args))
    html_path = os.path.splitext(args.out)[0] + ".html"
    print(f"wrote {len(data.rows)} rows x {len(data.columns)} columns "
          f"({', '.join(c.label for c in data.columns)}) to {args.out} and {html_path}")
    return 0


def _run_config(path: str):
    """A run's config: ``RUN/config.json`` (given the run directory or the file) or any config YAML."""
    from .config import load_config

    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    return load_config(path)


def eval_settings(args) -> dict:
    """``genalign eval``'s settings: each flag given, else the ``--config`` run's value (the evaluation of a
    training run: ``eval_prompts_file``, ``eval.num_per_prompt``, ``eval.seed``, ``eval.num_steps`` or
    ``sampling.num_steps``, ``sampling.batch_size``, ``reward`` and ``reward_options``, ``model.*`` and
    ``mixed_precision``), else the defaults (the LoRA's base model from its ``base_model.json``, else digits;
    8 per prompt, seed 0, the model's steps, batch 32). ``--reward-options`` replaces the run's
    ``reward_options``; ``--height`` / ``--width`` / ``--dtype`` override ``model.*``."""
    from .prompts import read_prompt_records, run_prompt_records

    cfg = _run_config(args.config) if args.config else None

    def pick(flag, from_cfg, default):
        return flag if flag is not None else (from_cfg() if cfg is not None else default)

    metadata = conditioning = None
    if args.prompts_file or args.prompt:
        prompts = _prompts(args)
        if args.prompts_file:
            records = read_prompt_records(args.prompts_file)
            metadata, conditioning = [r["metadata"] for r in records], [r.get("conditioning") for r in records]
    elif cfg is not None and (cfg.eval_prompts_file or cfg.eval_split):
        records = run_prompt_records(cfg)[1]
        prompts, metadata = [r["prompt"] for r in records], [r["metadata"] for r in records]
        conditioning = [r.get("conditioning") for r in records]
    else:
        raise SystemExit("genalign eval: give --prompts-file FILE, --prompt TEXT or --config RUN/config.json "
                         "(with eval_prompts_file set)")
    rewards = args.rewards or (cfg.reward if cfg is not None else None)
    if not rewards:
        raise SystemExit("genalign eval: give --rewards NAME ... or --config RUN/config.json")
    m = cfg.model if cfg is not None else None
    reward_options = args.reward_options
    if reward_options is None:
        reward_options = cfg.reward_options if cfg is not None and not args.rewards else None
    return {
        "model": pick(args.model, lambda: m.id, None), "prompts": prompts, "metadata": metadata,
        "conditioning": conditioning, "rewards": rewards,
        "reward_options": reward_options,
        "num_per_prompt": pick(args.num_per_prompt, lambda: cfg.eval.num_per_prompt, 8),
        "seed": pick(args.seed, lambda: cfg.eval.seed, 0),
        "num_steps": pick(args.steps, lambda: cfg.eval.num_steps or cfg.sampling.num_steps, None),
        "guidance_scale": pick(args.guidance_scale, lambda: m.guidance_scale, None),
        "device": pick(args.device, lambda: m.device, None),
        "batch_size": pick(args.batch_size, lambda: cfg.sampling.batch_size, 32),
        "dtype": args.dtype or (m.dtype if m is not None else None),
        "mixed_precision": cfg.mixed_precision if cfg is not None else "no",
        "model_kwargs": {**(m.policy_kwargs() if m is not None else {}), **_eval_size(cfg), **_size_kwargs(args)},
        "judge": not args.no_judge and (cfg.eval.judge if cfg is not None else True),
        "judge_encoder": args.judge_encoder or (cfg.eval.judge_encoder if cfg is not None else None),
        "judge_references": args.judge_references or (cfg.eval.judge_references if cfg is not None else None),
        "judge_options": cfg.eval.judge_options if cfg is not None else None,
    }


def _cmd_eval(args) -> int:
    from .evaluate import evaluate, to_markdown, write_eval

    settings = eval_settings(args)
    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch / torchrun: share the images
        import torch
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=settings["mixed_precision"])
        settings["device"] = settings["device"] or str(accelerator.device)
    baseline = args.baseline_lora or args.baseline
    result = evaluate(settings.pop("model"), settings.pop("prompts"), settings.pop("rewards"),
                      lora=args.lora, baseline=baseline, resamples=args.resamples, accelerator=accelerator,
                      config=args.config, **settings)
    if accelerator is not None and not accelerator.is_main_process:
        return 0
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


def _eval_size(cfg) -> dict:
    """A run's evaluation resolution (``eval.height`` / ``eval.width``), which ``genalign eval --config`` uses."""
    if cfg is None:
        return {}
    return {k: getattr(cfg.eval, k) for k in ("height", "width") if getattr(cfg.eval, k)}


def _size_kwargs(args) -> dict:
    """``{"height": ..., "width": ...}`` for the flags given."""
    return {k: getattr(args, k) for k in ("height", "width") if getattr(args, k, None)}


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{reward: {{option: value}}}}, got {text!r}")
    return value


def _add_reward_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reward-options", type=_json_object, default=None, metavar="JSON",
                   help="per-reward options as the config key reward_options, e.g. "
                        "'{\"pickscore\": {\"device\": \"cuda\"}}'")


def _add_model_args(p: argparse.ArgumentParser, prompt_help: str = "a prompt (repeatable)") -> None:
    p.add_argument("--model", default=None,
                   help="'digits', a hub id or a local diffusers directory (default: the base model in the "
                        "LoRA's base_model.json, else digits)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype of the model (LoRA weights stay float32; default: the model's as loaded)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line ('digits:NAME' = a shipped list)")
    p.add_argument("--prompt", action="append", default=[], help=prompt_help)
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the model's)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genalign", description="Align diffusion / flow image generators with rewards.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of known errors (otherwise one line: genalign CMD: error: ...)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="align a model: genalign train CONFIG [key=value ...]")
    p.add_argument("config", nargs="?", default=None, help="YAML config (e.g. configs/digits.yaml); omitted = defaults")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 reward=my.py:score")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an output_dir that holds a previous run, deleting its metrics, "
                        "checkpoints and final weights (without it, or --resume, such a directory is refused)")
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
    _add_reward_options(p)
    p.set_defaults(func=_cmd_grid)

    p = sub.add_parser("eval", help="reward means, bootstrap CIs and paired win rates (eval.json, eval.md)")
    _add_model_args(p)
    p.add_argument("--config", default=None, metavar="RUN/config.json",
                   help="take every setting not given as a flag from a run's config (its run directory or "
                        "config.json, or a config YAML): prompts, reward, images per prompt, seed, steps, batch "
                        "size, model and mixed precision of its evaluation, so the result's metrics reproduce "
                        "the run's eval/* numbers")
    p.add_argument("--lora", default=None, help=f"the checkpoint to evaluate: {lora_help} (default: the base model)")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--baseline-lora", default=None, help="compare against this LoRA (paired, same seeds)")
    base.add_argument("--baseline", choices=["base"], default=None, help="compare against the base model")
    p.add_argument("--rewards", nargs="+", default=None,
                   help="reward names or file.py:function specs (weight 1 each; default: the --config run's reward)")
    p.add_argument("--num-per-prompt", type=int, default=None, help="images per prompt (default 8, or the config's)")
    p.add_argument("--seed", type=int, default=None,
                   help="image i uses seed SEED + i, checkpoint and baseline alike (default 0, or eval.seed)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (fixed seed 0)")
    _add_reward_options(p)
    p.add_argument("--no-judge", action="store_true", help="skip the independent realism / diversity judge")
    p.add_argument("--judge-encoder", default=None,
                   help="judge with this image encoder (dino, clip, digits) against --judge-references "
                        "(default: the run's eval.judge_encoder, else the model adapter's own judge)")
    p.add_argument("--judge-references", default=None, help="directory of reference images for --judge-encoder")
    p.add_argument("--out", required=True, help="directory for eval.json and eval.md")
    p.set_defaults(model=None, batch_size=None)  # resolved by eval_settings (flag, else --config, else default)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="learning curves of a run's metrics.jsonl")
    p.add_argument("run_dir", help="a run directory or a metrics.jsonl file")
    p.add_argument("--keys", nargs="+", default=None, help="metric keys or globs (default: reward/mean and eval/*)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("pretrain-digits", help="train the shipped digits model and classifier from scratch")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="--out DIR [--seed S]")
    p.set_defaults(func=_cmd_pretrain_digits)

    p = sub.add_parser("config", help="list every config key (no CONFIG), or dry-run CONFIG: the merged, validated "
                                      "config and its batch arithmetic for 1, 2, 4, 8 processes (loads no model)")
    p.add_argument("config", nargs="?", default=None, help="YAML config to dry-run; omitted = list every key")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampling.batch_size=8")
    p.set_defaults(func=_cmd_config)

    return parser


def _known_errors():
    """``(input errors -> exit 2, run errors -> exit 1)``: errors whose message says what to do, printed as
    one line; anything else is a bug and keeps its traceback."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .optim import NonFiniteError
    from .plugins import PluginError
    from .policy import ModelNotAvailableError
    from .reward_api import RewardError

    return ((ConfigError, FileNotFoundError, ValueError, ModelNotAvailableError, PluginError),
            (CheckpointError, RewardError, NonFiniteError))


def main(argv: Optional[List[str]] = None) -> int:
    """The ``genalign`` command. Known errors (a bad config, a missing model or file, no checkpoint to resume,
    a failing reward, a non-finite loss) print one line ``genalign CMD: error: ...`` and exit 2 (bad input) or
    1 (the run failed); ``genalign --debug CMD ...`` shows their traceback instead."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "pretrain-digits":  # its options belong to the command: pass them through in order
        argv = list(sys.argv[1:] if argv is None else argv)
        args.rest = [a for a in argv[argv.index("pretrain-digits") + 1:] if a != "--"]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    bad_input, failed = _known_errors()
    try:
        return args.func(args)
    except (*bad_input, *failed) as exc:
        if args.debug:
            raise
        print(f"genalign {args.command}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, bad_input) and not isinstance(exc, failed) else 1


if __name__ == "__main__":
    sys.exit(main())
