"""The reward protocol, the reward registry, user reward scripts, weighted multi-rewards and validation.

A reward is any callable ``fn(*, images, prompts, metadata) -> scores`` where ``images`` is a float
tensor ``[N, 3, H, W]`` in [0, 1], ``prompts`` a list of N strings and ``metadata`` a list of N dicts;
``scores`` is anything convertible to a float tensor ``[N]`` or a dict of such named tensors (each
component is then logged and the first key, or ``"score"`` if present, is the value used).

A reward is chosen in the config by:
- a registered name (``digit_correct``, ...): see :func:`available_rewards`;
- ``path/to/file.py:function`` (loading a script RUNS that file's code, like ``import``);
- a mapping ``{spec: weight, ...}`` for a weighted sum, every component logged.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import sys
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


def load_script_function(spec: str) -> RewardFn:
    """Load ``path/to/file.py:name`` (runs the file's code). A class is instantiated without arguments."""
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
        fn = fn()
    if not callable(fn):
        raise TypeError(f"{spec!r} is not callable")
    return fn


def load_reward(spec: Union[str, RewardFn], **options) -> RewardFn:
    """Resolve one reward: a callable, a registered name, or ``file.py:function``."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a reward must be a name, 'file.py:function' or a callable, got {type(spec).__name__}")
    if ".py:" in spec:
        return load_script_function(spec)
    if spec not in _REGISTRY:
        raise ValueError(f"unknown reward {spec!r}; registered rewards: {available_rewards()} "
                         f"(or give 'path/to/file.py:function')")
    return _REGISTRY.get(spec)(**options)


def _describe(indices: Sequence[int], prompts: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(f"#{i} {prompts[i]!r}" for i in list(indices)[:limit] if i < len(prompts))
    more = f" (+{len(indices) - limit} more)" if len(indices) > limit else ""
    return f"samples [{shown}]{more}"


def validate_scores(name: str, scores: Any, prompts: Sequence[str], device=None) -> torch.Tensor:
    """Convert one reward's output to a finite float32 tensor ``[N]``, or raise :class:`RewardError`."""
    n = len(prompts)
    try:
        t = torch.as_tensor(scores.detach() if isinstance(scores, torch.Tensor) else scores)
    except Exception as exc:  # noqa: BLE001 - report what the user returned
        raise RewardError(f"reward {name!r} returned {type(scores).__name__}, which is not numeric: {exc}",
                          name) from None
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
        raise RewardError(f"reward {name!r} returned non-numeric scores of dtype {t.dtype}", name)
    t = t.to(torch.float32)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.shape != (n,):
        raise RewardError(f"reward {name!r} returned scores of shape {tuple(t.shape)} for {n} samples "
                          f"(expected [{n}])", name)
    bad = (~torch.isfinite(t)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"reward {name!r} returned NaN/inf for {_describe(bad, prompts)}", name, bad)
    return t if device is None else t.to(device)


def _component_name(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    return getattr(spec, "__name__", type(spec).__name__)


class RewardSet:
    """A weighted sum of rewards; every component (and sub-score of a dict reward) is reported.

    ``spec``: one reward spec, or a mapping ``{spec: weight}``. ``options``: per-spec keyword options
    passed to registered factories, e.g. ``{"digit_correct": {"model_dir": "digits"}}``.
    """

    def __init__(self, spec: Union[str, RewardFn, Mapping[str, float]], options: Optional[Mapping[str, dict]] = None):
        options = dict(options or {})
        if isinstance(spec, Mapping):
            if not spec:
                raise ValueError("the reward mapping is empty: give at least one {reward: weight}")
            items = list(spec.items())
        else:
            items = [(spec, 1.0)]
        self.components: List[Tuple[str, RewardFn, float]] = []
        for s, w in items:
            name = _component_name(s)
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise ValueError(f"reward weight for {name!r} must be a finite number, got {w!r}")
            self.components.append((name, load_reward(s, **options.get(name, {})), float(w)))

    @property
    def names(self) -> List[str]:
        return [n for n, _, _ in self.components]

    def __call__(self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[dict]] = None
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Score a batch -> ``(total [N], {component name: [N]})`` (float32, on CPU)."""
        if images.ndim != 4 or images.shape[0] != len(prompts):
            raise ValueError(f"images must be [N, 3, H, W] with N = len(prompts) = {len(prompts)}, "
                             f"got {tuple(images.shape)}")
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        total = torch.zeros(len(prompts))
        parts: Dict[str, torch.Tensor] = {}
        for name, fn, weight in self.components:
            try:
                out = fn(images=images, prompts=list(prompts), metadata=metadata)
            except RewardError:
                raise
            except Exception as exc:  # noqa: BLE001 - wrap with the reward's name
                raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}", name) from exc
            if isinstance(out, Mapping):
                if not out:
                    raise RewardError(f"reward {name!r} returned an empty dict", name)
                subs = {k: validate_scores(f"{name}.{k}", v, prompts, "cpu") for k, v in out.items()}
                main = subs.get("score", next(iter(subs.values())))
                for k, v in subs.items():
                    parts[f"{name}.{k}"] = v
            else:
                main = validate_scores(name, out, prompts, "cpu")
            parts[name] = main
            total = total + weight * main
        return total, parts
