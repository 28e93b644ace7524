"""Learning curves from ``metrics.jsonl`` and simple image grids (matplotlib with the Agg backend)."""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Dict, List, Optional, Sequence

import torch


def read_metrics(path: str) -> List[Dict[str, float]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def default_keys(rows: List[Dict[str, float]]) -> List[str]:
    """The training reward and every eval metric (``eval/reward`` dropped when it duplicates the only reward)."""
    evals = sorted({k for r in rows for k in r if k.startswith("eval/")})
    if "eval/reward" in evals and len([k for k in evals if "." not in k]) == 2:  # one reward: same as eval/<name>
        evals.remove("eval/reward")
    return ["reward/mean"] + evals


def expand_keys(rows: List[Dict[str, float]], patterns: Sequence[str]) -> List[str]:
    """Keys matching each pattern (exact name or shell glob like ``eval/*``), in order, without repeats."""
    present = sorted({k for r in rows for k in r})
    keys: List[str] = []
    for pattern in patterns:
        matched = [k for k in present if fnmatch.fnmatchcase(k, pattern)] or [pattern]
        keys += [k for k in matched if k not in keys]
    return keys


def metrics_file(path: str) -> str:
    """``path`` itself if it is a file, else ``path/metrics.jsonl`` (a run directory)."""
    candidate = path if os.path.isfile(path) else os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(candidate):
        raise FileNotFoundError(f"no metrics.jsonl at {path!r} (give a run directory or a metrics.jsonl file)")
    return candidate


def plot_metrics(metrics_path: str, out_png: str, keys: Optional[Sequence[str]] = None, columns: int = 4) -> str:
    """Plot chosen keys (default: train reward and eval metrics; globs allowed) against generated samples
    (``samples_seen``, else ``epoch``), ``columns`` panels per row; a key without data gets an empty panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_file(metrics_path))
    keys = default_keys(rows) if not keys else expand_keys(rows, keys)
    x_key = "samples_seen" if any("samples_seen" in r for r in rows) else "epoch"
    ncols = min(columns, len(keys))
    nrows = (len(keys) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        pts = [(r[x_key], r[key]) for r in rows if key in r and x_key in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if key.startswith("eval/") or len(pts) < 3 else None, ms=3)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("generated images" if x_key == "samples_seen" else "epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def to_pil_grid(batch: torch.Tensor, columns: int, pad: int = 2):
    """``[N, 3, H, W]`` in [0, 1] -> a PIL image with ``columns`` images per row."""
    from PIL import Image

    n, _, h, w = batch.shape
    rows = (n + columns - 1) // columns
    canvas = torch.ones(3, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = batch[i]
    arr = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def save_image_grid(batches: List[torch.Tensor], path: str, columns: int, titles: Optional[List[str]] = None,
                    scale: int = 4) -> str:
    """Save several image batches side by side (one panel per batch, titled), upscaled ``scale`` x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = [to_pil_grid(b.float().cpu(), columns) for b in batches]
    w, h = grids[0].size
    fig, axes = plt.subplots(1, len(grids), figsize=(len(grids) * w * scale / 100, h * scale / 100 + 0.4), squeeze=False)
    for i, (ax, g) in enumerate(zip(axes[0], grids)):
        ax.imshow(g, interpolation="nearest")
        ax.axis("off")
        if titles:
            ax.set_title(titles[i])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
