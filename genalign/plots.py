"""Learning curves from ``metrics.jsonl`` and simple image grids (matplotlib with the Agg backend)."""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence

import torch


def read_metrics(path: str) -> List[Dict[str, float]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_metrics(metrics_path: str, out_png: str, keys: Optional[Sequence[str]] = None) -> str:
    """Plot reward (train and eval) and other chosen keys against generated samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if keys is None:
        evals = sorted({k for r in rows for k in r if k.startswith("eval/")})
        if len([k for k in evals if "." not in k]) == 2:  # one reward: eval/reward duplicates eval/<name>
            evals.remove("eval/reward")
        keys = ["reward/mean"] + evals
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["samples_seen"], r[key]) for r in rows if key in r and "samples_seen" in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if key.startswith("eval/") else None, ms=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("generated images")
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
