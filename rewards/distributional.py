"""DRAGON distributional rewards: an encoder + a reference set define a reward (docs/algorithms.md §10.2).

Encoders (:func:`build_encoder`, by name): ``dino`` (DINOv2 CLS, or mean patch token with
``token="patch"``), ``clip`` (CLIP image embeddings; also texts, so text references work cross-modally),
``digits`` (the shipped digit classifier's penultimate features; its conv map gives patch tokens). All
share one interface: ``encode(images [N, 3, H, W] in [0, 1]) -> [N, D]`` (float32); cross-modal ones add
``encode_text(texts) -> [N, D]``; patch-level ones add ``tokens(images) -> [N, P, D']``.

References: a directory of images, a list of image paths, a tensor ``[M, 3|1, H, W]`` in [0, 1], or a
list of texts (cross-modal encoders only). Empty, mis-shaped or wrong-modality sets raise ``ValueError``.
Reference features are cached on disk (``cache_dir``; key = encoder fingerprint + content hash).

Rewards (``genalign.rewards`` entry points, see :mod:`genalign.rewards.builtins`):

- ``exemplar_similarity`` (instance-to-distribution): cosine to the exemplar centroid, or the mean
  cosine to the ``k`` nearest exemplars.
- ``frechet_instance`` (instance-to-distribution): ``-FD`` of one image's patch tokens (or crops) to the
  references' token statistics.
- ``frechet_set`` / ``vendi`` (distribution-to-distribution, ``set_level``): the batch's ``-FD`` to the
  references / its Vendi diversity, turned into per-sample leave-one-out contributions
  ``r(S) - r(S \\ x_i)``; the set statistic itself is reported as a sub-score (``fd`` / ``vendi``).
  They expose ``encode`` and ``set_score(features)`` so DRAGON can build D+ greedily
  (:func:`genalign.reward_api.greedy_split`, re-exported here with :func:`leave_one_out`).
"""

from __future__ import annotations

import hashlib
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from genalign.judge import feature_stats, frechet_from_stats as frechet_distance  # noqa: F401 - re-exported
from genalign.judge import vendi_score as _vendi
from genalign.reward_api import SetScore, greedy_split, leave_one_out  # noqa: F401 - re-exported

from .dino import DINO_MODEL, IMAGE_SUFFIXES, load_reference_images

References = Union[str, Sequence[str], torch.Tensor]


# ---------------------------------------------------------------------- statistics (genalign.judge)

def vendi_score(embeddings: torch.Tensor) -> torch.Tensor:
    """Vendi diversity of ``[N, D]`` embeddings as a float64 scalar tensor (:func:`genalign.judge.vendi_score`)."""
    return torch.tensor(_vendi(embeddings), dtype=torch.float64)


# ---------------------------------------------------------------------- encoders

