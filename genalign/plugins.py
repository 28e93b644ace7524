"""Plugins: rewards, model adapters and command-line commands found through entry points.

The core of genalign depends on protocols only (:class:`genalign.policy.Policy`, the reward protocol of
:mod:`genalign.reward_api`). The built-in rewards (``genalign.rewards``) and model adapters
(``genalign.pipelines``) are declared in genalign's own ``pyproject.toml`` exactly as a third-party
package declares its own, and are found here by name:

.. code-block:: toml

    [project.entry-points."genalign.rewards"]
    my_reward = "my_pkg.rewards:make_my_reward"   # a factory: make_my_reward(**options) -> reward callable

    [project.entry-points."genalign.pipelines"]
    my_model = "my_pkg.adapter:MyPolicy"          # a Policy class, see policy_class()

    [project.entry-points."genalign.commands"]
    my-command = "my_pkg.cli:main"                # main(argv: list[str]) -> exit code

An in-process registration (:func:`genalign.reward_api.register_reward`, :func:`register_pipeline`) wins
over an entry point of the same name. Entry points are read from the installed distributions' metadata
each time a name is looked up (after ``pip install -e .`` in a checkout, the metadata is current) and
their modules are imported only when the entry is used.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import warnings
from typing import Any, Callable, Dict, List, Optional

from .policy import resolve_pretrained
from .registry import Registry

REWARDS_GROUP = "genalign.rewards"
PIPELINES_GROUP = "genalign.pipelines"
COMMANDS_GROUP = "genalign.commands"
ENCODERS_GROUP = "genalign.encoders"

_PIPELINES = Registry("model adapter")


class PluginError(ImportError):
    """An entry point is declared twice with different targets, or its target cannot be imported."""


def _origin(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "an unknown distribution"
    where = getattr(dist, "_path", None)  # PathDistribution: the .dist-info / .egg-info directory
    return f"distribution {dist.metadata['Name']!r}" + (f" at {where}" if where else "")


def entry_points(group: str) -> Dict[str, importlib.metadata.EntryPoint]:
    """``{name: entry point}`` declared for ``group`` by the installed distributions (nothing is imported).

    One name declared by two distributions with different targets raises :class:`PluginError` naming both.
    """
    found: Dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=group):
        seen = found.get(ep.name)
        if seen is None:
            found[ep.name] = ep
        elif seen.value != ep.value:
            raise PluginError(f"{group} entry point {ep.name!r} is declared twice: {seen.value!r} by {_origin(seen)} "
                              f"and {ep.value!r} by {_origin(ep)}; uninstall one of them")
    return found


def load_entry_point(group: str, name: str) -> Any:
    """Import and return the object the entry point ``name`` of ``group`` names.

    An unknown name raises ``KeyError``; a target that fails to import raises :class:`PluginError`.
    """
    ep = entry_points(group)[name]
    try:
        return ep.load()
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"{group} entry point {name!r} = {ep.value!r} (from {_origin(ep)}) cannot be loaded: "
                          f"{type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------------------------------- commands
def available_commands() -> List[str]:
    """Names of the commands declared in the ``genalign.commands`` group."""
    return sorted(entry_points(COMMANDS_GROUP))


def load_command(name: str) -> Callable[[List[str]], Optional[int]]:
    """The ``main(argv) -> exit code`` declared as ``name`` in the ``genalign.commands`` group."""
    try:
        return load_entry_point(COMMANDS_GROUP, name)
    except KeyError:
        raise ValueError(f"unknown command {name!r}; declared commands: {available_commands()} (is the package "
                         f"that provides it installed?)") from None


def available_encoders() -> List[str]:
    """Names of the image encoders declared in the ``genalign.encoders`` group (the judge's feature spaces)."""
    return sorted(entry_points(ENCODERS_GROUP))


def load_encoder(name: str, device=None, **options) -> Any:
    """The image encoder ``name`` of the ``genalign.encoders`` group, built with ``device`` and ``options``
    (an object with ``encode(images [N, 3, H, W] in [0, 1]) -> [N, D]``)."""
    try:
        cls = load_entry_point(ENCODERS_GROUP, name)
    except KeyError:
        raise ValueError(f"unknown judge encoder {name!r} (eval.judge_encoder); declared encoders: "
                         f"{available_encoders()}") from None
    return cls(device=device, **options)


# ----------------------------------------------------------------------------------- model adapters
def register_pipeline(name: str) -> Callable[[type], type]:
    """Class decorator registering a model adapter in this process (it wins over an entry point of that name).

    An adapter is a :class:`genalign.policy.Policy` class with a ``from_pretrained(model_id, device=None,
    dtype=None, **options)`` classmethod, which :func:`policy_class` picks for a model by:

    - ``handles(path_or_id) -> bool`` (optional classmethod): asked with the id as given and, for a hub id,
      again with its local snapshot directory;
    - ``pipeline_classes`` (optional tuple of str): the diffusers ``model_index.json`` ``_class_name`` values
      it loads, e.g. ``("StableDiffusion3Pipeline",)``.
    """
    return _PIPELINES.register(name)


def available_pipelines() -> List[str]:
    """Adapter names: in-process registrations and the ``genalign.pipelines`` entry points."""
    return sorted(set(_PIPELINES.names()) | set(entry_points(PIPELINES_GROUP)))


def pipeline_adapter(name: str) -> type:
    """The adapter class called ``name`` (a registration first, then the entry point)."""
    if name in _PIPELINES:
        return _PIPELINES.get(name)
    try:
        return load_entry_point(PIPELINES_GROUP, name)
    except KeyError:
        raise ValueError(f"unknown model adapter {name!r}; available: {available_pipelines()}") from None


def _adapters() -> Dict[str, type]:
    """Every adapter that can be imported, in lookup order (registrations, then entry points by name).

    An entry point whose module fails to import is skipped with a warning (it cannot claim a model)."""
    out = {name: _PIPELINES.get(name) for name in _PIPELINES.names()}
    for name, ep in sorted(entry_points(PIPELINES_GROUP).items()):
        if name in out:
            continue
        try:
            out[name] = load_entry_point(PIPELINES_GROUP, name)
        except PluginError as exc:
            warnings.warn(f"model adapter skipped: {exc}", stacklevel=3)
    return out


def _claimed(adapters: Dict[str, type], path_or_id: str) -> Optional[type]:
    for cls in adapters.values():
        handles = getattr(cls, "handles", None)
        if callable(handles) and handles(path_or_id):
            return cls
    return None


def _looks_like_hub_id(model_id: str) -> bool:
    """``owner/name`` (one slash, not a path starting with '.', '/' or '~'), as :func:`genalign.policy.resolve_pretrained` reads it."""
    return model_id.count("/") == 1 and not model_id.startswith((".", "/", "~")) and all(model_id.split("/"))


def hub_model_index(model_id: str) -> str:
    """Local path of the hub model ``model_id``'s ``model_index.json``, through
    ``huggingface_hub.hf_hub_download`` (the Hugging Face cache, HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE are
    honoured; online it downloads that one file, and the adapter's ``from_pretrained`` later lets diffusers
    download the rest). Offline and not cached: :class:`genalign.policy.ModelNotAvailableError` naming what to
    fetch; online failures (unknown or gated repository, no network) raise ``ValueError`` with the hub's reason."""
    from huggingface_hub import hf_hub_download

    from .policy import ModelNotAvailableError, _offline

    try:
        return hf_hub_download(model_id, "model_index.json")
    except Exception as exc:  # noqa: BLE001 - the hub's errors differ between versions; the reason is kept
        if _offline():
            raise ModelNotAvailableError(
                f"model {model_id!r} is neither a local directory nor in the Hugging Face cache, and the hub is "
                f"offline (HF_HUB_OFFLINE=1). Fetch it on a machine with internet access with `hf download "
                f"{model_id}` (or `huggingface-cli download {model_id}`) and copy the cache, or pass the path of a "
                f"local directory saved with save_pretrained.") from None
        raise ValueError(f"cannot fetch model_index.json of hub model {model_id!r} ({type(exc).__name__}: {exc}); "
                         f"check the id, accept the model's license on its hub page and log in (`hf auth login`) "
                         f"for gated models, or pass a local diffusers directory") from exc


def policy_class(model_id: str, adapter: Optional[str] = None) -> type:
    """The adapter class for ``model_id`` ('digits', a digits asset directory, a hub id or a local diffusers
    directory), or the adapter called ``adapter`` when given.

    The first adapter whose ``handles(model_id)`` is true wins; otherwise the id is resolved (a hub id to its
    cached snapshot, see :func:`genalign.policy.resolve_pretrained`), ``handles`` is asked again with that
    directory, and then the ``_class_name`` of its ``model_index.json`` picks the adapter listing it in
    ``pipeline_classes``. A hub id that is not cached yet (online) has only its ``model_index.json`` fetched
    here (:func:`hub_model_index`); the adapter's ``from_pretrained`` lets diffusers download the rest.
    """
    if adapter is not None:
        return pipeline_adapter(adapter)
    adapters = _adapters()
    cls = _claimed(adapters, model_id)
    if cls is not None:
        return cls
    path = resolve_pretrained(model_id)
    cls = _claimed(adapters, path) if str(path) != str(model_id) else None
    if cls is not None:
        return cls
    by_class: Dict[str, type] = {}
    for candidate in adapters.values():
        for name in getattr(candidate, "pipeline_classes", ()):
            by_class.setdefault(name, candidate)
    claimers = sorted(name for name, c in adapters.items() if callable(getattr(c, "handles", None)))
    supported = f"supported: {sorted(by_class)}, or a model claimed by the adapters {claimers}"
    index = os.path.join(path, "model_index.json")
    if not os.path.isdir(path) and _looks_like_hub_id(path):  # online and not cached yet: fetch the index only
        index = hub_model_index(path)
    if not os.path.isfile(index):
        raise ValueError(f"{model_id!r} has no model_index.json: not a diffusers pipeline directory ({supported})")
    with open(index) as fh:
        name = json.load(fh).get("_class_name", "")
    if name not in by_class:
        raise ValueError(f"pipeline class {name!r} of {model_id!r} is not supported; {supported}")
    return by_class[name]


def load_policy(model_id: str, device=None, dtype=None, guidance_scale: Optional[float] = None,
                adapter: Optional[str] = None, **kwargs):
    """Load the policy adapter for ``model_id`` (hub id, local directory, or 'digits'); see :func:`policy_class`.

    ``dtype`` and ``guidance_scale`` are passed to the adapter's ``from_pretrained`` when given, as are
    ``kwargs``.
    """
    cls = policy_class(model_id, adapter)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    return cls.from_pretrained(model_id, device=device, **kwargs)


__all__ = ["COMMANDS_GROUP", "ENCODERS_GROUP", "available_encoders", "load_encoder", "PIPELINES_GROUP", "REWARDS_GROUP", "PluginError", "available_commands",
           "available_pipelines", "entry_points", "load_command", "load_entry_point", "load_policy",
           "hub_model_index", "pipeline_adapter", "policy_class", "register_pipeline"]
