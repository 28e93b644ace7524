"""End-to-end cost and quality of a digits run over seeds: wall time, generated samples until the prompt accuracy
reaches 0.9 / 0.95 / 0.97, and the independent judge on 2,000 images of unseen seeds.

    python benchmarks/digits_e2e.py [--config configs/digits.yaml] [--seeds 0 1 2] [--max-epochs N] [--reuse]
        [-- overrides...]

Runs ``genalign train CONFIG seed=S`` (the default run as a user runs it: its own evaluation settings) in a subprocess
per seed, one after another (a temporary output directory unless ``--output-dir``), reads each run's ``metrics.jsonl``
(``eval/digit_correct.accuracy``, the independent judge's ``eval/fd_independent`` / ``eval/diversity_ratio`` against
``samples_seen`` and ``elapsed_s``) and judges the final weights the run evaluated (EMA ones with ``eval.use_ema``)
on 2,000 images of unseen seeds with ``benchmarks/judge_digits.py`` at the run's evaluation steps. Writes
``benchmarks/results/digits_e2e.json`` (per seed and mean / std; ``--out``). The torch thread count is torch's
default unless ``OMP_NUM_THREADS`` is set; it is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

REPO = os.path.dirname(C.HERE)
KEY = "eval/digit_correct.accuracy"


def first_reaching(rows, threshold):
    for r in rows:
        if r.get(KEY, -1) >= threshold:
            return {"epoch": r["epoch"], "samples_seen": r["samples_seen"], "elapsed_s": r.get("elapsed_s"),
                    "accuracy": r[KEY], "fd_independent": r.get("eval/fd_independent"),
                    "diversity_ratio": r.get("eval/diversity_ratio")}
    return None


def _run_config(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "config.json")) as fh:
        return json.load(fh)


def judged_weights(out_dir: str) -> str:
    """The final weights the run's own evaluations used: the EMA ones (``final/lora_ema`` or
    ``final/denoiser_ema.safetensors``) when ``eval.use_ema`` and they exist, else ``final/lora`` or
    ``final/denoiser.safetensors``."""
    final = os.path.join(out_dir, "final")
    ema = _run_config(out_dir)["eval"]["use_ema"]
    for name in (["lora_ema", "denoiser_ema.safetensors"] if ema else []) + ["lora", "denoiser.safetensors"]:
        if os.path.exists(os.path.join(final, name)):
            return os.path.join(final, name)
    raise FileNotFoundError(f"no final weights in {final}")


def judge_steps(out_dir: str) -> int:
    """The ODE steps of the run's evaluations (``eval.num_steps``, else ``sampling.num_steps``)."""
    cfg = _run_config(out_dir)
    return int(cfg["eval"]["num_steps"] or cfg["sampling"]["num_steps"])


def finished(out_dir: str) -> bool:
    """Whether ``out_dir`` holds a finished run (its ``final/`` weights exist)."""
    try:
        judged_weights(out_dir)
    except OSError:  # no config.json or no final weights
        return False
    return True


