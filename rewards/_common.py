"""Shared pieces of the built-in reward models: weights resolution, image preprocessing, the model base class.

Weights are named by a hub id or a local path. A hub *repository* (a ``from_pretrained`` directory)
goes through :func:`genalign.policy.resolve_pretrained`; a single weights *file* (an HPSv2 or aesthetic
checkpoint) is a local path or ``org/repo/path/in/repo`` and goes through :func:`resolve_file`. Offline
(``HF_HUB_OFFLINE=1``) an uncached id raises :class:`~genalign.policy.ModelNotAvailableError` saying what
to fetch (``hf download ...``); nothing is ever downloaded while offline.

Image preprocessing is plain torch (resize of the shorter side, centre crop, normalisation), so it is
differentiable: a reward model with frozen weights builds a graph only when its input images require grad.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from genalign.policy import ModelNotAvailableError, _offline, resolve_device

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def looks_like_file(spec: str) -> bool:
    """True for an existing path, an explicit local path (``./``, ``/``, ``~``) or ``org/repo/file``."""
    return os.path.exists(os.path.expanduser(spec)) or spec.startswith((".", "/", "~")) or spec.count("/") >= 2


def resolve_file(spec: str, what: str = "weights") -> str:
    """A single file given as a local path or as ``org/repo/path/in/repo`` on the Hugging Face hub.

    Hub files are looked up in the local cache first; offline and uncached raises
    :class:`ModelNotAvailableError` naming the ``hf download`` command; online they are downloaded.
    """
    local = os.path.expanduser(spec)
    if os.path.isfile(local):
        return local
    if os.path.isdir(local):
        raise ModelNotAvailableError(f"{what} {spec!r} is a directory; expected a weights file")
    parts = spec.split("/")
    if spec.startswith((".", "/", "~")) or len(parts) < 3:
        raise ModelNotAvailableError(f"{what} file {spec!r} does not exist (give a local file, or "
                                     f"'org/repo/filename' for a file of a Hugging Face hub repository)")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached
        if _offline():
            raise ModelNotAvailableError(
                f"{what} {spec!r} (file {filename!r} of hub repository {repo!r}) is neither a local file nor in "
                f"the Hugging Face cache, and the hub is offline (HF_HUB_OFFLINE=1). Fetch it on a machine with "
                f"internet access with `hf download {repo} {filename}` and copy the cache, or pass a local path."
            ) from None
    return hf_hub_download(repo, filename)


def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch checkpoint (``torch.load(weights_only=True)``: no code runs).

    A ``{"state_dict": ...}`` wrapper and DataParallel ``module.`` prefixes are removed.
    """
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path!r} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _side(value, default: int) -> int:
    """An image size as found in processor configs: int, ``[h, w]``, or ``{"shortest_edge"|"height": ...}``."""
    if value is None:
        return default
    if isinstance(value, dict):
        return int(value.get("shortest_edge") or value.get("height") or default)
    if isinstance(value, (list, tuple)):
        return int(min(value))
    return int(value)


@dataclass
class ImagePrep:
    """Resize the shorter side to ``resize``, centre-crop ``crop`` x ``crop``, normalise with ``mean``/``std``."""

    resize: int = 224
    crop: int = 224
    mean: Sequence[float] = OPENAI_CLIP_MEAN
    std: Sequence[float] = OPENAI_CLIP_STD
    mode: str = "bicubic"

    @classmethod
    def from_processor_dir(cls, path: str, **defaults) -> "ImagePrep":
        """Read the image processor settings of a transformers model directory (``defaults`` where absent):
        ``preprocessor_config.json``, or the ``image_processor`` entry of ``processor_config.json``."""
        prep = cls(**defaults)
        cfg = None
        for filename, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            config_path = os.path.join(path, filename)
            if os.path.isfile(config_path):
                with open(config_path) as f:
                    cfg = json.load(f)
                cfg = cfg.get(key) if key else cfg
                break
        if not isinstance(cfg, dict):
            return prep
        crop = _side(cfg.get("crop_size"), prep.crop) if cfg.get("do_center_crop", True) else None
        resize = _side(cfg.get("size"), prep.resize)
        return cls(resize=resize, crop=crop or resize, mean=tuple(cfg.get("image_mean", prep.mean)),
                   std=tuple(cfg.get("image_std", prep.std)), mode=prep.mode)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> normalised ``[N, 3, crop, crop]`` (same device and dtype)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        scale = self.resize / min(h, w)
        size = (max(self.crop, round(h * scale)), max(self.crop, round(w * scale)))
        x = images
        if size != (h, w):
            x = F.interpolate(x, size=size, mode=self.mode, align_corners=False, antialias=True).clamp(0, 1)
        top, left = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        x = x[..., top:top + self.crop, left:left + self.crop]
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


def to_uint8_images(images: torch.Tensor):
    """``[N, 3, H, W]`` in [0, 1] -> NumPy ``uint8`` ``[N, H, W, 3]`` (for JPEG/PNG encoding and OCR engines)."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def features(output) -> torch.Tensor:
    """A ``get_*_features`` result as a tensor (transformers 5 returns an output object with ``pooler_output``)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of ``[N, D]`` and ``[N, D]`` -> ``[N]`` (float32)."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


class ModelReward:
    """Base of the built-in reward models: a frozen module on ``device``, called in chunks of ``batch_size``.

    Subclasses set ``self.model`` (frozen by :meth:`freeze`) and implement ``__call__``. The ``device`` and
    ``batch_size`` attributes are the hints :func:`genalign.reward_api.score_reward` honours.
    """

    name = "model_reward"

    def __init__(self, device=None, batch_size: Optional[int] = 32, dtype="float32"):
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    def freeze(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move ``module`` to this reward's device and dtype, evaluation mode, no parameter gradients."""
        return module.to(self.device, self.dtype).eval().requires_grad_(False)

    def images_in(self, images: torch.Tensor, prep: ImagePrep) -> torch.Tensor:
        """Reward images -> the model's normalised input on this reward's device and dtype."""
        return prep(images.to(self.device, self.dtype))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, batch_size={self.batch_size})"


def load_tokenizer(model_id: str):
    """``AutoTokenizer`` of a hub id or directory; refuses the near-empty tokenizer offline loading can give."""
    from transformers import AutoTokenizer

    from genalign.policy import resolve_pretrained

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(model_id))
    if len(tokenizer) <= 2:
        raise ModelNotAvailableError(f"the tokenizer of {model_id!r} has {len(tokenizer)} tokens: its vocabulary "
                                     f"files are missing (fetch them with `hf download {model_id}`)")
    return tokenizer
