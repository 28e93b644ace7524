"""LoRA adapters on a policy's denoiser (peft through diffusers' adapter mixin), export and import.

A saved LoRA directory holds:
- ``adapter_config.json`` + ``adapter_model.safetensors``: the peft config and state dict (genalign's
  own format, loadable into any genalign policy of the same base model);
- ``pytorch_lora_weights.safetensors``: the diffusers format, written when the adapter exposes its
  pipeline class, so ``pipe.load_lora_weights(dir)`` works in plain diffusers;
- ``base_model.json``: the base model id and the denoiser's parameter count, checked when loading.

A full fine-tune (``lora.enabled: false``) is exported as ``denoiser.safetensors`` (and ``denoiser_ema.safetensors``)
with the same metadata in ``denoiser.json``. :func:`load_tuned` loads either kind under a name: a LoRA as a peft
adapter, a full fine-tune as a *weight variant* (its state dict kept on the CPU and copied into the denoiser while
that name is active, the base weights kept beside it), so ``genalign sample / grid / eval`` compare base and tuned
models alike (:func:`genalign.sampling.use_variant`). A weight variant costs one CPU copy of the trained weights and
one of the base's.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

ADAPTER = "default"


def add_lora(denoiser: torch.nn.Module, rank: int, alpha: float, target_modules: List[str]) -> None:
    """Add a trainable LoRA adapter (dropout 0, so rollout and training forwards are identical)."""
    from peft import LoraConfig

    names = [name for name, _ in denoiser.named_modules()]
    # peft matches a target to a module name that equals it or ends with "." + it (any number of name parts)
    missing = [m for m in target_modules if not any(n == m or n.endswith("." + m) for n in names)]
    if len(missing) == len(target_modules):
        raise ValueError(f"none of the LoRA target modules {target_modules} exist in {type(denoiser).__name__}")
    found = [m for m in target_modules if m not in missing]
    cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=found, lora_dropout=0.0)
    denoiser.add_adapter(cfg, adapter_name=ADAPTER)
    for name, p in denoiser.named_parameters():
        p.requires_grad_("lora_" in name)


def has_lora(denoiser: torch.nn.Module) -> bool:
    return bool(getattr(denoiser, "_hf_peft_config_loaded", False))


@contextlib.contextmanager
def adapters_disabled(denoiser: torch.nn.Module) -> Iterator[None]:
    """Run the base model (the KL / RLG reference) without removing the adapters."""
    denoiser.disable_adapters()
    try:
        yield
    finally:
        denoiser.enable_adapters()


@contextlib.contextmanager
def forward_of(live: torch.nn.Module, other: torch.nn.Module) -> Iterator[None]:
    """Make ``live(...)`` run ``other``'s forward (a frozen reference copy) for the duration. When ``other`` lives
    on another device (``train.reference_device: cpu``), the call's tensors go there and its outputs come back to
    the device of the call's first tensor argument."""
    previous = live.__dict__.get("forward")  # an instance-level forward (e.g. routing through a DDP wrapper)
    live.forward = _on_own_device(other)
    try:
        yield
    finally:
        if previous is None:
            del live.forward
        else:
            live.forward = previous


def _on_own_device(module: torch.nn.Module):
    """``module.forward``, moving tensor arguments to the module's device and the outputs back when they differ."""
    from torch.utils._pytree import tree_flatten, tree_map

    own = next(module.parameters()).device

    def forward(*args, **kwargs):
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        back = tensors[0].device if tensors else own
        if back == own:
            return module.forward(*args, **kwargs)
        there = tree_map(lambda x: x.to(own) if isinstance(x, torch.Tensor) else x, (args, kwargs))
        out = module.forward(*there[0], **there[1])
        return tree_map(lambda x: x.to(back) if isinstance(x, torch.Tensor) else x, out)

    return forward


def lora_state_dict(denoiser: torch.nn.Module) -> dict:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(denoiser, adapter_name=ADAPTER)


