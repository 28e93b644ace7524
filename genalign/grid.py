"""Comparison grids: rows = prompts x seeds, columns = checkpoints and/or RLG strengths.

Every cell of a row starts from the same initial noise (the row's seed, see :mod:`genalign.sampling`),
so differences across a row come from the weights alone. Each image is captioned with its prompt, seed
and reward scores; a header names the columns. Besides the PNG, an HTML page (same basename, ``.html``)
shows the images (``<basename>_files/*.png``) with every reward component in a table, and the column means.

Layout (pixels; all constants below): a header band of ``HEADER_H``; then per row, cells of the
(upscaled) image size separated by ``PAD``, each followed by ``CAPTION_GAP`` and one ``LINE_H`` line per
caption line (prompt, seed, one per reward), and ``PAD`` below. See :func:`grid_size`.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .sampling import (Variant, display_parts, load_policy_with_loras, middle_frames, sample_images, to_pil,
                       use_variant)

PAD = 8            # gap between cells and around the grid
HEADER_H = 30      # band with the column titles
CAPTION_GAP = 3    # between an image and its caption
LINE_H = 16        # height of one caption line
FONT_SIZE = 12     # caption font (header: FONT_SIZE + 2)
MIN_CELL = 144     # images smaller than this are upscaled (nearest neighbour, integer factor) to at least it
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
HEADER_BG = (232, 236, 242)


@dataclass
class GridData:
    """Sampled grid: ``images [C, R, 3, H, W]`` in [0, 1] (a video model's: each video's middle frame, the videos
    themselves scored); ``scores[part] [C, R]`` for every reward
    component; ``rewards`` the main reward names shown in captions; ``rows`` the ``(prompt, seed)`` pairs."""

    columns: List[Variant]
    rows: List[Tuple[str, int]]
    images: torch.Tensor
    scores: Dict[str, torch.Tensor] = field(default_factory=dict)
    rewards: List[str] = field(default_factory=list)


def lora_label(path: str) -> str:
    """A short column name for a LoRA path: the run directory's name for ``RUN/final/lora`` or ``RUN``,
    the checkpoint's name for ``RUN/checkpoints/checkpoint-N[/lora]``."""
    parts = [p for p in os.path.normpath(os.path.abspath(path)).split(os.sep) if p]
    while len(parts) > 1 and parts[-1] in ("lora", "final"):
        parts.pop()
    return parts[-1] if parts else path


def build_columns(lora_paths: Sequence[str], adapter_names: Sequence[str], rlg: Sequence[float] = (),
                  include_base: bool = True) -> List[Variant]:
    """``base``, then each LoRA (named after its run), then each LoRA at each RLG strength ``rlg w=...``."""
    columns = [Variant("base")] if include_base else []
    labels = [lora_label(p) for p in lora_paths]
    columns += [Variant(label, name) for label, name in zip(labels, adapter_names)]
    for label, name in zip(labels, adapter_names):
        prefix = f"{label} " if len(adapter_names) > 1 else ""
        columns += [Variant(f"{prefix}rlg w={w:g}", name, float(w)) for w in rlg]
    return columns


def compute_grid(policy, prompts: Sequence[str], seeds: Sequence[int], columns: Sequence[Variant],
                 num_steps: Optional[int] = None, reward_set=None, batch_size: int = 32) -> GridData:
    """Sample every (prompt, seed) row with every column's variant and score it with ``reward_set``
    (a :class:`genalign.reward_api.RewardSet` or None)."""
    rows = [(p, int(s)) for p in prompts for s in seeds]
    row_prompts, row_seeds = [p for p, _ in rows], [s for _, s in rows]
    images = []
    for column in columns:
        with use_variant(policy, column) as sampler:
            images.append(sample_images(sampler, row_prompts, row_seeds, num_steps, batch_size))
    data = GridData(list(columns), rows, torch.stack(images))
    if reward_set is not None:
        parts = [reward_set(col_images, row_prompts, [{"seed": s} for s in row_seeds])[1] for col_images in data.images]
        data.scores = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
        data.rewards = list(reward_set.names)
    data.images = torch.stack([middle_frames(c) for c in data.images])  # videos: scored whole, shown by a frame
    return data


def upscale_factor(height: int, width: int, min_cell: int = MIN_CELL) -> int:
    """Integer nearest-neighbour factor bringing the image's longer side to at least ``min_cell``."""
    return max(1, math.ceil(min_cell / max(height, width)))


def caption_lines(prompt: str, seed: int, scores: Dict[str, float]) -> List[str]:
    """The caption of one cell: prompt, seed, then ``reward score`` per reward."""
    return [prompt, f"seed {seed}"] + [f"{name} {value:.3f}" for name, value in scores.items()]


def grid_size(num_rows: int, num_cols: int, height: int, width: int, num_caption_lines: int) -> Tuple[int, int]:
    """``(width, height)`` in pixels of the grid PNG for images of ``height x width`` (before upscaling)."""
    f = upscale_factor(height, width)
    cell_w, cell_h = width * f, height * f
    row_h = cell_h + CAPTION_GAP + num_caption_lines * LINE_H + PAD
    return PAD + num_cols * (cell_w + PAD), HEADER_H + num_rows * row_h


def _font(size: int):
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size)


