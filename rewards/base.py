"""The reward protocol, the reward registry, user reward scripts, weighted multi-rewards and validation.

A reward is any callable ``fn(*, images, prompts, metadata) -> scores`` where ``images`` is a float
tensor ``[N, 3, H, W]`` in [0, 1], ``prompts`` a list of N strings and ``metadata`` a list of N dicts;
``scores`` is anything convertible to a float tensor ``[N]`` or a dict of such named tensors (each
component is then logged and the first key, or ``"score"`` if present, is the value used).

Optional attributes a reward object may expose (hints read by :class:`RewardSet`):

- ``batch_size`` (int): the reward is called on chunks of at most this many samples and the chunks'
  scores are concatenated (a failing chunk is reported with the indices of the whole batch);
- ``device``: images are moved to this device before the call;
- ``set_level = True``: a *set-level* reward (e.g. a distributional reward such as DRAGON's, which
  compares the set of generated images with a reference set). It always receives the whole batch in
  one call (``batch_size`` is ignored) and returns ``[N]`` per-sample contributions whose sum (or mean)
  is the set's score, so the per-sample advantages stay well defined.

Scores may live on any device (a GPU reward model's output is fine): they are detached and moved to
the CPU, which is not an error. They may also be lists, NumPy arrays or integer tensors.

A reward is chosen in the config by:
- a registered name (``digit_correct``, ``pickscore``, ...): see :func:`available_rewards`; keyword
  options come from ``reward_options: {name: {...}}``;
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

from genalign.registry import Registry

RewardFn = Callable[..., Any]
_REGISTRY = Registry("reward")


class RewardError(RuntimeError):
    """A reward failed or returned invalid scores. ``reward`` names it, ``indices`` lists bad samples."""

    def __init__(self, message: str, reward: str, indices: Sequence[int] = ()):
        super().__init__(message)
        self.reward = reward
        self.indices = list(indices)


def register_reward(name: str):
    """Decorator registering a reward FACTORY (called with the reward's options, returns the callable)."""
    return _REGISTRY.register(name)


def available_rewards() -> List[str]:
    return _REGISTRY.names()


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
    if spec not in _REGISTRY:
        raise ValueError(f"unknown reward {spec!r}; registered rewards: {available_rewards()} "
                         f"(or give 'path/to/file.py:function')")
    factory = _REGISTRY.get(spec)
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


def score_reward(name: str, fn: RewardFn, images: torch.Tensor, prompts: Sequence[str],
                 metadata: Optional[Sequence[dict]] = None) -> Dict[str, torch.Tensor]:
    """Score a batch with one reward, honouring its hints (``batch_size``, ``device``, ``set_level``).

    Returns ``{"": [N]}`` for a reward returning a tensor, else ``{sub-score name: [N]}``; every tensor is a
    validated float32 CPU tensor. Any failure raises :class:`RewardError` naming ``name``.
    """
    prompts = list(prompts)
    metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
    device = getattr(fn, "device", None)
    if isinstance(device, (str, torch.device)):
        images = images.to(device)
    chunk = getattr(fn, "batch_size", None)
    if getattr(fn, "set_level", False) or not isinstance(chunk, int) or chunk <= 0 or chunk >= len(prompts):
        return _call_validated(name, fn, images, prompts, metadata)
    parts = [_call_validated(name, fn, images[i:i + chunk], prompts[i:i + chunk], metadata[i:i + chunk], i)
             for i in range(0, len(prompts), chunk)]
    if any(p.keys() != parts[0].keys() for p in parts):
        raise RewardError(f"reward {name!r} returned different sub-scores for different chunks: "
                          f"{sorted({k for p in parts for k in p})}", name)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _component_name(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    return getattr(spec, "__name__", type(spec).__name__)


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

    def __call__(self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[dict]] = None
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Score a batch -> ``(total [N], {component name: [N]})`` (float32, on CPU).

        A dict reward ``name`` also reports ``name.key`` for each of its sub-scores.
        """
        if images.ndim != 4 or images.shape[0] != len(prompts):
            raise ValueError(f"images must be [N, 3, H, W] with N = len(prompts) = {len(prompts)}, "
                             f"got {tuple(images.shape)}")
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
