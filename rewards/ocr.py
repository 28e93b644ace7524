"""OCR reward: how well the text drawn in the image matches the text the prompt asks for.

score = ``1 - min(d, len(target)) / len(target)`` where ``d`` is the edit distance between the target and
the recognised text (both lower-cased, whitespace removed), in [0, 1]. The target is ``metadata["text"]``
when given, else the first quoted span of the prompt (``"..."``, ``'...'`` or curly quotes).

The OCR engine is RapidOCR (``rapidocr-onnxruntime``: pure pip, ships its ONNX models in the wheel, so it
works offline): ``pip install 'genalign[ocr]'``. OCR is not differentiable and runs on the CPU.
"""

from __future__ import annotations

import re
from typing import List, Optional

import torch

from ._common import to_uint8_images

_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”|\'([^\']+)\'')


def import_rapidocr():
    """RapidOCR's engine class, or an ImportError telling how to install it."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as exc:
        raise ImportError("the 'ocr' reward needs an OCR engine: pip install 'genalign[ocr]' "
                          "(or pip install rapidocr-onnxruntime)") from exc
    return RapidOCR


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def target_text(prompt: str, metadata: Optional[dict] = None) -> str:
    """The text an image should show: ``metadata["text"]`` or the prompt's first quoted span."""
    if metadata and metadata.get("text"):
        return str(metadata["text"])
    match = _QUOTED.search(prompt)
    if not match:
        raise ValueError(f"the ocr reward needs the target text in quotes in the prompt (or metadata['text']): "
                         f"{prompt!r}")
    return next(g for g in match.groups() if g)


def _canonical(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def text_match(recognised: str, target: str) -> float:
    """``1 - min(edit distance, len) / len`` of the canonical (lower-case, no whitespace) strings."""
    target, recognised = _canonical(target), _canonical(recognised)
    if not target:
        return 1.0 if not recognised else 0.0
    return 1.0 - min(edit_distance(recognised, target), len(target)) / len(target)


class OcrReward:
    """RapidOCR-based text match score ``[N]`` in [0, 1]."""

    name = "ocr"

    def __init__(self, min_confidence: float = 0.0):
        self.engine = import_rapidocr()()
        self.min_confidence = float(min_confidence)

    def recognise(self, pixels) -> str:
        """All text RapidOCR finds in one ``uint8`` image ``[H, W, 3]``, joined by spaces."""
        result, _ = self.engine(pixels)
        return " ".join(text for _, text, conf in (result or []) if float(conf) >= self.min_confidence)

    def __call__(self, images: torch.Tensor, prompts: List[str], metadata=None) -> torch.Tensor:
        metadata = metadata or [{} for _ in prompts]
        targets = [target_text(p, m) for p, m in zip(prompts, metadata)]
        return torch.tensor([text_match(self.recognise(img), t) for img, t in zip(to_uint8_images(images), targets)])
