"""The README's result tables, generated from the benchmark JSON files (never typed by hand).

Each table sits in README.md between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; ``--write`` replaces
those blocks, without it the script prints the tables. ``tests/test_docs.py`` checks that the README holds exactly
what this script generates from the JSON files in ``benchmarks/results/``.

Tables: ``digits_default`` (the default run over seeds, ``digits_e2e.json``), ``digits_flow_grpo`` (Flow-GRPO on the
small base over seeds, ``digits_flow_grpo_e2e.json``), ``compare_digits`` (methods over seeds, ``compare_digits.json``), ``ablation_digits`` (levers against
reward hacking, ``ablation_digits.json``), ``tilt_digits`` (what reweighting the base reaches,
``tilt_digits.json``), the same two for the patch-2 base evaluated with 40 ODE steps (``tilt_digits_p2``,
``ablation_digits_p2``), and ``oracle_digits`` (generators trained on correct captions, ``oracle_digits.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Dict, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(os.path.dirname(HERE), "README.md")


def _load(name: str) -> Optional[dict]:
    path = os.path.join(RESULTS, name)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _pm(summary: dict, key: str, fmt: str) -> str:
    """``mean ± std`` over seeds (``n/m`` when only n of m seeds have a value, "-" when none has)."""
    s = summary.get(key)
    if not s or s["mean"] is None:
        return "-"
    values = s["values"]
    known = sum(v is not None for v in values)
    text = f"{s['mean']:{fmt}}" + (f" ± {s['std']:{fmt}}" if len(values) > 1 else "")
    return text + (f" ({known}/{len(values)} seeds)" if known < len(values) else "")


def _base_line(results: dict, tail: str) -> str:
    """The base model's first evaluation (shared by every run) as a sentence, then ``tail``."""
    b = next(iter(results["methods"].values()))["seeds"][0]["curve"][0]
    return (f"\nBase: accuracy {b['accuracy']:.3f}, independent FD {b['fd_independent']:.3f}, diversity ratio "
            f"{b['diversity_ratio']:.2f}{tail}")


def compare_table(results: dict) -> str:
    targets = (0.9, 0.95)
    head = ("| method | " + " | ".join(f"images to {t} | seconds to {t}" for t in targets)
            + " | FD at 0.9 | diversity at 0.9 | final accuracy | final FD | final diversity |")
    lines = [head, "|" + "---|" * head.count(" |")]
    for name, m in results["methods"].items():
        s = m["summary"]
        cells = []
        for t in targets:
            cells += [_pm(s, f"samples_to_{t}", ",.0f"), _pm(s, f"seconds_to_{t}", ".0f")]
        cells += [_pm(s, "fd_independent_at_0.9", ".3f"), _pm(s, "diversity_at_0.9", ".2f"),
                  _pm(s, "final_accuracy", ".3f"), _pm(s, "final_fd_independent", ".3f"),
                  _pm(s, "final_diversity_ratio", ".2f")]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    seeds = len(next(iter(results["methods"].values()))["seeds"])
    lines.append(_base_line(results, f"; {seeds} seeds per method, {results['budget_images']:,} images per run."))
    return "\n".join(lines)


def ablation_table(results: dict) -> str:
    head = ("| lever | final accuracy | final FD | final diversity | images to 0.97 | FD at 0.97 | diversity at 0.97 "
            "| best accuracy within the judge's bounds (images) | seconds |")
    lines = [head, "|" + "---|" * head.count(" |")]
    for name, m in results["methods"].items():
        s = m["summary"]
        best = _pm(s, "best_ok_accuracy", ".3f")
        if best != "-":
            best += f" ({_pm(s, 'best_ok_samples', ',.0f')})"
        lines.append(f"| `{name}` | " + " | ".join([
            _pm(s, "final_accuracy", ".3f"), _pm(s, "final_fd_independent", ".3f"),
            _pm(s, "final_diversity_ratio", ".2f"), _pm(s, "samples_to_0.97", ",.0f"),
            _pm(s, "fd_independent_at_0.97", ".3f"), _pm(s, "diversity_at_0.97", ".2f"), best,
            _pm(s, "train_s", ".0f")]) + " |")
    lines.append(_base_line(results, f". Judge's bounds: FD at most {1 + results['max_fd_rise']:.2f}x the base's and "
                                     f"diversity ratio at least {results['min_diversity_ratio']:.2f}."))
    return "\n".join(lines)