def save_lora(policy, out_dir: str, base_model: str) -> None:
    """Write the adapter in genalign's and (when possible) diffusers' format."""
    denoiser = policy.denoiser()
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(denoiser).items()}
    save_file(state, os.path.join(out_dir, "adapter_model.safetensors"))
    cfg = denoiser.peft_config[ADAPTER].to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as fh:
        json.dump(cfg, fh, indent=1, default=str)
    write_base_meta(os.path.join(out_dir, "base_model.json"), denoiser, base_model)
    name = getattr(policy, "pipeline_class_name", None)
    if name is not None:
        import diffusers

        pipeline_cls = getattr(diffusers, name)
        if not hasattr(pipeline_cls, "save_lora_weights"):  # e.g. DDPMPolicy loads through DiffusionPipeline
            pipeline_cls = type(policy.pipe)
        prefix = "unet" if getattr(policy, "denoiser_name", "transformer") == "unet" else "transformer"
        # the adapter's config (alpha included) goes with the weights: without it diffusers loads them at
        # lora_alpha = r, i.e. at the wrong scale whenever lora.alpha != lora.rank
        pipeline_cls.save_lora_weights(out_dir, **{f"{prefix}_lora_layers": state,
                                                   f"{prefix}_lora_adapter_metadata": cfg})


def _base_param_count(denoiser: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in denoiser.named_parameters() if "lora_" not in n)


FULL_WEIGHTS = "denoiser.safetensors"
FULL_EMA_WEIGHTS = "denoiser_ema.safetensors"
FULL_META = "denoiser.json"


def _evaluated_ema(run_dir: str) -> Optional[Tuple[str, str]]:
    """The EMA export of a run directory whose training-time evaluation used it (``eval.use_ema`` in its
    ``config.json`` and ``final/lora_ema`` or ``final/denoiser_ema.safetensors`` written), else None."""
    try:
        with open(os.path.join(run_dir, "config.json")) as fh:
            use_ema = bool(json.load(fh).get("eval", {}).get("use_ema"))
    except (OSError, ValueError, AttributeError):
        return None
    final = os.path.join(run_dir, "final")
    if use_ema and os.path.isfile(os.path.join(final, "lora_ema", "adapter_model.safetensors")):
        return "lora", os.path.join(final, "lora_ema")
    if use_ema and os.path.isfile(os.path.join(final, FULL_EMA_WEIGHTS)):
        return "full", os.path.join(final, FULL_EMA_WEIGHTS)
    return None


def find_tuned(path: str) -> Tuple[str, str]:
    """``("lora", directory)`` or ``("full", safetensors file)`` for a LoRA directory, a full fine-tune's
    ``denoiser*.safetensors``, a checkpoint or a run directory: the weights its evaluation used (the EMA export when
    ``eval.use_ema`` and the EMA was written), else its final weights, else its latest checkpoint's."""
    if os.path.isfile(path) and path.endswith(".safetensors"):
        if os.path.basename(path) == "adapter_model.safetensors":
            return "lora", os.path.dirname(path)
        return "full", path
    ema = _evaluated_ema(path)
    if ema is not None:
        return ema
    dirs = [path, os.path.join(path, "final")]
    from .checkpoint import latest_checkpoint

    if os.path.isdir(os.path.join(path, "checkpoints")):
        dirs.append(latest_checkpoint(os.path.join(path, "checkpoints")))
    for d in filter(None, dirs):
        for candidate in (d, os.path.join(d, "lora")):
            if os.path.isfile(os.path.join(candidate, "adapter_model.safetensors")):
                return "lora", candidate
        if os.path.isfile(os.path.join(d, FULL_WEIGHTS)):
            return "full", os.path.join(d, FULL_WEIGHTS)
    raise FileNotFoundError(f"no LoRA found at {path!r}, nor a full fine-tune (looked for adapter_model.safetensors in "
                            f"the directory, its lora/, final/lora/ and the latest checkpoint's lora/, and for "
                            f"{FULL_WEIGHTS} in the directory, its final/ and the latest checkpoint)")


def find_lora_dir(path: str) -> str:
    """The LoRA directory of a LoRA, checkpoint or run directory (see :func:`find_tuned`)."""
    kind, where = find_tuned(path)
    if kind != "lora":
        raise ValueError(f"{path!r} holds a full fine-tune ({where}), not a LoRA")
    return where


def tuned_meta_path(path: str) -> str:
    """The metadata file (base model id, denoiser class and size) of tuned weights ``path`` (see :func:`find_tuned`)."""
    kind, where = find_tuned(path)
    return os.path.join(where, "base_model.json") if kind == "lora" else os.path.join(os.path.dirname(where), FULL_META)


def write_base_meta(path: str, denoiser: torch.nn.Module, base_model: str) -> None:
    """``base_model.json`` / ``denoiser.json``: the base model id and the denoiser's class and parameter count."""
    with open(path, "w") as fh:
        json.dump({"base_model": base_model, "denoiser_class": type(denoiser).__name__,
                   "denoiser_params": _base_param_count(denoiser)}, fh)