def run_seed(seed: int, out_dir: str, overrides, config: str, reuse: bool = False) -> dict:
    """One run of ``config`` (subprocess) with ``seed``, then the independent judge on 2,000 images of unseen seeds.
    With ``reuse`` a finished run already in ``out_dir`` is not trained again (its ``wall_s`` is then None: only the
    run's own ``elapsed_s`` is known) and its ``judge.json`` is read when present."""
    import judge_digits

    cmd = [sys.executable, "-m", "genalign.cli", "train", config, f"output_dir={out_dir}", f"seed={seed}", *overrides]
    reused = reuse and finished(out_dir)
    if reused:
        returncode, wall = 0, None
    else:
        env = dict(os.environ, TQDM_DISABLE="1")
        t0 = time.time()
        returncode = subprocess.run(cmd, cwd=REPO, env=env).returncode
        wall = time.time() - t0
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    evals = [{"epoch": r["epoch"], "samples_seen": r["samples_seen"], "elapsed_s": r.get("elapsed_s", 0.0),
              "accuracy": r[KEY], "fd_independent": r.get("eval/fd_independent"),
              "diversity_ratio": r.get("eval/diversity_ratio")} for r in rows if KEY in r]
    judge_path = os.path.join(out_dir, "judge.json")
    if not (reused and os.path.exists(judge_path)):
        judge_digits.main(["--lora", judged_weights(out_dir), "--num-steps", str(judge_steps(out_dir)),
                           "--out", judge_path])
    with open(judge_path) as fh:
        judged = json.load(fh)["models"]
    return {"seed": seed, "train_command": " ".join(cmd[1:]), "returncode": returncode, "wall_s": wall,
            "reused": reused,
            "train_elapsed_s": rows[-1].get("elapsed_s") if rows else None,
            "reach_0.9": first_reaching(rows, 0.9), "reach_0.95": first_reaching(rows, 0.95),
            "reach_0.97": first_reaching(rows, 0.97),
            "initial_accuracy": evals[0]["accuracy"] if evals else None,
            "final_accuracy": evals[-1]["accuracy"] if evals else None,
            "judge_2000": judged, "eval_curve": evals}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join("configs", "digits.yaml"))
    ap.add_argument("--output-dir", default=None, help="parent of the runs (default: a temporary directory)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds, run one after another")
    ap.add_argument("--max-epochs", type=int, default=None, help="override num_epochs (default: the config's)")
    ap.add_argument("--out", default="digits_e2e.json", help="file name of the result under benchmarks/results")
    ap.add_argument("--reuse", action="store_true",
                    help="do not retrain a seed whose finished run is already in --output-dir (e.g. after an "
                         "interruption); its wall time is then unknown and only its run-measured elapsed_s counts")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if os.path.basename(args.out) != args.out or not args.out:  # checked before hours of runs, not after
        ap.error(f"--out takes a file name under benchmarks/results, got {args.out!r}")
    parent = args.output_dir or tempfile.mkdtemp(prefix="genalign_digits_e2e_")
    overrides = list(args.overrides) + ([f"num_epochs={args.max_epochs}"] if args.max_epochs else [])
    config = os.path.join(REPO, args.config) if not os.path.isabs(args.config) else args.config
    seeds = [run_seed(seed, os.path.join(parent, f"seed{seed}"), overrides, config, args.reuse) for seed in args.seeds]
    summary = {key: C.mean_std([r["judge_2000"]["tuned"][key] for r in seeds])
               for key in ("accuracy", "fd_independent", "diversity_ratio", "vendi")}
    summary["wall_s"] = C.mean_std([r["wall_s"] for r in seeds])
    summary["train_elapsed_s"] = C.mean_std([r["train_elapsed_s"] for r in seeds])
    for t in ("0.9", "0.95", "0.97"):
        summary[f"samples_to_{t}"] = C.mean_std([(r[f"reach_{t}"] or {}).get("samples_seen") for r in seeds])
        summary[f"seconds_to_{t}"] = C.mean_std([(r[f"reach_{t}"] or {}).get("elapsed_s") for r in seeds])
    base = seeds[0]["judge_2000"]["base"]
    threads = os.environ.get("OMP_NUM_THREADS")
    result = {"command": (f"OMP_NUM_THREADS={threads} " if threads else "") + "python benchmarks/digits_e2e.py "
                         f"--config {args.config} --seeds " + " ".join(map(str, args.seeds))
                         + (" --reuse" if args.reuse else "")
                         + (" -- " + " ".join(overrides) if overrides else ""),
              "config": args.config,
              "machine": C.machine("cpu"), "base_2000": base, "summary": summary, "seeds": seeds,
              "notes": "runs one after another with nothing else running; elapsed_s is measured inside the run from "
                       "the start of Trainer.train (evaluations included); samples_seen counts training rollouts "
                       "only; judge_2000: benchmarks/judge_digits.py on the final weights the run evaluated (2,000 "
                       "images, seed 777, seeds not used in training, the run's evaluation steps)"}
    print(json.dumps(summary, indent=1))
    print("wrote", C.write_json(args.out, result))
    return 0 if all(r["returncode"] == 0 for r in seeds) else 1


if __name__ == "__main__":
    sys.exit(main())
