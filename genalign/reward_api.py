"""The reward protocol (core): the registry, user reward scripts, weighted multi-rewards, validation, the
set-level helpers of DRAGON and the discriminator round of Adv-GRPO. Reward implementations live in plugins
(``genalign.rewards`` and third-party packages), found by name through :mod:`genalign.plugins`.

A reward is any callable ``fn(*, images, prompts, metadata) -> scores`` where ``images`` is a float
tensor ``[N, 3, H, W]`` in [0, 1], ``prompts`` a list of N strings and ``metadata`` a list of N dicts;
``scores`` is anything convertible to a float tensor ``[N]`` or a dict of such named tensors (each
component is then logged and the first key, or ``"score"`` if present, is the value used).

Videos (a video model's samples, ``[N, F, 3, H, W]`` in [0, 1] with F frames, e.g. Wan 2.1's, arXiv 2503.20314):
a reward declaring ``modality = "video"`` (an attribute of the function or object) receives the videos as they
are. Any other reward is an image reward: it receives every frame as an image, ``[N * F, 3, H, W]`` (video-major),
each frame with its prompt and its video's metadata plus ``"frame"`` (the frame's index), and a video's score
(and each sub-score) is the MEAN of its frames' scores. Images ``[N, 3, H, W]`` go to image rewards unchanged; a
video reward given images, or any tensor of another rank, raises :class:`RewardError` naming the reward.

Optional attributes a reward object may expose (hints read by :class:`RewardSet`):

- ``batch_size`` (int): the reward is called on chunks of at most this many samples and the chunks'
  scores are concatenated (a failing chunk is reported with the indices of the whole batch);
- ``device``: images are moved to this device before the call;
- ``set_level = True``: a *set-level* reward (e.g. a distributional reward such as DRAGON's, which
  compares the set of generated images with a reference set). It always receives the whole batch in
  one call (``batch_size`` is ignored) and returns ``[N]`` per-sample contributions whose sum (or mean)
  is the set's score, so the per-sample advantages stay well defined. One exposing ``encode(images)`` and
  ``set_score(features)`` can also drive DRAGON's :func:`greedy_split`;
- ``group_level = True``: a *group-level* reward (rankings, pairwise preferences within a prompt's group). It is
  called once per prompt group with all of that group's images (and only them): each sample's metadata carries
  ``"group"`` (the trainer's group id; an evaluation's prompt index) and :func:`score_reward` splits the batch
  by it; it returns ``[n]`` scores for the group's n images. A batch without ``"group"`` metadata is an error;
- a :class:`TrainableReward` subclass (``discriminator_step`` / ``mean_scores``): an adversarial reward,
  trained by :func:`discriminator_round`.

Scores may live on any device (a GPU reward model's output is fine): they are detached and moved to
the CPU, which is not an error. They may also be lists, NumPy arrays or integer tensors.

A reward is chosen in the config by:
- a registered name (``digit_correct``, ``pickscore``, ...): see :func:`available_rewards`; keyword
  options come from ``reward_options: {name: {...}}``. A name is looked up in the in-process registry
  (:func:`register_reward`) first, then among the ``genalign.rewards`` entry points of the installed
  packages (the built-ins are declared there too); either way the name maps to a FACTORY called with the
  options, which returns the reward callable;
- ``path/to/file.py:function`` (loading a script RUNS that file's code, like ``import``); options given
  for that spec are passed as extra keywords (to the function on each call, or to a class once);
- a mapping ``{spec: weight, ...}`` for a weighted sum, every component logged.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import os
import sys
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .plugins import REWARDS_GROUP, PluginError, entry_points, load_entry_point
from .registry import Registry

RewardFn = Callable[..., Any]
_REGISTRY = Registry("reward")


class RewardError(RuntimeError):
    """A reward failed or returned invalid scores. ``reward`` names it, ``indices`` lists bad samples."""

    def __init__(self, message: str, reward: str, indices: Sequence[int] = ()):
        super().__init__(message)
        self.reward = reward
        self.indices = list(indices)


def register_reward(name: str):
    """Decorator registering a reward FACTORY (called with the reward's options, returns the callable) in this
    process; it wins over a ``genalign.rewards`` entry point of the same name."""
    return _REGISTRY.register(name)


def available_rewards() -> List[str]:
    """Reward names: in-process registrations and the ``genalign.rewards`` entry points (nothing is imported)."""
    return sorted(set(_REGISTRY.names()) | set(entry_points(REWARDS_GROUP)))


def reward_factory(name: str) -> Callable[..., RewardFn]:
    """The factory registered as ``name``, else the one a ``genalign.rewards`` entry point names.

    An unknown name raises ``ValueError`` listing the available ones; an entry point whose module cannot
    be imported raises :class:`genalign.plugins.PluginError`.
    """
    if name in _REGISTRY:
        return _REGISTRY.get(name)
    try:
        return load_entry_point(REWARDS_GROUP, name)
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {available_rewards()} "
                         f"(or give 'path/to/file.py:function')") from None


def load_script_function(spec: str, **options) -> RewardFn:
    """Load ``path/to/file.py:name`` (runs the file's code).

    A class is instantiated with ``options``; a function gets ``options`` as extra keywords on each call.
    """
    path, _, attr = spec.rpartition(":")
    if not path.endswith(".py") or not attr:
        raise ValueError(f"reward script spec must look like 'path/to/file.py:function', got {spec!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reward script {path!r} (from {spec!r}) does not exist")
    mod_name = f"genalign_user_reward_{abs(hash(os.path.abspath(path)))}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    module_spec.loader.exec_module(module)
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise AttributeError(f"reward script {path!r} has no {attr!r}; callables defined there: {public}")
    fn = getattr(module, attr)
    if inspect.isclass(fn):
        return fn(**options)
    if not callable(fn):
        raise TypeError(f"{spec!r} is not callable")
    return functools.partial(fn, **options) if options else fn


def _accepts(fn: Callable, keyword: str) -> bool:
    """Whether ``fn`` names a parameter ``keyword`` (a bare ``**kwargs`` does not count)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any(p.name == keyword and p.kind in named for p in params)


def load_reward(spec: Union[str, RewardFn], *, default_device=None, **options) -> RewardFn:
    """Resolve one reward: a callable, a registered name, or ``file.py:function``.

    ``options`` go to the registered factory (or the script, see :func:`load_script_function`).
    ``default_device`` is given as ``device`` to registered factories taking that option, unless ``options``
    has one.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a reward must be a name, 'file.py:function' or a callable, got {type(spec).__name__}")
    if ".py:" in spec:
        return load_script_function(spec, **options)
    factory = reward_factory(spec)
    if default_device is not None and "device" not in options and _accepts(factory, "device"):
        options["device"] = default_device
    return factory(**options)


def _describe(indices: Sequence[int], prompts: Sequence[str], offset: int = 0, limit: int = 5) -> str:
    """``indices`` index ``prompts``; they are shown shifted by ``offset`` (the position in the whole batch)."""
    shown = ", ".join(f"#{i + offset} {prompts[i]!r}" for i in list(indices)[:limit] if i < len(prompts))
    more = f" (+{len(indices) - limit} more)" if len(indices) > limit else ""
    return f"samples [{shown}]{more}"


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def validate_scores(name: str, scores: Any, prompts: Sequence[str], device=None, offset: int = 0) -> torch.Tensor:
    """Convert one reward's output to a finite float32 tensor ``[N]``, or raise :class:`RewardError`.

    Scores on another device are moved to ``device`` (the CPU by default: not an error); ``[N, 1]`` is
    squeezed. ``offset`` is the position of ``prompts[0]`` in the whole batch (for chunked calls): the
    indices in the error are positions in the whole batch.
    """
    n = len(prompts)
    try:
        t = torch.as_tensor(scores.detach() if isinstance(scores, torch.Tensor) else scores)
    except Exception as exc:  # noqa: BLE001 - report what the user returned
        raise RewardError(f"reward {name!r} returned {type(scores).__name__}, which is not numeric: {exc}",
                          name) from None
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in _INT_DTYPES):
        raise RewardError(f"reward {name!r} returned non-numeric scores of dtype {t.dtype}", name)
    t = t.to(device or "cpu", torch.float32)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.shape != (n,):
        raise RewardError(f"reward {name!r} returned scores of shape {tuple(t.shape)} for {n} samples "
                          f"(expected [{n}])", name)
    bad = (~torch.isfinite(t)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"reward {name!r} returned NaN/inf for {_describe(bad, prompts, offset)}", name,
                          [i + offset for i in bad])
    return t


def _call_validated(name: str, fn: RewardFn, images: torch.Tensor, prompts: List[str], metadata: List[dict],
                    offset: int = 0) -> Dict[str, torch.Tensor]:
    """One call of ``fn`` -> ``{sub-score name: [n]}`` (``{"": [n]}`` for a plain tensor), validated."""
    try:
        out = fn(images=images, prompts=prompts, metadata=metadata)
    except RewardError:
        raise
    except Exception as exc:  # noqa: BLE001 - wrap with the reward's name
        where = f" on samples {offset}..{offset + len(prompts) - 1}" if offset else ""
        raise RewardError(f"reward {name!r} raised {type(exc).__name__}{where}: {exc}", name) from exc
    if isinstance(out, Mapping):
        if not out:
            raise RewardError(f"reward {name!r} returned an empty dict", name)
        return {str(k): validate_scores(f"{name}.{k}", v, prompts, offset=offset) for k, v in out.items()}
    return {"": validate_scores(name, out, prompts, offset=offset)}


def is_video_reward(fn: RewardFn) -> bool:
    """The reward declares ``modality = "video"``: it scores whole videos ``[N, F, 3, H, W]``."""
    return getattr(fn, "modality", "image") == "video"


def _check_rank(name: str, fn: RewardFn, images: torch.Tensor) -> None:
    """Refuse what ``fn`` cannot score (see the module docstring): a video reward needs ``[N, F, 3, H, W]``,
    an image reward ``[N, 3, H, W]`` or videos (scored frame by frame)."""
    shape = tuple(images.shape)
    if is_video_reward(fn) and images.ndim != 5:
        raise RewardError(f"reward {name!r} is a video reward (modality = 'video'): it needs videos "
                          f"[N, F, 3, H, W], got a tensor of shape {shape}", name)
    if images.ndim not in (4, 5):
        raise RewardError(f"reward {name!r} scores images [N, 3, H, W] or videos [N, F, 3, H, W] (frame by frame), "
                          f"got a tensor of shape {shape}", name)


def _score_frames(name: str, fn: RewardFn, videos: torch.Tensor, prompts: List[str],
                  metadata: List[dict]) -> Dict[str, torch.Tensor]:
    """An image reward on videos ``[N, F, 3, H, W]``: every frame scored as an image (its video's prompt and
    metadata plus ``"frame"``), then each (sub-)score averaged over the frames of its video -> ``[N]``."""
    n, f = videos.shape[:2]
    frame_prompts = [p for p in prompts for _ in range(f)]
    frame_meta = [{**m, "frame": k} for m in metadata for k in range(f)]
    try:
        subs = score_reward(name, fn, videos.flatten(0, 1), frame_prompts, frame_meta)
    except RewardError as err:  # frame indices -> video indices
        videos_hit = sorted({i // f for i in err.indices})
        raise RewardError(f"{err} (frame-by-frame on {n} videos of {f} frames: videos {videos_hit[:10]})",
                          err.reward, videos_hit) from err
    return {k: v.reshape(n, f).mean(dim=1) for k, v in subs.items()}


def score_reward(name: str, fn: RewardFn, images: torch.Tensor, prompts: Sequence[str],
                 metadata: Optional[Sequence[dict]] = None) -> Dict[str, torch.Tensor]:
    """Score a batch with one reward, honouring its hints (``batch_size``, ``device``, ``set_level``).

    Returns ``{"": [N]}`` for a reward returning a tensor, else ``{sub-score name: [N]}``; every tensor is a
    validated float32 CPU tensor. Any failure raises :class:`RewardError` naming ``name``.
    Videos ``[N, F, 3, H, W]`` go whole to a video reward (``modality = "video"``); an image reward scores their
    frames and each video gets the mean of its frames' scores (module docstring).
    """
    prompts = list(prompts)
    metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
    _check_rank(name, fn, images)
    if images.ndim == 5 and not is_video_reward(fn):
        return _score_frames(name, fn, images, prompts, metadata)
    device = getattr(fn, "device", None)
    if isinstance(device, (str, torch.device)):
        images = images.to(device)
    if getattr(fn, "group_level", False):
        return _score_groups(name, fn, images, prompts, metadata)
    chunk = getattr(fn, "batch_size", None)
    if getattr(fn, "set_level", False) or not isinstance(chunk, int) or chunk <= 0 or chunk >= len(prompts):
        return _call_validated(name, fn, images, prompts, metadata)
    parts = [_call_validated(name, fn, images[i:i + chunk], prompts[i:i + chunk], metadata[i:i + chunk], i)
             for i in range(0, len(prompts), chunk)]
    if any(p.keys() != parts[0].keys() for p in parts):
        raise RewardError(f"reward {name!r} returned different sub-scores for different chunks: "
                          f"{sorted({k for p in parts for k in p})}", name)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _score_groups(name: str, fn: RewardFn, images: torch.Tensor, prompts: List[str],
                  metadata: List[dict]) -> Dict[str, torch.Tensor]:
    """A group-level reward called once per ``metadata[i]["group"]`` with that group's samples, scattered back."""
    missing = [i for i, m in enumerate(metadata) if "group" not in m]
    if missing:
        raise RewardError(f"reward {name!r} is group-level (group_level = True): it needs each sample's prompt group "
                          f"in its metadata ('group'), missing for sample(s) {missing[:10]}", name, missing)
    groups: Dict[Any, List[int]] = {}
    for i, m in enumerate(metadata):
        groups.setdefault(m["group"], []).append(i)
    parts = []
    for members in groups.values():
        scored = _call_validated(name, fn, images[torch.tensor(members)], [prompts[i] for i in members],
                                 [metadata[i] for i in members])
        parts.append((torch.tensor(members), scored))
    keys = parts[0][1].keys()
    if any(p.keys() != keys for _, p in parts):
        raise RewardError(f"reward {name!r} returned different sub-scores for different groups: "
                          f"{sorted({k for _, p in parts for k in p})}", name)
    out = {k: torch.zeros(len(prompts)) for k in keys}
    for idx, scored in parts:
        for k in keys:
            out[k][idx] = scored[k]
    return out


def _component_name(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    return getattr(spec, "__name__", type(spec).__name__)


class TrainableReward:
    """Protocol of a reward model trained between generator rounds (Adv-GRPO's discriminator): subclass it.

    ``discriminator_step(images, generator=None, prompts=None) -> stats``: one update on generated ``images``
    (negatives) against references (through :class:`genalign.optim.OptimizerStep`);
    ``mean_scores(images, generator=None, prompts=None) -> (mean generated, mean reference)`` for the
    ``while_behind`` rule; ``state_dict()`` / ``load_state_dict()`` (its weights and optimizer, saved with the
    generator's checkpoints). The trainer finds such a reward by this type, not by attribute sniffing.
    """

    def discriminator_step(self, images, generator=None, prompts=None) -> Dict[str, float]:
        raise NotImplementedError

    def mean_scores(self, images, generator=None, prompts=None):
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class RewardSet:
    """A weighted sum of rewards; every component (and sub-score of a dict reward) is reported.

    ``spec``: one reward spec, or a mapping ``{spec: weight}``, e.g. ``{"pickscore": 1.0, "my.py:fn": 0.5}``.
    ``options``: per-spec keyword options (keyed by the spec as written), passed to registered factories
    and to scripts, e.g. ``{"digit_correct": {"model_dir": "digits"}, "pickscore": {"normalize": True}}``.
    ``device``: default device for built-in reward models that take one (an explicit option wins).
    """

    def __init__(self, spec: Union[str, RewardFn, Mapping[str, float]], options: Optional[Mapping[str, dict]] = None,
                 device=None):
        options = dict(options or {})
        if isinstance(spec, Mapping):
            if not spec:
                raise ValueError("the reward mapping is empty: give at least one {reward: weight}")
            items = list(spec.items())
        else:
            items = [(spec, 1.0)]
        unused = set(options) - {_component_name(s) for s, _ in items}
        if unused:  # e.g. a config's options kept while the reward is overridden on the command line
            warnings.warn(f"reward_options given for {sorted(unused)}, which are not among the rewards "
                          f"{[_component_name(s) for s, _ in items]}: ignored", stacklevel=2)
        self.components: List[Tuple[str, RewardFn, float]] = []
        for s, w in items:
            name = _component_name(s)
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise ValueError(f"reward weight for {name!r} must be a finite number, got {w!r}")
            fn = load_reward(s, default_device=device, **dict(options.get(name, {})))
            self.components.append((name, fn, float(w)))

    @property
    def names(self) -> List[str]:
        return [n for n, _, _ in self.components]

    @property
    def group_level(self) -> bool:
        """Some component is a group-level reward (it must see whole prompt groups in one call)."""
        return any(getattr(fn, "group_level", False) for _, fn, _ in self.components)

    def __call__(self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[dict]] = None
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Score a batch -> ``(total [N], {component name: [N]})`` (float32, on CPU).

        A dict reward ``name`` also reports ``name.key`` for each of its sub-scores. ``images``: images
        ``[N, 3, H, W]`` or videos ``[N, F, 3, H, W]`` (an image reward scores a video by the mean over its frames,
        see the module docstring); another rank raises :class:`RewardError` naming the first reward refusing it.
        """
        if images.ndim == 0 or images.shape[0] != len(prompts):
            raise ValueError(f"images must be [N, 3, H, W] (videos: [N, F, 3, H, W]) with N = len(prompts) = "
                             f"{len(prompts)}, got {tuple(images.shape)}")
        total = torch.zeros(len(prompts))
        parts: Dict[str, torch.Tensor] = {}
        for name, fn, weight in self.components:
            subs = score_reward(name, fn, images, prompts, metadata)
            if "" in subs:
                main = subs[""]
            else:
                main = subs.get("score", next(iter(subs.values())))
                parts.update({f"{name}.{k}": v for k, v in subs.items()})
            parts[name] = main
            total = total + weight * main
        return total, parts


# ----------------------------------------------------------------------------------- set-level rewards
SetScore = Callable[[torch.Tensor], float]


def leave_one_out(set_score: SetScore, features: torch.Tensor) -> torch.Tensor:
    """Per-sample contributions ``r(S) - r(S \\ x_i)`` of a set reward ``set_score([n, D]) -> float`` -> ``[N]``."""
    full = float(set_score(features))
    keep = ~torch.eye(len(features), dtype=torch.bool)
    return torch.tensor([full - float(set_score(features[keep[i]])) for i in range(len(features))])


def greedy_split(set_score: SetScore, features: torch.Tensor, num_pos: Optional[int] = None,
                 init: Optional[torch.Tensor] = None, max_swaps: int = 100) -> torch.Tensor:
    """D+ as a bool mask ``[N]``: start from ``init`` (default: the top ``num_pos`` = N // 2 leave-one-out
    contributions) and swap a (D+, D-) pair whenever that raises ``set_score(features[D+])``; stop when no
    swap improves (a local optimum) or after ``max_swaps`` swaps (DRAGON's greedy set split, docs/algorithms.md §6)."""
    n = len(features)
    if init is None:
        num_pos = n // 2 if num_pos is None else num_pos
        if not 0 < num_pos < n:
            raise ValueError(f"num_pos must be in [1, {n - 1}], got {num_pos}")
        init = torch.zeros(n, dtype=torch.bool)
        init[leave_one_out(set_score, features).argsort(descending=True)[:num_pos]] = True
    pos = init.clone().bool()
    best = float(set_score(features[pos]))
    for _ in range(max_swaps):
        improved = False
        for i in pos.nonzero().flatten().tolist():
            for j in (~pos).nonzero().flatten().tolist():
                trial = pos.clone()
                trial[i], trial[j] = False, True
                value = float(set_score(features[trial]))
                if value > best:
                    pos, best, improved = trial, value, True
                    break
            if improved:
                break
        if not improved:
            break
    return pos


# ------------------------------------------------------------------------- adversarial rewards
ADVERSARIAL_RULES = ("fixed", "while_behind")


def discriminator_round(adversary, sample: Callable[[int], Any], steps: int, rule: str = "fixed",
                        seed: int = 0) -> Dict[str, float]:
    """Adv-GRPO (arXiv 2511.20256, docs/algorithms.md §7): train an adversarial reward's discriminator between
    generator rounds; ``sample(k)`` -> fresh generated images for step k, or ``(images, prompts)`` (needed
    with per-prompt references).

    ``adversary`` is any reward exposing ``discriminator_step(images, generator, prompts) -> {stat: float}``
    (one discriminator update) and ``mean_scores(images, generator, prompts) -> (mean reward of images,
    mean reward of as many references)``, e.g. the built-in ``adversarial`` reward; the trainer treats a
    reward with ``discriminator_step`` as such.

    ``rule="fixed"``: ``steps`` steps. ``"while_behind"``: at most ``steps``, each only while the generated
    images still outscore the references (mean reward), the PickScore variant's rule.
    """
    if rule not in ADVERSARIAL_RULES:
        raise ValueError(f"adversarial rule must be one of {ADVERSARIAL_RULES}, got {rule!r}")
    gen = torch.Generator().manual_seed(seed)
    stats: Dict[str, float] = {}
    done = 0
    for k in range(steps):
        drawn = sample(k)
        images, prompts = drawn if isinstance(drawn, tuple) else (drawn, None)
        if rule == "while_behind":
            r_gen, r_ref = adversary.mean_scores(images, gen, prompts)
            if r_ref > r_gen:
                break
        stats = adversary.discriminator_step(images, gen, prompts)
        done += 1
    return {**stats, "disc/d_steps": float(done)}


__all__ = ["ADVERSARIAL_RULES", "PluginError", "RewardError", "RewardFn", "RewardSet", "SetScore", "available_rewards",
           "discriminator_round", "greedy_split", "is_video_reward", "leave_one_out", "load_reward",
           "load_script_function", "register_reward", "reward_factory", "score_reward", "validate_scores"]