def _fit(text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _cell_scores(data: GridData, col: int, row: int, names: Sequence[str]) -> Dict[str, float]:
    return {name: float(data.scores[name][col, row]) for name in names}


def render_grid(data: GridData, path: Optional[str] = None):
    """Draw the captioned grid (a PIL image); saved to ``path`` when given."""
    from PIL import Image, ImageDraw

    num_cols, num_rows, _, height, width = data.images.shape
    n_lines = len(caption_lines("", 0, dict.fromkeys(data.rewards, 0.0)))
    size = grid_size(num_rows, num_cols, height, width, n_lines)
    f = upscale_factor(height, width)
    cell_w, cell_h = width * f, height * f
    canvas = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, header_font = _font(FONT_SIZE), _font(FONT_SIZE + 2)
    draw.rectangle([0, 0, size[0], HEADER_H - PAD // 2], fill=HEADER_BG)
    for c, column in enumerate(data.columns):
        x = PAD + c * (cell_w + PAD)
        title = _fit(column.label, header_font, cell_w)
        draw.text((x + cell_w // 2, (HEADER_H - PAD // 2) // 2), title, fill=TEXT, font=header_font, anchor="mm")
    row_h = cell_h + CAPTION_GAP + n_lines * LINE_H + PAD
    for r, (prompt, seed) in enumerate(data.rows):
        y = HEADER_H + r * row_h
        for c in range(num_cols):
            x = PAD + c * (cell_w + PAD)
            image = to_pil(data.images[c, r]).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(image, (x, y))
            lines = caption_lines(prompt, seed, _cell_scores(data, c, r, data.rewards))
            for k, line in enumerate(lines):
                draw.text((x, y + cell_h + CAPTION_GAP + k * LINE_H), _fit(line, font, cell_w), fill=TEXT, font=font)
    if path:
        canvas.save(path)
    return canvas


def write_html(data: GridData, path: str) -> str:
    """An HTML page with every image (PNG files in ``<basename>_files/``) and all reward components
    per cell, plus a row of column means."""
    base = os.path.splitext(path)[0]
    files_dir = base + "_files"
    os.makedirs(files_dir, exist_ok=True)
    rel = os.path.basename(files_dir)
    num_cols, _, height, width = data.images.shape[0], *data.images.shape[2:]
    display_w = width * upscale_factor(height, width)
    parts = display_parts(list(data.scores), data.rewards)
    esc = html.escape
    out = ["<!doctype html>", "<html><head><meta charset='utf-8'><title>genalign grid</title><style>",
           "body{font-family:sans-serif;margin:16px} table{border-collapse:collapse}",
           "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:12px}",
           "img{image-rendering:pixelated;display:block} .s{font-family:monospace}",
           "</style></head><body>", "<h2>genalign comparison grid</h2>", "<table>",
           "<tr><th>prompt</th><th>seed</th>" + "".join(f"<th>{esc(c.label)}</th>" for c in data.columns) + "</tr>"]
    for r, (prompt, seed) in enumerate(data.rows):
        cells = []
        for c in range(num_cols):
            name = f"r{r:03d}_c{c:02d}.png"
            to_pil(data.images[c, r]).save(os.path.join(files_dir, name))
            scores = "<br>".join(f"{esc(k)}: {v:.4f}" for k, v in _cell_scores(data, c, r, parts).items())
            cells.append(f"<td><img src='{esc(rel)}/{name}' width='{display_w}' alt='{esc(prompt)}, seed {seed}'>"
                         f"<div class='s'>{scores}</div></td>")
        out.append(f"<tr><td>{esc(prompt)}</td><td>{seed}</td>{''.join(cells)}</tr>")
    if parts:
        means = ["<br>".join(f"{esc(k)}: {float(data.scores[k][c].mean()):.4f}" for k in parts)
                 for c in range(num_cols)]
        out.append("<tr><th colspan='2'>column mean</th>" + "".join(f"<td class='s'>{m}</td>" for m in means) + "</tr>")
    out += ["</table>", "</body></html>"]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(out) + "\n")
    return path


def make_grid(model: Optional[str], prompts: Sequence[str], seeds: Sequence[int], out: str, loras: Sequence[str] = (),
              rewards: Sequence[str] = (), rlg: Sequence[float] = (), num_steps: Optional[int] = None,
              guidance_scale: Optional[float] = None, device: Optional[str] = None, batch_size: int = 32, *,
              dtype: Optional[str] = None, reward_options: Optional[Dict[str, dict]] = None,
              **model_kwargs) -> GridData:
    """Load ``model`` (None: the LoRAs' base model) with each LoRA as its own adapter, sample the grid, write
    ``out`` (PNG) and the HTML page. ``dtype``, ``model_kwargs`` (``height``, ``width``, ...): see
    :func:`genalign.sampling.load_policy_with_loras`; ``reward_options``: ``{reward: {option: value}}`` as
    the config key ``reward_options``."""
    if rlg and not loras:
        raise ValueError("--rlg needs at least one --lora: RLG mixes the base model with a fine-tuned LoRA")
    policy, names = load_policy_with_loras(model, loras, guidance_scale, device, dtype=dtype, **model_kwargs)
    reward_set = None
    if rewards:
        from .reward_api import RewardSet

        reward_set = RewardSet({r: 1.0 for r in rewards}, reward_options, device=str(policy.device))
    data = compute_grid(policy, prompts, seeds, build_columns(loras, names, rlg), num_steps, reward_set, batch_size)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    render_grid(data, out)
    write_html(data, os.path.splitext(out)[0] + ".html")
    return data
