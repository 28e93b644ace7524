"""DINO similarity: cosine of DINOv2 CLS embeddings to a set of reference images (max or mean over them).

``model``: a transformers ``Dinov2Model`` (hub id or directory, default ``facebook/dinov2-base``; its
``preprocessor_config.json`` sets the resize/crop, else 256/224 with ImageNet statistics).
``references``: a directory of images (``.png``, ``.jpg``, ...), a list of image paths, or a tensor
``[M, 3, H, W]`` in [0, 1]; their embeddings are computed once. ``reduce``: ``"max"`` (closest
reference) or ``"mean"``.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ._common import IMAGENET_MEAN, IMAGENET_STD, ImagePrep, ModelReward

DINO_MODEL = "facebook/dinov2-base"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_reference_images(references: Union[str, Sequence[str], torch.Tensor], size: int) -> torch.Tensor:
    """Reference images as ``[M, 3, size, size]`` in [0, 1] (files are read with PIL, resized in torch)."""
    if isinstance(references, torch.Tensor):
        images = references.float()
        if images.ndim == 3:
            images = images[None]
        return images
    if isinstance(references, str):
        if not os.path.isdir(references):
            raise FileNotFoundError(f"reference image directory {references!r} does not exist")
        paths = sorted(os.path.join(references, f) for f in os.listdir(references)
                       if f.lower().endswith(IMAGE_SUFFIXES))
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {references!r}")
    else:
        paths = list(references)
    from PIL import Image

    tensors = []
    for path in paths:
        with Image.open(path) as image:
            pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
            pixels = pixels.view(image.height, image.width, 3).permute(2, 0, 1)[None].float() / 255
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
        tensors.append(pixels)
    return torch.cat(tensors)


class DinoSimilarity(ModelReward):
    """``reduce`` over references of ``cos(CLS(image), CLS(reference))`` -> ``[N]`` in [-1, 1]."""

    name = "dino_similarity"

    def __init__(self, references: Union[str, Sequence[str], torch.Tensor, None] = None, model: str = DINO_MODEL,
                 reduce: str = "max", device=None, batch_size: Optional[int] = 32, dtype="float32"):
        from transformers import Dinov2Model

        from genalign.policy import resolve_pretrained

        if references is None:
            raise ValueError("dino_similarity needs references: a directory of images, a list of paths or a tensor")
        if reduce not in ("max", "mean"):
            raise ValueError(f"dino_similarity reduce must be 'max' or 'mean', got {reduce!r}")
        super().__init__(device, batch_size, dtype)
        path = resolve_pretrained(model)
        self.model = self.freeze(Dinov2Model.from_pretrained(path))
        self.prep = ImagePrep.from_processor_dir(path, resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.reduce = reduce
        with torch.no_grad():
            refs = load_reference_images(references, self.prep.resize)
            self.reference_embeddings = torch.cat([self.embed(refs[i:i + 32]) for i in range(0, len(refs), 32)])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLS embeddings ``[N, D]`` (float32) of images ``[N, 3, H, W]`` in [0, 1]."""
        cls = self.model(pixel_values=self.images_in(images, self.prep)).last_hidden_state[:, 0]
        return F.normalize(cls.float(), dim=-1)

    def __call__(self, images: torch.Tensor, prompts: List[str], metadata=None) -> torch.Tensor:
        similarity = self.embed(images) @ self.reference_embeddings.T
        return similarity.amax(dim=1) if self.reduce == "max" else similarity.mean(dim=1)
