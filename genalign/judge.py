"""An independent judge of generated images: realism and diversity measured in a feature space that no reward
sees.

The project's realism numbers (``benchmarks/compare_digits.py``) use the digit classifier's own penultimate
features, i.e. the features of the reward being optimised, so they are blind to reward hacking: an image that
fools the classifier also looks "real" to its features. The judge here instead projects raw pixels onto a
PCA basis fitted on held-out REAL images (:class:`PixelPCA`), independent of every reward, and reports

* ``fd_independent``: the Frechet distance (the closed form behind FID, Heusel et al. 2017,
  "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", arXiv 1706.08500)
  between generated and real features;
* ``diversity``: the mean over prompted classes of the mean pairwise feature distance within the class
  (:func:`within_class_diversity`), and ``diversity_ratio``: that of the generated images over that of the
  real ones (1 = as diverse as real data, 0 = mode collapse);
* ``vendi``: the Vendi score (Friedman & Dieng 2022, "The Vendi Score: A Diversity Evaluation Metric for
  Machine Learning", arXiv 2210.02410) of the generated features with the cosine-similarity kernel: the
  effective number of distinct samples, from 1 (all identical) to n (all orthogonal).

Images are ``[N, C, H, W]`` tensors, all in the same value range (the project's reward images are in
``[0, 1]``); channels are averaged, so grey RGB and single-channel images give the same features.
Only torch and numpy are used.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]


def _as_float64(x: ArrayLike) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(torch.float64)


def _pixels(images: ArrayLike) -> torch.Tensor:
    """``[N, C, H, W]`` -> channel-mean pixels ``[N, H * W]`` (float64)."""
    x = _as_float64(images)
    if x.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(x.shape)}")
    return x.mean(dim=1).reshape(x.shape[0], -1)


class PixelPCA:
    """A PCA feature space of pixels, fitted on real images only (so it is independent of every reward).

    ``PixelPCA.fit(real_images, dim)`` centres the channel-mean pixels on their mean and keeps the top ``dim``
    right singular vectors; :meth:`features` projects images onto them (as ``sklearn.decomposition.PCA``
    ``transform`` does, without whitening; components agree with sklearn's up to sign).
    """

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, explained_variance: torch.Tensor,
                 image_shape: Sequence[int]):
        self.mean = mean                              # [D]
        self.components = components                  # [dim, D], orthonormal rows
        self.explained_variance = explained_variance  # [dim]
        self.image_shape = tuple(image_shape)         # (H, W)

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def fit(cls, real_images: ArrayLike, dim: int = 32) -> "PixelPCA":
        """Fit on ``real_images [N, C, H, W]``; ``dim`` must be at most ``min(N, H * W)``."""
        x = _pixels(real_images)
        n, d = x.shape
        if not 1 <= dim <= min(n, d):
            raise ValueError(f"dim must be in [1, min(N={n}, H*W={d})], got {dim}")
        mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        var = s[:dim] ** 2 / max(n - 1, 1)
        return cls(mean, vh[:dim].contiguous(), var, _as_float64(real_images).shape[-2:])

    def features(self, images: ArrayLike) -> torch.Tensor:
        """``images [N, C, H, W]`` (same range as the fitted images) -> features ``[N, dim]`` float64."""
        x = _pixels(images)
        if tuple(_as_float64(images).shape[-2:]) != self.image_shape:
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the PCA was fitted on {self.image_shape}")
        return (x - self.mean) @ self.components.T


def feature_stats(features: torch.Tensor):
    """``[N, D]`` -> ``(mean [D], covariance [D, D])`` in float64 (N >= 2)."""
    f = _as_float64(features).reshape(len(features), -1)
    if len(f) < 2:
        raise ValueError(f"statistics need at least 2 feature vectors, got {len(f)}")
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def _sqrtm_psd(s: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root by eigendecomposition (negative round-off eigenvalues clamped to 0)."""
    vals, vecs = torch.linalg.eigh((s + s.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_from_stats(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` -> scalar tensor (float64; arXiv 1706.08500, eq. 6).

    ``tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2)``: a symmetric PSD root, stable for singular S (the one
    implementation of the project: the judge here and DRAGON's distributional rewards use it).
    """
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    r1 = _sqrtm_psd(s1)
    middle = r1 @ s2 @ r1
    tr_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_root


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, D]`` (:func:`frechet_from_stats`),
    clamped at 0 (round-off)."""
    a, b = _as_float64(feats_a), _as_float64(feats_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    return max(float(frechet_from_stats(*feature_stats(a), *feature_stats(b))), 0.0)


def mean_pairwise_distance(feats: ArrayLike) -> float:
    """Mean Euclidean distance over all unordered pairs of rows of ``feats [N, D]`` (0.0 when N < 2)."""
    x = _as_float64(feats)
    n = x.shape[0]
    if n < 2:
        return 0.0
    d = torch.cdist(x, x)
    iu = torch.triu_indices(n, n, offset=1)
    return float(d[iu[0], iu[1]].mean())


def vendi_score(feats: ArrayLike) -> float:
    """Vendi score (arXiv 2210.02410, eq. 1): ``exp(-sum_i l_i log l_i)`` over the eigenvalues ``l_i`` of
    ``K / n``, ``K`` the cosine-similarity matrix of the rows of ``feats [N, D]``. 1 for identical rows, n for
    mutually orthogonal ones. An all-zero row has similarity 0 to every row, itself included."""
    x = _as_float64(feats)
    n = x.shape[0]
    if n == 0:
        raise ValueError("vendi_score of an empty set")
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    eig = torch.linalg.eigvalsh(x @ x.T / n).clamp_min(0)
    eig = eig[eig > 1e-12]
    eig = eig / eig.sum()
    return float(torch.exp(-(eig * eig.log()).sum()))


def _classes(labels: ArrayLike) -> torch.Tensor:
    return torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)).reshape(-1)


def within_class_diversity(feats: ArrayLike, labels: ArrayLike, classes: Optional[Sequence[int]] = None) -> float:
    """Mean over classes of :func:`mean_pairwise_distance` within the class (classes with < 2 members are
    skipped). ``classes``: the classes to average over (default: every label present)."""
    x, y = _as_float64(feats), _classes(labels)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} labels")
    classes = sorted(set(y.tolist())) if classes is None else list(classes)
    per = [mean_pairwise_distance(x[y == c]) for c in classes if int((y == c).sum()) >= 2]
    if not per:
        raise ValueError("no class has at least 2 members")
    return float(np.mean(per))


def diversity_ratio(gen_feats: ArrayLike, gen_labels: ArrayLike, real_feats: ArrayLike, real_labels: ArrayLike) -> float:
    """:func:`within_class_diversity` of the generated features over that of the real ones, both averaged over
    the classes present (with >= 2 members) in both sets. 1 = as diverse per class as real data; 0 = collapse."""
    g, r = _classes(gen_labels), _classes(real_labels)
    shared = sorted(c for c in set(g.tolist()) & set(r.tolist())
                    if int((g == c).sum()) >= 2 and int((r == c).sum()) >= 2)
    if not shared:
        raise ValueError("generated and real sets share no class with >= 2 members each")
    real = within_class_diversity(real_feats, r, shared)
    return within_class_diversity(gen_feats, g, shared) / real if real > 0 else float("nan")


def precision_recall(gen_feats: ArrayLike, real_feats: ArrayLike, k: int = 3) -> Dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
    Assessing Generative Models", arXiv 1904.06991): each set's manifold is the union of balls around its
    points with radius the distance to the point's ``k``-th nearest neighbour in the same set. Precision = the
    fraction of generated points inside the real manifold (realism), recall = the fraction of real points inside
    the generated manifold (coverage). Both in [0, 1]; each set needs more than ``k`` points."""
    g, r = _as_float64(gen_feats), _as_float64(real_feats)
    if min(len(g), len(r)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got {len(g)} and {len(r)}")

    def radii(x: torch.Tensor) -> torch.Tensor:  # distance to the k-th neighbour, self excluded
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values

    def inside(points: torch.Tensor, centres: torch.Tensor) -> float:
        return float((torch.cdist(points, centres) <= radii(centres)[None]).any(dim=1).double().mean())

    return {"precision": inside(g, r), "recall": inside(r, g)}


def judge(images: ArrayLike, prompt_labels: ArrayLike, real_images: ArrayLike, real_labels: ArrayLike,
          pca: PixelPCA) -> Dict[str, float]:
    """Judge generated ``images [N, C, H, W]`` (prompted classes ``prompt_labels [N]``) against real
    ``real_images`` / ``real_labels`` in the independent feature space ``pca`` (fit it on real images that
    are NOT ``real_images``, e.g. the training split). Returns ``{"fd_independent", "diversity",
    "diversity_ratio", "vendi"}`` (see the module docstring); a metric the request is too small for is left out
    (FD needs 2 images, diversity a class with 2 images)."""
    gen, real = pca.features(images), pca.features(real_images)
    out = {"fd_independent": frechet_distance(gen, real)} if len(gen) >= 2 else {}
    if _has_pairs(prompt_labels):  # diversity needs a class with >= 2 images (a small request may have none)
        out["diversity"] = within_class_diversity(gen, prompt_labels)
        out["diversity_ratio"] = diversity_ratio(gen, prompt_labels, real, real_labels)
    out["vendi"] = vendi_score(gen)
    return out


def _has_pairs(labels: ArrayLike) -> bool:
    """Some label occurs at least twice."""
    return bool((torch.unique(_classes(labels), return_counts=True)[1] >= 2).any())


class EncoderJudge:
    """The independent judge for any image model: an image encoder (``encode(images [N, 3, H, W] in [0, 1]) ->
    [N, D]``, e.g. DINOv2 or CLIP; choose one that no reward in use shares) and reference images of the target
    distribution. Called as ``judge(images, prompts) -> {"eval/fd_independent", "eval/diversity", "eval/vendi",
    "eval/precision", "eval/recall"}``: the Frechet distance of the generated features to the references',
    the mean within-prompt pairwise feature distance (no per-prompt real reference exists, so it is absolute:
    compare runs with the base's value, as :class:`genalign.hacking.HackingMonitor` does), the Vendi score and
    k-NN precision / recall (:func:`precision_recall`).

    references: ``[M, 3, H, W]`` in ``[0, 1]`` or a directory of images (read with PIL, resized to the generated
    images' size on first use).
    """

    def __init__(self, encoder, references, k: int = 3):
        if not hasattr(encoder, "encode"):
            raise TypeError(f"the judge encoder must have encode(images), got {type(encoder).__name__}")
        self.encoder, self.references, self.k = encoder, references, k
        self._real: Optional[torch.Tensor] = None

    def _reference_features(self, size) -> torch.Tensor:
        if self._real is None:
            refs = self.references
            if isinstance(refs, str):
                refs = load_image_dir(refs, size)
            self._real = _as_float64(self.encoder.encode(refs.float()))
        return self._real

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> Dict[str, float]:
        gen = _as_float64(self.encoder.encode(images.float()))
        real = self._reference_features(tuple(images.shape[-2:]))
        ids = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        labels = torch.tensor([ids[p] for p in prompts])
        out = {"eval/fd_independent": frechet_distance(gen, real)} if len(gen) >= 2 else {}
        if _has_pairs(labels):  # metrics the request is too small for are left out
            out["eval/diversity"] = within_class_diversity(gen, labels)
        out["eval/vendi"] = vendi_score(gen)
        if min(len(gen), len(real)) > self.k:
            out.update({f"eval/{k}": v for k, v in precision_recall(gen, real, self.k).items()})
        return out


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_image_dir(path: str, size) -> torch.Tensor:
    """Every image file of directory ``path`` (sorted) as RGB ``[M, 3, H, W]`` in ``[0, 1]`` resized to ``size``
    ``(H, W)`` (bilinear); ``ValueError`` for a missing directory or one without images."""
    import os

    from PIL import Image

    if not os.path.isdir(path):
        raise ValueError(f"judge reference directory {path!r} does not exist")
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"judge reference directory {path!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for f in files:
        img = Image.open(os.path.join(path, f)).convert("RGB").resize((int(size[1]), int(size[0])), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


def build_judge(policy, encoder: Optional[str] = None, references=None, options: Optional[dict] = None, device=None):
    """The independent judge of a run or an evaluation: ``encoder`` (a ``genalign.encoders`` name) with
    ``references`` -> :class:`EncoderJudge`; else the model adapter's own ``independent_judge()`` (digits: pixel
    PCA); else None. A callable ``(images, prompts) -> {"eval/...": float}``."""
    if encoder:
        if not references:
            raise ValueError(f"the judge encoder {encoder!r} needs reference images (eval.judge_references)")
        from .plugins import load_encoder

        return EncoderJudge(load_encoder(encoder, device=device, **(options or {})), references)
    return policy.independent_judge() if hasattr(policy, "independent_judge") else None