class DinoEncoder:
    """DINOv2 (``model``: hub id or directory): ``encode`` = CLS (``token="cls"``) or mean patch token
    (``"patch"``) ``[N, D]``; ``tokens`` = patch tokens ``[N, P, D]``; ``cls_and_patches`` both."""

    modalities = ("image",)

    def __init__(self, model: str = DINO_MODEL, token: str = "cls", device=None):
        from transformers import Dinov2Model

        from genalign.policy import resolve_device, resolve_pretrained

        from ._common import IMAGENET_MEAN, IMAGENET_STD, ImagePrep

        if token not in ("cls", "patch"):
            raise ValueError(f"dino encoder token must be 'cls' or 'patch', got {token!r}")
        path = resolve_pretrained(model)
        self.device = resolve_device(device)
        self.model = Dinov2Model.from_pretrained(path).to(self.device).eval().requires_grad_(False)
        self.prep = ImagePrep.from_processor_dir(path, resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.token, self.image_size = token, self.prep.resize
        self.fingerprint = f"dino:{os.path.abspath(path) if os.path.isdir(path) else path}:{token}"

    @torch.no_grad()
    def cls_and_patches(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(pixel_values=self.prep(images.to(self.device).float())).last_hidden_state.float()
        return hidden[:, 0], hidden[:, 1:]

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.cls_and_patches(images)[1]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        cls, patches = self.cls_and_patches(images)
        return cls if self.token == "cls" else patches.mean(1)


# ---------------------------------------------------------------------- encoders


class ClipEncoder:
    """CLIP image embeddings ``[N, D]`` (``encode``) and text embeddings (``encode_text``) of a transformers
    ``CLIPModel`` (``model``, preprocessing/tokenizer from ``processor``; default: ``model``)."""

    modalities = ("image", "text")

    def __init__(self, model: str, processor: Optional[str] = None, device=None):
        from .pickscore import PickScore  # a CLIP model with image and text features

        self.clip = PickScore(model=model, processor=processor, device=device, batch_size=None)
        self.device, self.image_size = self.clip.device, self.clip.prep.resize
        self.fingerprint = f"clip:{model}:{processor}"

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.image_features(images).float()

    @torch.no_grad()
    def encode_text(self, texts: List[str]) -> torch.Tensor:
        return self.clip.text_features(list(texts)).float()


class DigitsEncoder:
    """The digit classifier (``model_dir``): ``encode`` = penultimate features ``[N, 128]``; ``tokens`` =
    the last conv block before its final pooling, ``[N, 16, 64]`` (a 4x4 map; the stand-in for DINO
    patch tokens)."""

    modalities = ("image",)
    image_size = 8

    def __init__(self, model_dir: str = "digits", device=None):
        from .digits import DigitClassifier

        self.classifier = DigitClassifier.from_pretrained(model_dir, device=device)
        self.device = next(self.classifier.parameters()).device
        digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in self.classifier.parameters()))
        self.fingerprint = f"digits:{digest.hexdigest()[:16]}"

    @torch.no_grad()
    def cls_and_patches(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.classifier.prepare(images.to(self.device))
        conv = self.classifier.body[:7](x)  # conv-relu-conv-relu-pool-conv-relu -> [N, 64, 4, 4]
        cls = self.classifier.body[7:](conv)
        return cls, conv.flatten(2).transpose(1, 2)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.cls_and_patches(images)[1]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.cls_and_patches(images)[0]


ENCODERS = {"dino": DinoEncoder, "clip": ClipEncoder, "digits": DigitsEncoder}


def build_encoder(encoder, device=None, **options):
    """An encoder by name (``dino``, ``clip``, ``digits``; ``options`` go to its class) or an object with
    ``encode`` (returned as is)."""
    if not isinstance(encoder, str) and hasattr(encoder, "encode"):
        return encoder
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; valid: {sorted(ENCODERS)} (or an object with encode())")
    return ENCODERS[encoder](device=device, **options)


# ---------------------------------------------------------------------- references

def load_references(references: References, encoder) -> Tuple[str, Union[torch.Tensor, List[str]]]:
    """``("image", [M, 3, H, W])`` or ``("text", [M texts])``; ``ValueError`` for an empty or mis-shaped set,
    or a modality ``encoder`` cannot embed. A list of strings is image paths when every entry ends in an
    image suffix, else texts."""
    if references is None or (not isinstance(references, torch.Tensor) and len(references) == 0):
        raise ValueError("the reference set is empty: give a directory of images, image paths, a tensor "
                         "[M, 3, H, W] or texts (cross-modal encoders)")
    modality, data = "image", references
    if isinstance(references, torch.Tensor):
        data = references[None] if references.ndim == 3 else references
        if data.ndim != 4 or data.shape[1] not in (1, 3) or len(data) == 0:
            raise ValueError(f"reference images must be a tensor [M, 3, H, W] (or [M, 1, H, W]) in [0, 1], "
                             f"got shape {tuple(references.shape)}")
        data = data.float().expand(-1, 3, -1, -1)
    elif isinstance(references, str):
        if not os.path.isdir(references):
            raise ValueError(f"reference directory {references!r} does not exist (a single string must be a "
                             f"directory of images; give texts as a list)")
    elif not all(isinstance(r, str) for r in references):
        raise ValueError("a reference list must hold strings (image paths or texts)")
    elif not all(r.lower().endswith(IMAGE_SUFFIXES) for r in references):
        modality = "text"
    if modality not in encoder.modalities:
        raise ValueError(f"references are {modality}s but encoder {type(encoder).__name__} embeds only "
                         f"{', '.join(encoder.modalities)}s (use a cross-modal encoder such as 'clip' for texts)")
    if modality == "image" and not isinstance(data, torch.Tensor):
        try:
            data = load_reference_images(data, encoder.image_size)
        except FileNotFoundError as exc:
            raise ValueError(str(exc)) from None
    return modality, (list(data) if modality == "text" else data)


def _content_hash(modality: str, data) -> str:
    h = hashlib.sha256(modality.encode())
    if modality == "text":
        h.update("\x00".join(data).encode())
    else:
        h.update(str(tuple(data.shape)).encode())
        h.update(data.contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _batched(fn, items, size: int = 64) -> torch.Tensor:
    return torch.cat([fn(items[i:i + size]).float().cpu() for i in range(0, len(items), size)])


def reference_features(encoder, references: References, kind: str = "embed", cache_dir: Optional[str] = None,
                       min_count: int = 1) -> torch.Tensor:
    """Reference features, cached in ``cache_dir`` (None: no cache). ``kind``: ``"embed"`` -> ``[M, D]``;
    ``"tokens"`` -> all patch tokens ``[M * P, D']`` (image references only)."""
    modality, data = load_references(references, encoder)
    if len(data) < min_count:
        raise ValueError(f"the reference set has {len(data)} item(s); this reward needs at least {min_count}")
    path = None
    if cache_dir:
        key = hashlib.sha256(f"{encoder.fingerprint}|{kind}|{_content_hash(modality, data)}".encode()).hexdigest()
        path = os.path.join(cache_dir, f"{key[:32]}.safetensors")
        if os.path.isfile(path):
            from safetensors.torch import load_file

            return load_file(path)["features"]
    if kind == "tokens":
        if modality != "image" or not hasattr(encoder, "tokens"):
            raise ValueError(f"token statistics need image references and an encoder with tokens(), got "
                             f"{modality} references and {type(encoder).__name__}")
        feats = _batched(encoder.tokens, data).flatten(0, 1)
    else:
        feats = _batched(encoder.encode_text if modality == "text" else encoder.encode, data)
    if path:
        from safetensors.torch import save_file

        os.makedirs(cache_dir, exist_ok=True)
        save_file({"features": feats.contiguous()}, path)
    return feats


# ---------------------------------------------------------------------- rewards

class _EncodedReward:
    """Shared set-up: ``encoder`` (name or object) + ``encoder_options``; ``device``; ``cache_dir``."""

    def __init__(self, encoder="dino", encoder_options: Optional[dict] = None, device=None,
                 cache_dir: Optional[str] = None):
        self.encoder = build_encoder(encoder, device=device, **dict(encoder_options or {}))
        self.device = getattr(self.encoder, "device", None)
        self.cache_dir = cache_dir

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[N, D]`` (float32, CPU)."""
        return self.encoder.encode(images).float().cpu()


class ExemplarSimilarity(_EncodedReward):
    """Cosine to the exemplars' centroid (``mode="centroid"``) or mean cosine to the ``k`` nearest
    exemplars (``mode="knn"``) -> ``[N]`` in [-1, 1]."""

    name = "exemplar_similarity"
    batch_size = 64

    def __init__(self, references: References = None, mode: str = "centroid", k: int = 5, **kw):
        if mode not in ("centroid", "knn"):
            raise ValueError(f"exemplar_similarity mode must be 'centroid' or 'knn', got {mode!r}")
        super().__init__(**kw)
        refs = F.normalize(reference_features(self.encoder, references, cache_dir=self.cache_dir), dim=-1)
        self.mode, self.k = mode, min(k, len(refs))
        self.exemplars = F.normalize(refs.mean(0, keepdim=True), dim=-1) if mode == "centroid" else refs

    def __call__(self, images: torch.Tensor, prompts=None, metadata=None) -> torch.Tensor:
        cos = F.normalize(self.encode(images), dim=-1) @ self.exemplars.T
        return cos[:, 0] if self.mode == "centroid" else cos.topk(self.k, dim=1).values.mean(1)


class InstanceFrechet(_EncodedReward):
    """``-FD`` of ONE image's feature set to the references' statistics of the same kind -> ``[N]``.

    ``source="patches"``: the image's patch tokens (``encoder.tokens``); ``"crops"``: embeddings of a
    ``grid x grid`` set of crops covering ``crop`` of each side (resized back to the image size).
    """

    name = "frechet_instance"
    batch_size = 16

    def __init__(self, references: References = None, source: str = "patches", grid: int = 3, crop: float = 0.5,
                 **kw):
        if source not in ("patches", "crops"):
            raise ValueError(f"frechet_instance source must be 'patches' or 'crops', got {source!r}")
        super().__init__(**kw)
        self.source, self.grid, self.crop = source, grid, crop
        if source == "patches":
            feats = reference_features(self.encoder, references, "tokens", self.cache_dir, min_count=1)
        else:
            _, images = load_references(references, self.encoder)
            feats = torch.cat([self.feature_set(images[i:i + 1])[0] for i in range(len(images))])
        self.mu, self.sigma = feature_stats(feats)

    def feature_set(self, images: torch.Tensor) -> torch.Tensor:
        """Per-image feature sets ``[N, P, D]`` (patch tokens, or ``grid^2`` crop embeddings)."""
        if self.source == "patches":
            return self.encoder.tokens(images).float().cpu()
        h, w = images.shape[-2:]
        ch, cw = max(1, round(h * self.crop)), max(1, round(w * self.crop))
        tops = torch.linspace(0, h - ch, self.grid).round().long().tolist()
        lefts = torch.linspace(0, w - cw, self.grid).round().long().tolist()
        crops = [F.interpolate(images[..., t:t + ch, s:s + cw].float(), size=(h, w), mode="bilinear",
                               align_corners=False) for t in tops for s in lefts]
        return torch.stack([self.encode(c) for c in crops], dim=1)

    def __call__(self, images: torch.Tensor, prompts=None, metadata=None) -> torch.Tensor:
        sets = self.feature_set(images)
        return torch.stack([-frechet_distance(*feature_stats(s), self.mu, self.sigma) for s in sets]).float()


class _SetReward(_EncodedReward):
    """A set statistic ``stat([n, D])``; reward ``r(S) = sign * stat``; per-sample leave-one-out contributions."""

    set_level = True
    stat_name, sign = "stat", 1.0

    def statistic(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def set_score(self, features: torch.Tensor) -> float:
        """``r`` of a feature set ``[n, D]`` (higher is better)."""
        return self.sign * float(self.statistic(features))

    def __call__(self, images: torch.Tensor, prompts=None, metadata=None):
        """``{"score": [N] leave-one-out contributions, stat_name: [N] the batch statistic (repeated)}``."""
        feats = self.encode(images)
        if len(feats) < 3:
            raise ValueError(f"{self.name} needs a batch of at least 3 images, got {len(feats)}")
        stat = float(self.statistic(feats))
        return {"score": leave_one_out(self.set_score, feats), self.stat_name: torch.full((len(feats),), stat)}


class FrechetSetReward(_SetReward):
    """``r(S) = -FD(S, references)`` on encoder features (set_level; leave-one-out per sample)."""

    name, stat_name, sign = "frechet_set", "fd", -1.0

    def __init__(self, references: References = None, **kw):
        super().__init__(**kw)
        self.mu, self.sigma = feature_stats(reference_features(self.encoder, references, cache_dir=self.cache_dir,
                                                               min_count=2))

    def statistic(self, features: torch.Tensor) -> torch.Tensor:
        return frechet_distance(*feature_stats(features), self.mu, self.sigma)


class VendiReward(_SetReward):
    """``r(S) = Vendi(S)`` with the cosine kernel on encoder features (set_level; leave-one-out per sample)."""

    name, stat_name, sign = "vendi", "vendi", 1.0

    def statistic(self, features: torch.Tensor) -> torch.Tensor:
        return vendi_score(features)


__all__ = ["ClipEncoder", "DigitsEncoder", "DinoEncoder", "ExemplarSimilarity", "FrechetSetReward",
           "InstanceFrechet", "VendiReward", "build_encoder", "feature_stats", "frechet_distance", "greedy_split",
           "leave_one_out", "load_references", "reference_features", "vendi_score"]
