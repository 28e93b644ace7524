"""Collect the evaluation curves of finished or stopped runs into one JSON file (for levers tried by hand with
``genalign train ... overrides``, e.g. the wide-model levers of the README's "The default run").

    python benchmarks/collect_evals.py --out NAME.json --note "how they ran" NAME=RUN_DIR[:OVERRIDES] ...
    python benchmarks/collect_evals.py --out NAME.json --append NAME=RUN_DIR[:OVERRIDES] ...   # add runs

(written to benchmarks/results/NAME.json).

Per run: the overrides as given (text), every evaluation row of ``RUN_DIR/metrics.jsonl`` (epoch, images,
accuracy, independent FD, diversity ratio, Vendi, hacking flag) and, where ``RUN_DIR/judge.json`` exists (written by
``benchmarks/judge_digits.py --out RUN_DIR/judge.json``), the judged final weights as ``judge_2000``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

KEYS = {"accuracy": "eval/digit_correct.accuracy", "fd_independent": "eval/fd_independent",
        "diversity_ratio": "eval/diversity_ratio", "vendi": "eval/vendi", "hacking_flag": "hacking/flag"}


def curve(run_dir: str) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [{"epoch": r["epoch"], "samples_seen": r.get("samples_seen"),
             **{k: r.get(v) for k, v in KEYS.items()}} for r in rows if KEYS["accuracy"] in r]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR[:OVERRIDES]")
    ap.add_argument("--out", required=True)
    ap.add_argument("--note", default="")
    ap.add_argument("--append", action="store_true",
                    help="keep the runs (and, without --note, the note) already in --out; same-named runs are replaced")
    args = ap.parse_args(argv)
    runs, note = {}, args.note
    path = os.path.join(C.RESULTS, args.out)
    if args.append and os.path.isfile(path):
        with open(path) as fh:
            old = json.load(fh)
        runs, note = old["runs"], args.note or old.get("note", "")
    for item in args.runs:
        name, sep, rest = item.partition("=")
        if not sep:
            ap.error(f"expected NAME=RUN_DIR[:OVERRIDES], got {item!r}")
        run_dir, _, overrides = rest.partition(":")
        runs[name] = {"run_dir": run_dir, "overrides": overrides, "evals": curve(run_dir)}
        judged = os.path.join(run_dir, "judge.json")
        if os.path.isfile(judged):
            with open(judged) as fh:
                report = json.load(fh)
            runs[name]["judge_2000"] = {"settings": report["settings"], **report["models"]}
    print("wrote", C.write_json(args.out, {"note": note, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