def _check_base(meta_path: str, denoiser: torch.nn.Module, what: str) -> None:
    if not os.path.isfile(meta_path):
        return
    with open(meta_path) as fh:
        meta = json.load(fh)
    if meta.get("denoiser_class") != type(denoiser).__name__ or meta.get("denoiser_params") != _base_param_count(denoiser):
        raise ValueError(f"{what} was trained on base model {meta.get('base_model')!r} "
                         f"({meta.get('denoiser_class')}, {meta.get('denoiser_params')} parameters), which does not "
                         f"match this model ({type(denoiser).__name__}, {_base_param_count(denoiser)} parameters)")


def load_tuned(policy, path: str, name: str = ADAPTER) -> str:
    """Load tuned weights (:func:`find_tuned`) into ``policy`` under ``name`` and make them active: a LoRA as a peft
    adapter (:func:`load_lora`), a full fine-tune as a weight variant (module docstring). Returns their location."""
    kind, where = find_tuned(path)
    if kind == "lora":
        return load_lora(policy, where, adapter_name=name)
    denoiser = policy.denoiser()
    _check_base(tuned_meta_path(where), denoiser, f"full fine-tune {where!r}")
    params = denoiser.state_dict(keep_vars=True)  # parameters and buffers
    state = load_file(where)
    unknown = [k for k in state if _live_key(k, params) not in params]
    if unknown:
        raise ValueError(f"full fine-tune {where!r} has weights this model lacks: {unknown[:5]}")
    wrong = [k for k, v in state.items() if v.shape != params[_live_key(k, params)].shape]
    if wrong:
        raise ValueError(f"full fine-tune {where!r}: shapes differ from this model's for {wrong[:5]}")
    variants = weight_variants(policy)
    activate_weights(policy, None)
    base = variants.setdefault(None, {})
    base.update({k: params[_live_key(k, params)].detach().to("cpu", copy=True) for k in state if k not in base})
    variants[name] = state
    activate_weights(policy, name)
    return where


def weight_variants(policy) -> dict:
    """``{name: state dict}`` of the full fine-tunes loaded into ``policy`` (key None: the base weights they replace)."""
    if not hasattr(policy, "_weight_variants"):
        policy._weight_variants, policy._active_weights = {}, None
    return policy._weight_variants


def activate_weights(policy, name: Optional[str]) -> None:
    """Copy weight variant ``name`` (None: the base weights) into the denoiser."""
    variants = weight_variants(policy)
    if name == policy._active_weights:
        return
    params = policy.denoiser().state_dict(keep_vars=True)
    with torch.no_grad():
        for k, v in {**variants.get(None, {}), **variants.get(name, {})}.items():
            params[_live_key(k, params)].copy_(v)
    policy._active_weights = name


def _live_key(key: str, params: dict) -> str:
    """Where weight ``key`` of a plain denoiser lives now: a LoRA wraps a layer as ``<layer>.base_layer``."""
    layer, _, leaf = key.rpartition(".")
    return key if key in params else f"{layer}.base_layer.{leaf}"


@contextlib.contextmanager
def weights_active(policy, name: Optional[str]) -> Iterator[None]:
    """Weight variant ``name`` (None: the base) active for the duration, then the previous one again."""
    weight_variants(policy)
    previous = policy._active_weights
    activate_weights(policy, name)
    try:
        yield
    finally:
        activate_weights(policy, previous)


def load_lora(policy, path: str, adapter_name: str = ADAPTER, base_model: Optional[str] = None) -> str:
    """Load a LoRA (from a LoRA, checkpoint or run directory) into ``policy``'s denoiser; returns its dir."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    lora_dir = find_lora_dir(path)
    denoiser = policy.denoiser()
    with open(os.path.join(lora_dir, "adapter_config.json")) as fh:
        cfg = json.load(fh)
    _check_base(os.path.join(lora_dir, "base_model.json"), denoiser, f"LoRA {lora_dir!r}")
    keep = {k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__ and k not in ("peft_type", "task_type")}
    denoiser.add_adapter(LoraConfig(**keep), adapter_name=adapter_name)
    state = load_file(os.path.join(lora_dir, "adapter_model.safetensors"))
    result = set_peft_model_state_dict(denoiser, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA {lora_dir!r} has weights for modules this model lacks: {unexpected[:5]}")
    denoiser.to(policy.device)
    return lora_dir