def tilt_table(results: dict) -> str:
    lines = ["| weighting of the base | accuracy | FD | diversity ratio | Vendi |", "|---|---|---|---|---|"]
    for name, r in results["weightings"].items():
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['fd_independent']:.3f} | {r['diversity_ratio']:.3f} | "
                     f"{r['vendi']:.1f} |")
    return "\n".join(lines)


def default_table(results: dict, label: str = "default run") -> str:
    """A digits run over seeds (``digits_e2e.json``: the default run; ``digits_flow_grpo_e2e.json``: Flow-GRPO on the
    small base): the 2,000-image independent judge of the final weights."""
    s, base = results["summary"], results["base_2000"]
    n = len(results["seeds"])

    def pm(key, fmt):
        return _pm(s, key, fmt)

    lines = ["| model | accuracy | independent FD | diversity ratio | Vendi | images to 0.9 / 0.95 / 0.97 | wall s |",
             "|---|---|---|---|---|---|---|",
             f"| base | {base['accuracy']:.3f} | {base['fd_independent']:.3f} | {base['diversity_ratio']:.2f} | "
             f"{base['vendi']:.1f} | | |",
             f"| {label} ({n} seeds) | {pm('accuracy', '.3f')} | {pm('fd_independent', '.3f')} | "
             f"{pm('diversity_ratio', '.2f')} | {pm('vendi', '.1f')} | {pm('samples_to_0.9', ',.0f')} / "
             f"{pm('samples_to_0.95', ',.0f')} / {pm('samples_to_0.97', ',.0f')} | {pm('wall_s', '.0f')} |"]
    return "\n".join(lines)


ORACLE_ROWS = {"base": "shipped base (patch 4, 3 layers, width 64; 40% random captions)",
               "p2": "patch 2 (16 image tokens), 40% random captions",
               "p2_clean_labels": "patch 2, correct captions (label noise 0)",
               "p2_wide_clean_labels": "patch 2, 4 layers, width 128, correct captions"}


def oracle_table(results: dict) -> str:
    """Generators judged at the same settings (``judge_digits.json`` layout, ``--model``), e.g. the oracles trained
    on correct captions: what an aligned model of each architecture could at best resemble."""
    st = results["settings"]
    lines = ["| generator | accuracy | independent FD | diversity ratio | Vendi |", "|---|---|---|---|---|"]
    for name, r in results["models"].items():
        lines.append(f"| {ORACLE_ROWS.get(name, name)} | {r['accuracy']:.3f} | {r['fd_independent']:.3f} | "
                     f"{r['diversity_ratio']:.3f} | {r['vendi']:.1f} |")
    lines.append("")
    lines.append(f"{st['num_images']:,} images ({st['num_per_prompt']} per eval prompt, seed {st['seed']}), "
                 f"{st['num_steps']} ODE steps.")
    return "\n".join(lines)


TABLES: Dict[str, tuple] = {
    "digits_default": ("digits_e2e.json", default_table),
    "digits_flow_grpo": ("digits_flow_grpo_e2e.json", lambda r: default_table(r, "Flow-GRPO run")),
    "compare_digits": ("compare_digits.json", compare_table),
    "ablation_digits": ("ablation_digits.json", ablation_table),
    "tilt_digits": ("tilt_digits.json", tilt_table),
    "tilt_digits_p2": ("tilt_digits_p2.json", tilt_table),
    "ablation_digits_p2": ("ablation_digits_p2.json", ablation_table),
    "oracle_digits": ("oracle_digits.json", oracle_table),
}


def generate() -> Dict[str, str]:
    """``{table name: markdown}`` for every table whose JSON file exists."""
    out = {}
    for name, (path, fn) in TABLES.items():
        data = _load(path)
        if data is not None:
            out[name] = fn(data)
    return out


def block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- table:{name} -->\n)(.*?)(\n<!-- /table:{name} -->)", re.S)


def readme_blocks(text: str) -> Dict[str, str]:
    """The table blocks currently in the README text."""
    return {name: m.group(2) for name in TABLES if (m := block(name).search(text))}


def write_readme(tables: Dict[str, str], path: str = README) -> None:
    with open(path) as fh:
        text = fh.read()
    for name, table in tables.items():
        text = block(name).sub(lambda m: m.group(1) + table + m.group(3), text)
    with open(path, "w") as fh:
        fh.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the README's table blocks")
    args = parser.parse_args(argv)
    tables = generate()
    if args.write:
        write_readme(tables)
        print(f"updated {', '.join(tables)} in {README}")
    else:
        for name, table in tables.items():
            print(f"## {name}\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
