"""JPEG (in)compressibility: the size of each image saved as a JPEG at quality 95 (DDPO's toy rewards).

``jpeg_compressibility`` = -kilobytes (smaller files score higher), ``jpeg_incompressibility`` = +kilobytes.
``normalize=True`` divides by 500 as flow_grpo does. The PIL round trip is the measurement itself, so
this reward is not differentiable.
"""

from __future__ import annotations

import io
from typing import List

import torch

from ._common import to_uint8_images

JPEG_QUALITY = 95
KB_NORMALIZER = 500.0


def jpeg_kilobytes(images: torch.Tensor, quality: int = JPEG_QUALITY) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] -> ``[N]`` sizes in kB of the images saved as JPEG at ``quality``."""
    from PIL import Image

    sizes = []
    for array in to_uint8_images(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegReward:
    """``sign * kB / (500 if normalize else 1)``; ``sign`` is -1 for compressibility, +1 for incompressibility."""

    def __init__(self, sign: float, normalize: bool = False, quality: int = JPEG_QUALITY):
        self.sign, self.quality = float(sign), int(quality)
        self.scale = 1.0 / KB_NORMALIZER if normalize else 1.0
        self.name = "jpeg_compressibility" if sign < 0 else "jpeg_incompressibility"

    def __call__(self, images: torch.Tensor, prompts: List[str], metadata=None) -> torch.Tensor:
        return self.sign * self.scale * jpeg_kilobytes(images, self.quality)
