"""The methods of the one trainer (README, "Methods"; docs/algorithms.md §3-§7): ``method:`` names one
typed spec, and the spec says everything that depends on the method.

A spec (:class:`MethodSpec`, a frozen dataclass) holds:

- ``name``: the value of ``method:``;
- ``objective``: the training objective the trainer runs, ``'policy_gradient'`` (the Flow-GRPO family and
  Adv-GRPO: clipped policy gradient on per-step log-probs), ``'dragon'`` (D+ / D- contrast on the
  flow-matching loss, :mod:`genalign.dragon`) or ``'nft'`` (DiffusionNFT on the forward process);
- ``defaults``: config keys the method sets, merged UNDER the YAML and the overrides by
  :func:`genalign.config.load_config` (explicit keys win);
- ``options``: the config keys that are this method's options (``sampling.window``, ``sampling.branching``,
  ``dragon``, ``adversarial``, ``nft``). An option of another method that differs from its default is refused
  (:func:`check_method_options`): ``sampling.window`` without ``method: flow_grpo_fast | mixgrpo`` is an
  error, as is a ``dragon.*`` key without ``method: dragon``;
- ``reward``: a reward name the method needs in ``reward`` and that no other method may use (Adv-GRPO's
  ``'adversarial'``, whose discriminator the trainer trains between rounds);
- ``validate(cfg)``: method-specific checks (``ConfigError`` naming the key);
- ``plan(cfg, epoch, group_ids, base_levels)``: the epoch's :class:`genalign.methods.EpochPlan` (what each
  sample samples and trains).

A new method is one class plus one ``@register_method`` line; :meth:`genalign.config.Config.method_spec`
returns the instance for ``cfg.method``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type

import torch

from .choices import CRITERIA, LOSSES, PAIRINGS, SET_SPLITS
from .errors import ConfigError, check_choice
from .losses import KTO_REFERENCES
from .methods import EpochPlan, branch_plan, forward_process_plan, full_plan, window_plan
from .registry import Registry

METHODS = Registry("method")
"""``name -> MethodSpec subclass`` (see :func:`register_method`)."""


def register_method(cls: Type["MethodSpec"]) -> Type["MethodSpec"]:
    """Class decorator: register ``cls`` under its ``name`` (a taken name raises ``ValueError``). Its
    ``objective`` names an objective of :mod:`genalign.objectives` (looked up by the trainer)."""
    if not cls.name or not isinstance(cls.objective, str):
        raise ValueError(f"a method spec needs a name and an objective name, got {cls.name!r}, {cls.objective!r}")
    METHODS.register(cls.name)(cls)
    return cls


def get_method(name: Any) -> "MethodSpec":
    """The spec instance of method ``name``; ``ConfigError`` listing the valid names otherwise."""
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"method = {name!r} is not valid; choose one of {METHODS.names()}")
    return METHODS[name]()


def reward_names(reward: Any) -> List[str]:
    """Names in a ``reward`` value: ``'name'`` / ``'file.py:fn'`` -> ``[it]``, ``{name: weight}`` -> its keys."""
    if isinstance(reward, str):
        return [reward]
    if isinstance(reward, dict):
        return [str(k) for k in reward]
    return []


@dataclass(frozen=True)
class MethodSpec:
    """Base of the method specs (see the module docstring); subclasses override fields by redeclaring them."""

    name: str = ""
    """The value of ``method:``."""
    objective: str = "policy_gradient"
    """Name of the training objective the trainer runs (:mod:`genalign.objectives`): 'policy_gradient', 'dragon' or
    'nft'."""
    defaults: Dict[str, Any] = field(default_factory=dict)
    """Config keys set by the method (nested like the YAML), merged under the YAML and the overrides. Paper
    values that depend on the model (clip range, KL beta, lr, TempFlow's 4 seeds x 6 branches) are left to
    the config."""
    options: Tuple[str, ...] = ()
    """Config keys (a key or a section) that are this method's options; refused under other methods."""
    reward: Optional[str] = None
    """A reward name this method requires in ``reward`` (and that other methods may not use)."""
    data_kind: Optional[str] = None
    """The records of ``data.train_file`` this method trains on (:mod:`genalign.datasets`: 'image' or 'pairs');
    None: the method trains on its own samples only."""

    def validate(self, cfg) -> None:
        """Method-specific checks (after the general ones of :meth:`genalign.config.Config.validate`)."""

    def needs_reference(self, cfg) -> bool:
        """Whether training uses the reference policy (the base: LoRA adapters disabled, or a frozen copy when
        fine-tuning fully): for the KL term by default; methods whose loss or sampler uses it say so too."""
        return cfg.train.kl_beta > 0

    def plan(self, cfg, epoch: int, group_ids: torch.Tensor, base_levels: torch.Tensor) -> EpochPlan:
        """``[N]`` samples of the epoch (``group_ids``, global order) -> their plan; ``base_levels [T]``
        are the levels of a full-SDE rollout. Default: every step SDE, the trainable steps trained."""
        return full_plan(cfg, group_ids, base_levels)


@register_method
@dataclass(frozen=True)
class FlowGRPO(MethodSpec):
    """Flow-GRPO (arXiv 2505.05470), the default: SDE on every step, all trainable steps trained, group
    advantages, PPO clip, Gaussian mean KL (docs/algorithms.md §3)."""

    name: str = "flow_grpo"


def _no_dynamic_sampling(cfg, method: str, why: str) -> None:
    if cfg.train.dynamic_sampling:
        raise ConfigError(f"train.dynamic_sampling refills prompt groups of the policy-gradient objective; it cannot "
                          f"be combined with method {method} ({why})")


@dataclass(frozen=True)
class _WindowMethod(MethodSpec):
    """A method whose option is an SDE window (``sampling.window`` of kind ``window_kind``)."""

    options: Tuple[str, ...] = ("sampling.window",)
    window_kind: ClassVar[str] = ""

    def validate(self, cfg) -> None:
        window = cfg.window_spec()  # checks the window's keys and values
        if window is None:
            raise ConfigError(f"method {self.name} needs sampling.window (e.g. {self.defaults['sampling']['window']}), "
                              f"got null")
        if window["kind"] != self.window_kind:
            owner = next((n for n in METHODS if getattr(METHODS[n], "window_kind", None) == window["kind"]), "?")
            raise ConfigError(f"sampling.window.kind = {window['kind']!r} is the window of method {owner}; method "
                              f"{self.name} needs kind {self.window_kind!r} (or set method: {owner})")

    def plan(self, cfg, epoch: int, group_ids: torch.Tensor, base_levels: torch.Tensor) -> EpochPlan:
        return window_plan(cfg, cfg.window_spec(), epoch, group_ids)


@register_method
@dataclass(frozen=True)
class FlowGRPOFast(_WindowMethod):
    """Flow-GRPO-Fast: only a window of ``size`` consecutive trainable steps is SDE (and trained), its start
    drawn per group from (seed, epoch, group) (docs/algorithms.md §3.3); ODE elsewhere."""

    name: str = "flow_grpo_fast"
    defaults: Dict[str, Any] = field(default_factory=lambda: {"sampling": {"window": {"kind": "fast", "size": 2}}})
    window_kind: ClassVar[str] = "fast"


@register_method
@dataclass(frozen=True)
class MixGRPO(_WindowMethod):
    """MixGRPO (arXiv 2507.21802): one SDE window for all samples of an epoch, moved by ``stride`` steps every
    ``shift_every`` epochs (docs/algorithms.md §3.4)."""

    name: str = "mixgrpo"
    defaults: Dict[str, Any] = field(default_factory=lambda: {
        "sampling": {"window": {"kind": "mixgrpo", "size": 4, "shift_every": 25}}})
    window_kind: ClassVar[str] = "mixgrpo"


@register_method
@dataclass(frozen=True)
class TempFlowGRPO(MethodSpec):
    """TempFlow-GRPO (arXiv 2508.04324): ODE main trajectory per (prompt, seed), K one-step SDE branches at
    each branching step, process advantages, noise-aware step weights (docs/algorithms.md §4). The default
    2 seeds x 4 branches x 2 random steps = 16 images per prompt fits group_size 16 (the paper: 4 x 6)."""

    name: str = "tempflow_grpo"
    defaults: Dict[str, Any] = field(default_factory=lambda: {
        "sampling": {"branching": {"seeds": 2, "branches": 4, "steps": 2}},
        "train": {"step_weighting": "noise_aware"}})
    options: Tuple[str, ...] = ("sampling.branching",)

    def validate(self, cfg) -> None:
        branching = cfg.branching_spec()  # checks the branching keys and values
        if branching is None:
            raise ConfigError("method tempflow_grpo needs sampling.branching ({seeds, branches, steps}), got null")
        need = branching["seeds"] * branching["branches"] * branching["num_steps"]
        if cfg.sampling.group_size != need:
            raise ConfigError(f"sampling.group_size must equal sampling.branching seeds * branches * number of "
                              f"branching steps = {need} (images per prompt), got {cfg.sampling.group_size}")
        _no_dynamic_sampling(cfg, self.name, "sampling.branching: TempFlow groups are per seed and step")

    def plan(self, cfg, epoch: int, group_ids: torch.Tensor, base_levels: torch.Tensor) -> EpochPlan:
        return branch_plan(cfg, cfg.branching_spec(), epoch, group_ids)


@register_method
@dataclass(frozen=True)
class GRPOGuard(MethodSpec):
    """GRPO-Guard (arXiv 2510.22319): RatioNorm and 1/dt step reweighting on full-SDE Flow-GRPO
    (docs/algorithms.md §5). A ``train.kl_beta`` tuned without RatioNorm does not transfer."""

    name: str = "grpo_guard"
    defaults: Dict[str, Any] = field(default_factory=lambda: {
        "train": {"ratio_norm": True, "step_weighting": "inverse_dt"}})


@register_method
@dataclass(frozen=True)
class Dragon(MethodSpec):
    """DRAGON (arXiv 2504.15217): on-policy samples split into D+ / D-, Diffusion-DPO or -KTO on the
    flow-matching loss (docs/algorithms.md §6); options ``dragon.*``. Samples full-SDE rollouts."""

    name: str = "dragon"
    objective: str = "dragon"
    options: Tuple[str, ...] = ("dragon",)

    def needs_reference(self, cfg) -> bool:
        return True  # the preference losses compare with the reference's flow-matching loss

    def validate(self, cfg) -> None:
        d = cfg.dragon
        for key, value, valid in (("loss", d.loss, LOSSES), ("criterion", d.criterion, CRITERIA),
                                  ("pairing", d.pairing, PAIRINGS), ("set_split", d.set_split, SET_SPLITS),
                                  ("kto_reference", d.kto_reference, KTO_REFERENCES)):
            check_choice(f"dragon.{key}", value, list(valid))
        if d.loss == "dpo" and d.pairing != "paired":
            raise ConfigError("dragon.loss = 'dpo' needs dragon.pairing = 'paired' (use loss 'kto' for unpaired data)")
        if d.beta is not None and d.beta <= 0:
            raise ConfigError(f"dragon.beta must be > 0, got {d.beta}")
        if not isinstance(d.max_swaps, int) or d.max_swaps < 0:
            raise ConfigError(f"dragon.max_swaps must be an int >= 0, got {d.max_swaps!r}")
        _no_dynamic_sampling(cfg, self.name, "it trains D+ / D- splits, not group advantages")


def _check_old_decay(section: str, decay_max: float, rate: float, delay: Optional[int] = None) -> None:
    """The decay schedule of an old (EMA) policy: ``old_decay_max`` in [0, 1], rate (and delay, if any) >= 0."""
    if not 0 <= decay_max <= 1 or rate < 0 or (delay is not None and delay < 0):
        keys = f"{section}.old_decay_rate" + (f", {section}.old_decay_delay" if delay is not None else "")
        got = ", ".join(str(v) for v in (decay_max, rate, delay) if v is not None)
        raise ConfigError(f"{section}.old_decay_max must be in [0, 1] and {keys} >= 0, got {got}")


@dataclass(frozen=True)
class _ForwardProcessMethod(MethodSpec):
    """A method trained on the forward process (clean samples noised afresh; no log-probs): samples with the
    deterministic ODE by default and trains every sample at the steps of :func:`genalign.methods.nft_steps`."""

    defaults: Dict[str, Any] = field(default_factory=lambda: {
        "sampling": {"noise_level": 0.0}, "train": {"kl_beta": 0.0, "advantage_std": "batch"}})

    def validate(self, cfg) -> None:
        _no_dynamic_sampling(cfg, self.name, "it trains every sample of the epoch")

    def plan(self, cfg, epoch: int, group_ids: torch.Tensor, base_levels: torch.Tensor) -> EpochPlan:
        return forward_process_plan(cfg, group_ids, base_levels)


@register_method
@dataclass(frozen=True)
class DiffusionNFT(_ForwardProcessMethod):
    """DiffusionNFT (arXiv 2509.16117): online RL on the forward process. Samples come from the "old" policy
    with any sampler (deterministic ODE by default, CFG-free); each is trained on the flow-matching loss
    through an implicit positive policy ``beta v + (1 - beta) v_old`` weighted by its reward-derived optimality
    ``r = clip(A / advantage_clip / 2 + 0.5, 0, 1)`` and an implicit negative one ``(1 + beta) v_old - beta v``
    weighted by ``1 - r``; no log-probs (docs/algorithms.md §11). Options ``nft.*``."""

    name: str = "diffusion_nft"
    objective: str = "nft"
    options: Tuple[str, ...] = ("nft",)

    def validate(self, cfg) -> None:
        n = cfg.nft
        if not n.beta > 0:
            raise ConfigError(f"nft.beta must be > 0, got {n.beta}")
        check_choice("nft.optimality", n.optimality, ["linear", "binary", "reward"])
        _check_old_decay("nft", n.old_decay_max, n.old_decay_rate, n.old_decay_delay)
        if cfg.train.advantage_clip <= 0:
            raise ConfigError(f"train.advantage_clip must be > 0 for diffusion_nft (it maps advantages to the "
                              f"optimality weight r), got {cfg.train.advantage_clip}")
        super().validate(cfg)


@register_method
@dataclass(frozen=True)
class AWM(_ForwardProcessMethod):
    """AWM (arXiv 2509.25050): advantage-weighted flow-matching loss on the epoch's samples with the PPO clip on
    the matching likelihood ratio (docs/algorithms.md §13.1). Options ``awm.*``."""

    name: str = "awm"
    objective: str = "awm"
    options: Tuple[str, ...] = ("awm",)

    def validate(self, cfg) -> None:
        check_choice("awm.weighting", cfg.awm.weighting, ["uniform", "t", "t2"])
        super().validate(cfg)


@register_method
@dataclass(frozen=True)
class DGPO(_ForwardProcessMethod):
    """DGPO (arXiv 2510.08425): a DPO over whole prompt groups on the flow-matching loss, advantages as the
    preference weights, shared noise within a group (docs/algorithms.md §13.2). Options ``dgpo.*``."""

    name: str = "dgpo"
    objective: str = "dgpo"
    options: Tuple[str, ...] = ("dgpo",)

    def needs_reference(self, cfg) -> bool:
        return cfg.dgpo.reference == "base" or super().needs_reference(cfg)

    def validate(self, cfg) -> None:
        d = cfg.dgpo
        if not d.beta > 0:
            raise ConfigError(f"dgpo.beta must be > 0, got {d.beta}")
        _check_old_decay("dgpo", d.old_decay_max, d.old_decay_rate)
        check_choice("dgpo.reference", d.reference, ["base", "old"])
        if d.reference == "old" and not d.clip:
            raise ConfigError("dgpo.reference = 'old' measures the margins against the EMA old policy, which is kept "
                              "for dgpo.clip: set dgpo.clip = true")
        if d.sample_with_old_after is not None and (not isinstance(d.sample_with_old_after, int)
                                                    or d.sample_with_old_after < 0):
            raise ConfigError(f"dgpo.sample_with_old_after must be an int >= 0 or null, got {d.sample_with_old_after!r}")
        super().validate(cfg)


def _check_data_file(cfg, fields: str) -> None:
    path = cfg.data.train_file
    if path is not None and not (isinstance(path, str) and path.endswith(".jsonl")):
        raise ConfigError(f"data.train_file must be a .jsonl file of records with {fields}, got {path!r}")
    n = cfg.data.samples_per_epoch
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ConfigError(f"data.samples_per_epoch must be an int >= 1 or null, got {n!r}")


@register_method
@dataclass(frozen=True)
class SFT(_ForwardProcessMethod):
    """Supervised fine-tuning on the flow-matching loss: demonstrations from ``data.train_file`` or the epoch's own
    samples (optionally the best ``sft.top_k`` of each group) (docs/algorithms.md §13.3). Options ``sft.*``,
    ``data.*``."""

    name: str = "sft"
    objective: str = "sft"
    options: Tuple[str, ...] = ("sft", "data.train_file", "data.samples_per_epoch")
    data_kind: Optional[str] = "image"

    def needs_reference(self, cfg) -> bool:
        return cfg.sft.sample_from == "reference" or super().needs_reference(cfg)

    def validate(self, cfg) -> None:
        k = cfg.sft.top_k
        if k is not None and (not isinstance(k, int) or not 1 <= k <= cfg.sampling.group_size):
            raise ConfigError(f"sft.top_k must be an int in [1, sampling.group_size = {cfg.sampling.group_size}] or "
                              f"null, got {k!r}")
        if k is not None and cfg.data.train_file:
            raise ConfigError("sft.top_k selects among the policy's own samples; with data.train_file every "
                              "demonstration is trained (remove one of them)")
        check_choice("sft.sample_from", cfg.sft.sample_from, ["policy", "reference"])
        if cfg.sft.sample_from != "policy" and cfg.data.train_file:
            raise ConfigError("sft.sample_from chooses who samples; with data.train_file nothing is sampled "
                              "(remove one of them)")
        _check_data_file(cfg, "'prompt' and 'image'")
        super().validate(cfg)


@register_method
@dataclass(frozen=True)
class DiffusionDPO(MethodSpec):
    """Diffusion-DPO (Wallace et al. 2024, arXiv 2311.12908) on (winner, loser) pairs: online, the better and worse
    halves of each prompt group of the policy's own ODE samples paired in reward order; offline, the chosen /
    rejected pairs of ``data.train_file`` (docs/algorithms.md §6, §13.4). The DRAGON objective with
    ``dragon.loss: dpo`` and instance pairs; options ``dragon.beta`` and ``data.*``."""

    name: str = "diffusion_dpo"
    objective: str = "dragon"
    defaults: Dict[str, Any] = field(default_factory=lambda: {"sampling": {"noise_level": 0.0}})
    options: Tuple[str, ...] = ("dragon", "data.train_file", "data.samples_per_epoch")
    data_kind: Optional[str] = "pairs"

    def needs_reference(self, cfg) -> bool:
        return True  # Diffusion-DPO compares with the reference's flow-matching loss

    def validate(self, cfg) -> None:
        d = cfg.dragon
        changed = [f"dragon.{k}={getattr(d, k)!r}" for k in ("loss", "criterion", "pairing")
                   if getattr(d, k) != {"loss": "dpo", "criterion": "instance", "pairing": "paired"}[k]]
        if changed:
            raise ConfigError(f"method diffusion_dpo trains Diffusion-DPO on instance pairs; {', '.join(changed)} "
                              f"belong to method dragon (set method: dragon)")
        if d.beta is not None and d.beta <= 0:
            raise ConfigError(f"dragon.beta must be > 0, got {d.beta}")
        _check_data_file(cfg, "'prompt', 'chosen' and 'rejected'")
        _no_dynamic_sampling(cfg, self.name, "it trains pairs within prompt groups")

    def plan(self, cfg, epoch: int, group_ids: torch.Tensor, base_levels: torch.Tensor) -> EpochPlan:
        return forward_process_plan(cfg, group_ids, base_levels)


@register_method
@dataclass(frozen=True)
class AdvGRPO(MethodSpec):
    """Adv-GRPO (arXiv 2511.20256): Flow-GRPO whose reward includes ``'adversarial'``, a discriminator on frozen
    encoder tokens that the trainer trains for ``adversarial.steps`` steps before each round (docs/algorithms.md §7).

    Reward requirement: ``reward`` must include ``'adversarial'`` (alone or in a mapping, e.g.
    ``{adversarial: 1.0, digit_correct: 0.5}``), with ``reward_options.adversarial.references`` (real images).
    ``defaults`` sets ``reward: adversarial``, which applies only when neither the YAML nor the overrides
    give ``reward`` (``Config.reward``'s own default, 'digit_correct', then never applies); an explicit
    reward without 'adversarial' is refused, and no other method may use the 'adversarial' reward."""

    name: str = "adv_grpo"
    defaults: Dict[str, Any] = field(default_factory=lambda: {"reward": "adversarial"})
    options: Tuple[str, ...] = ("adversarial",)
    reward: Optional[str] = "adversarial"

    def validate(self, cfg) -> None:
        from .reward_api import ADVERSARIAL_RULES

        if self.reward not in reward_names(cfg.reward):
            raise ConfigError(f"method adv_grpo needs reward to include {self.reward!r} (its discriminator), got "
                              f"reward = {cfg.reward!r}: set reward: adversarial, or a mapping such as "
                              f"{{adversarial: 1.0, digit_correct: 0.5}}")
        if not (cfg.reward_options.get(self.reward) or {}).get("references"):
            raise ConfigError("method adv_grpo needs reward_options.adversarial.references: the real images the "
                              "discriminator scores as positives (a directory, image paths or a per-prompt "
                              ".json / .jsonl file)")
        a = cfg.adversarial
        check_choice("adversarial.rule", a.rule, list(ADVERSARIAL_RULES))
        if not isinstance(a.steps, int) or a.steps < 0:
            raise ConfigError(f"adversarial.steps must be an int >= 0, got {a.steps!r}")
        if not isinstance(a.num_samples, int) or a.num_samples < 1:
            raise ConfigError(f"adversarial.num_samples must be an int >= 1, got {a.num_samples!r}")


# ---------------------------------------------------------------- options and rewards of other methods

def _resolve(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set_keys(cfg, key: str) -> List[str]:
    """The dotted keys under ``key`` whose values differ from the defaults (``[key]`` for a plain key)."""
    value, default = _resolve(cfg, key), _resolve(type(cfg)(), key)
    if dataclasses.is_dataclass(value):
        return [f"{key}.{f.name}" for f in dataclasses.fields(value)
                if getattr(value, f.name) != getattr(default, f.name)]
    return [key] if value != default else []


def check_method_options(cfg, spec: MethodSpec) -> None:
    """Refuse options and rewards that belong to another method than ``spec`` (the key names the owner)."""
    for name in METHODS:
        other = METHODS[name]()
        if name == spec.name:
            continue
        for key in other.options:
            if key in spec.options:
                continue
            keys = _set_keys(cfg, key)
            if keys:
                owners = [n for n in METHODS if key in METHODS[n]().options]
                owners.sort(key=lambda n: n != key)  # a section named after a method (dragon.*) names it first
                if key == "sampling.window":  # name the owner of the window's kind first
                    kind = (cfg.sampling.window or {}).get("kind")
                    owners.sort(key=lambda n: getattr(METHODS[n], "window_kind", None) != kind)
                what = (f"{key} is an option" if keys == [key] else
                        f"{', '.join(keys)} {'is' if len(keys) == 1 else 'are'} set, but {key}.* are the options")
                raise ConfigError(f"{what} of method {' / '.join(owners)}, not of method {spec.name}; set method: "
                                  f"{owners[0]} (or remove {', '.join(keys)})")
        if other.reward and other.reward != spec.reward and other.reward in reward_names(cfg.reward):
            raise ConfigError(f"reward {other.reward!r} is trained by method {other.name} only (got method "
                              f"{spec.name}); set method: {other.name}")


__all__ = ["AWM", "DGPO", "METHODS", "SFT", "AdvGRPO", "DiffusionDPO", "Dragon", "FlowGRPO", "FlowGRPOFast", "GRPOGuard", "MethodSpec",
           "MixGRPO", "TempFlowGRPO", "check_method_options", "get_method", "register_method", "reward_names"]
