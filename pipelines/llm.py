"""Causal language models as policies over tokens, and a small GRPO step.

The LLM counterpart of the diffusion adapters: here a "token" of the shared loss module
(``genalign.losses``) is a response token, where for diffusion it is a denoising step. The GRPO step
below calls exactly the same :func:`genalign.losses.policy_loss` and
:func:`genalign.advantages.compute_advantages` as the diffusion trainer.

Batch layout (what :meth:`CausalLMPolicy.generate` returns and :func:`grpo_step` consumes):
``input_ids`` / ``attention_mask`` ``[B, P + T]`` hold the LEFT-padded prompt followed by the
RIGHT-padded response; ``response_mask`` ``[B, T]`` marks the generated tokens (the EOS token included,
everything after it excluded), so the response is always the last ``T`` columns.

:func:`dynamic_sample` (DAPO dynamic sampling, arXiv 2503.14476) draws rounds of groups until enough groups
with reward variance are collected and returns such a batch; :func:`grpo_prepare` + :func:`grpo_loss` are
the pieces of :func:`grpo_step` that turn rewards and per-token log-probs into the loss (the TRL parity
tests call them on tensors).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Tuple,
    Union,
)

import torch

from genalign import losses
from genalign.advantages import compute_advantages, weight_positive, zero_variance_groups
from genalign.optim import OptimizerStep
from genalign.policy import refuse_conditioning, resolve_device, resolve_pretrained


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class CausalLMPolicy:
    """A ``transformers`` causal LM plus its tokenizer, seen as a token-level policy.

    ``token_logprobs`` is THE forward of training; ``generate`` samples with a ``torch.Generator``
    (reproducible) through the same model, the same temperature and the same position ids.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, device: Optional[Union[str, torch.device]] = None):
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (set tokenizer.pad_token, e.g. to its eos token)")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs an eos token")
        self.device = resolve_device(device) if device is None or isinstance(device, str) else device
        self.model.to(self.device)

    @classmethod
    def handles(cls, path_or_id) -> bool:
        """Whether ``path_or_id`` is a local ``transformers`` causal-LM directory (a ``config.json`` whose
        ``architectures`` end in ``ForCausalLM``, no diffusers ``model_index.json``); asked by
        :func:`genalign.plugins.policy_class`."""
        import json
        import os

        config = os.path.join(str(path_or_id), "config.json")
        if not os.path.isfile(config) or os.path.isfile(os.path.join(str(path_or_id), "model_index.json")):
            return False
        try:
            with open(config) as fh:
                architectures = json.load(fh).get("architectures") or []
        except (OSError, ValueError, AttributeError):
            return False
        return any(str(a).endswith("ForCausalLM") for a in architectures)

    @classmethod
    def from_pretrained(cls, model_id: str, device: Optional[str] = None, **model_kwargs) -> "CausalLMPolicy":
        """Load a hub id or local directory (offline-aware, see ``genalign.policy.resolve_pretrained``)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_pretrained(model_id)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(AutoModelForCausalLM.from_pretrained(path, **model_kwargs), tokenizer, device)

    def _logits(self, input_ids, attention_mask, **kwargs):
        positions = _position_ids(attention_mask)[:, -input_ids.shape[1] :]  # with a KV cache: the new ones
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **kwargs)

    def token_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        temperature: float = 1.0,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies of the response tokens -> ``(logp [B, T], entropy [B, T])``.

        input_ids, attention_mask: ``[B, P + T]``; response_mask ``[B, T]`` (the last T columns).
        ``logp[b, t] = log pi(y_t | x, y_<t)`` at ``temperature``; both outputs are 0 where the response
        mask is 0. The entropy is the full-vocabulary entropy of the same distribution (HAPO's signal).
        """
        T = response_mask.shape[1]
        if T >= input_ids.shape[1]:
            raise ValueError(f"response length {T} must be shorter than the sequence length {input_ids.shape[1]}")
        logits = self._logits(input_ids, attention_mask, use_cache=False).logits[:, -T - 1 : -1].float()
        logp_all = torch.log_softmax(logits / temperature, dim=-1)
        logp = logp_all.gather(-1, input_ids[:, -T:].unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        m = response_mask.bool()
        return torch.where(m, logp, torch.zeros_like(logp)), torch.where(m, entropy, torch.zeros_like(entropy))

    @torch.no_grad()
    def generate(
        self,
        prompts: List[str],
        max_new_tokens: int,
        num_return_sequences: int = 1,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        temperature: float = 1.0,
        conditioning: Optional[List[Optional[dict]]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Sample ``num_return_sequences`` responses per prompt -> batch dict (see module docstring).

        Returns ``input_ids``, ``attention_mask``, ``response_mask`` and ``group_ids`` (``[B]``, the prompt
        index: samples of one prompt form a GRPO group), with ``B = len(prompts) * num_return_sequences``
        ordered prompt-major. ``temperature = 0`` is greedy. Randomness comes only from ``generator`` (or
        a fresh one seeded with ``seed``). ``conditioning`` (per-prompt negative prompts / condition images of a
        prompt set) is refused unless empty: a causal LM has no classifier-free guidance or image input.
        """
        refuse_conditioning(type(self).__name__, list(prompts), conditioning,
                            "a causal language model takes no negative prompts or condition images")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if generator is None:
            generator = torch.Generator(device=self.device)
            if seed is not None:
                generator.manual_seed(seed)
        tok = self.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(list(prompts), return_tensors="pt", padding=True)
        finally:
            tok.padding_side = old_side
        ids = enc["input_ids"].to(self.device).repeat_interleave(num_return_sequences, 0)
        attn = enc["attention_mask"].to(self.device).repeat_interleave(num_return_sequences, 0)
        group_ids = torch.arange(len(prompts), device=self.device).repeat_interleave(num_return_sequences)
        was_training = self.model.training
        self.model.eval()
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        new_tokens, alive, past, step_ids = [], [], None, ids
        for _ in range(max_new_tokens):
            out = self._logits(step_ids, attn, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
            alive.append(~done)
            new_tokens.append(nxt)
            done = done | (nxt == tok.eos_token_id)
            attn = torch.cat([attn, alive[-1].long().unsqueeze(1)], dim=1)
            step_ids = nxt.unsqueeze(1)
            if bool(done.all()):
                break
        self.model.train(was_training)
        response = torch.stack(new_tokens, dim=1)
        response_mask = torch.stack(alive, dim=1)
        return {
            "input_ids": torch.cat([ids, response], dim=1),
            "attention_mask": attn,
            "response_mask": response_mask,
            "group_ids": group_ids,
        }

    def decode(self, batch: Mapping[str, torch.Tensor]) -> List[str]:
        """Response texts of a batch (masked tokens dropped, special tokens skipped)."""
        T = batch["response_mask"].shape[1]
        rows = zip(batch["input_ids"][:, -T:], batch["response_mask"].bool())
        return [self.tokenizer.decode(ids[m].tolist(), skip_special_tokens=True) for ids, m in rows]


AUTO_AGGREGATION = {"token": "token_mean", "sequence": "seq_mean_token_mean", "sequence_token": "seq_mean_token_mean"}


@dataclass
class GRPOStepConfig:
    """Settings of :func:`grpo_step` (names match ``policy_loss`` / ``compute_advantages``)."""

    advantage: str = "grpo"
    """Advantage estimator name (``genalign.advantages``): grpo, dr_grpo, bnpo, hapo, ..."""
    advantage_options: Dict[str, Any] = field(default_factory=dict)
    """Keyword options of the estimator (e.g. ``{"std": "batch", "clip": 5.0}``; ``{"unbiased": True}`` gives
    TRL's sample standard deviation)."""
    surrogate: str = "ppo_clip"
    """Surrogate name (``genalign.losses.SURROGATES``); ``"hapo"`` gets the entropy score automatically."""
    ratio_level: str = "token"
    """token | sequence (GSPO, arXiv 2507.18071: ratio exp(mean_t log r)) | sequence_token (GSPO-token)."""
    aggregation: Optional[str] = None
    """token_mean | seq_mean_token_mean | seq_mean_token_sum | constant; None = automatic from ratio_level:
    'seq_mean_token_mean' for sequence / sequence_token (GSPO averages its sequence-level loss over sequences),
    'token_mean' for token (DAPO). An explicit value always wins."""
    constant_normalizer: Optional[int] = None
    """aggregation 'constant' (Dr.GRPO): the loss is sum(token losses) / (num_seqs * this). Set it to the
    generation's max_new_tokens for Dr.GRPO's constant (TRL's max_completion_length); None = the response
    width T of the batch (which varies with the longest response)."""
    positive_advantage_weight: float = 1.0
    """Positive advantages times this weight in [0, 1], negative ones unchanged (W-REINFORCE, arXiv 2506.01347,
    uses 0.1; like train.positive_advantage_weight of the diffusion trainer)."""
    filter_zero_std_groups: bool = True
    """Tokens of groups whose rewards are all equal (whatever the advantage estimator; under group normalisation
    their advantage is 0) leave the loss mask: they count in neither the token nor the sequence denominator
    and get no KL term either, as if DAPO's dynamic sampling had dropped the group (like
    train.filter_zero_std_groups of the diffusion trainer). False keeps them in the denominators (TRL's
    GRPOTrainer)."""
    eps_low: float = 0.2
    """Lower clip range."""
    eps_high: Optional[float] = None
    """Upper clip range (None: eps_low; 0.28 is DAPO clip-higher)."""
    dual_clip: Optional[float] = None
    """Dual-clip constant c > 1 for negative advantages (None: off)."""
    kl_kind: Optional[str] = None
    """k1 | k2 | k3: KL to the reference; needs ``batch["ref_logp"]``."""
    kl_coef: float = 0.0
    """Weight of the KL term."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    micro_batch_size: Optional[int] = None
    """Gradient-accumulation micro-batch size (None: whole batch at once); loss uses GLOBAL counts."""
    temperature: float = 1.0
    """Sampling temperature (log-probs are computed at the same temperature)."""

    @property
    def loss_aggregation(self) -> str:
        """The aggregation actually used: ``aggregation``, or the ratio-level default when it is None."""
        if self.aggregation is not None:
            return self.aggregation
        if self.ratio_level not in AUTO_AGGREGATION:
            raise ValueError(f"unknown ratio_level {self.ratio_level!r}; valid: {list(AUTO_AGGREGATION)}")
        return AUTO_AGGREGATION[self.ratio_level]


def _as_config(config: Union[GRPOStepConfig, Mapping[str, Any], None]) -> GRPOStepConfig:
    if config is None:
        return GRPOStepConfig()
    if isinstance(config, Mapping):
        unknown = set(config) - {f.name for f in fields(GRPOStepConfig)}
        if unknown:
            valid = [f.name for f in fields(GRPOStepConfig)]
            raise ValueError(f"unknown grpo_step config keys {sorted(unknown)}; valid: {valid}")
        return GRPOStepConfig(**config)
    return config


class GRPOBatch(NamedTuple):
    """What :func:`grpo_prepare` computes once per optimizer step.

    ``advantages`` ``[B]`` or ``[B, T]``; ``mask`` bool ``[B, T]`` (the response mask, minus the tokens of
    zero-variance groups when ``filter_zero_std_groups``); ``counts``: GLOBAL ``num_tokens`` / ``num_seqs`` /
    ``normalizer`` for :func:`genalign.losses.aggregate`; ``zero_std`` bool ``[B]``: samples of groups whose
    rewards are all equal.
    """

    advantages: torch.Tensor
    mask: torch.Tensor
    counts: Dict[str, Any]
    zero_std: torch.Tensor


def grpo_prepare(rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor,
                 config: Union[GRPOStepConfig, Mapping[str, Any], None] = None) -> GRPOBatch:
    """Advantages, loss mask and global counts of a batch -> :class:`GRPOBatch`.

    rewards ``[B]`` (or ``[B, K]`` for multi-reward estimators); group_ids ``[B]``; mask ``[B, T]`` response mask.
    """
    config = _as_config(config)
    mask = torch.as_tensor(mask).bool()
    rewards = torch.as_tensor(rewards, device=mask.device)
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    group_ids = torch.as_tensor(group_ids, device=mask.device)
    adv = compute_advantages(config.advantage, rewards, group_ids, mask, **config.advantage_options)
    adv = weight_positive(adv, config.positive_advantage_weight)
    zero_std = zero_variance_groups(rewards, group_ids).to(mask.device)
    if config.filter_zero_std_groups:
        mask = mask & ~zero_std.unsqueeze(1)
    num_seqs = int((~zero_std).sum()) if config.filter_zero_std_groups else mask.shape[0]
    normalizer = config.constant_normalizer if config.constant_normalizer is not None else mask.shape[1]
    counts = dict(num_tokens=mask.sum().clamp_min(1), num_seqs=max(num_seqs, 1), normalizer=normalizer)
    return GRPOBatch(adv, mask, counts, zero_std)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    counts: Mapping[str, Any],
    config: Union[GRPOStepConfig, Mapping[str, Any], None] = None,
    ref_logp: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The policy loss of one (micro-)batch -> ``(loss, stats)``: :func:`genalign.losses.policy_loss` with
    ``config``'s surrogate, ratio level, resolved aggregation, clip ranges and KL, and GLOBAL ``counts``
    (from :func:`grpo_prepare`). ``entropy`` ``[B, T]`` is needed by the ``"hapo"`` surrogate."""
    config = _as_config(config)
    extra = {}
    if config.surrogate == "hapo":
        if entropy is None:
            raise ValueError("surrogate 'hapo' needs the per-token entropy")
        extra["entropy_score"] = losses.entropy_score(entropy.detach(), mask)
    return losses.policy_loss(
        logp, old_logp, advantages, mask,
        surrogate=config.surrogate, ratio_level=config.ratio_level, aggregation=config.loss_aggregation,
        eps_low=config.eps_low, eps_high=config.eps_high, dual_clip=config.dual_clip,
        ref_logp=ref_logp, kl_kind=config.kl_kind, kl_coef=config.kl_coef, **counts, **extra,
    )


class TokenUnits(NamedTuple):
    """One generated batch on the policy's device: ids, masks, advantages, old / reference log-probs, counts."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prep: GRPOBatch
    old_logp: torch.Tensor
    ref_logp: Optional[torch.Tensor]
    rewards: torch.Tensor


class TokenPolicyGradient:
    """Token-level objectives (GRPO, Dr.GRPO, DAPO, GSPO, HAPO, ... chosen by :class:`GRPOStepConfig`) under the
    objective protocol of :mod:`genalign.objectives`: ``prepare`` -> units, ``minibatches``, ``backwards`` (one
    callable per micro-batch, each calling the one optimizer step's ``backward``)."""

    def __init__(self, policy: "CausalLMPolicy", step: OptimizerStep, config: GRPOStepConfig):
        self.policy, self.step, self.config = policy, step, config

    def prepare(self, batch: Mapping[str, torch.Tensor], rewards, group_ids) -> TokenUnits:
        config, policy, device = self.config, self.policy, self.policy.device
        input_ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        response_mask = batch["response_mask"].to(device).bool()
        rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device)
        prep = grpo_prepare(rewards, torch.as_tensor(group_ids, device=device), response_mask, config)
        old_logp = batch.get("old_logp")
        if old_logp is None:
            with torch.no_grad():
                old_logp, _ = policy.token_logprobs(input_ids, attn, response_mask, config.temperature)
        ref_logp = batch.get("ref_logp")
        if config.kl_kind is not None and ref_logp is None:
            raise ValueError(f"kl_kind={config.kl_kind!r} needs batch['ref_logp']")
        step = self.step
        if step.distributed and step.acc.num_processes > 1:  # global counts (each process holds whole groups)
            c = prep.counts
            total = step.acc.reduce(torch.stack([torch.as_tensor(c["num_tokens"], device=device).float(),
                                                 torch.tensor(float(c["num_seqs"]), device=device)]), "sum")
            c["num_tokens"], c["num_seqs"] = total[0].clamp_min(1), total[1].clamp_min(1)
        return TokenUnits(input_ids, attn, response_mask, prep, old_logp.to(device),
                          None if ref_logp is None else ref_logp.to(device), rewards)

    def minibatches(self, units: TokenUnits, epoch: int = 0, inner: int = 0) -> List[torch.Tensor]:
        return [torch.arange(units.input_ids.shape[0])]  # one optimizer step per generated batch

    def backwards(self, units: TokenUnits, rows: torch.Tensor):
        mb = self.config.micro_batch_size or len(rows)
        return [self._backward_fn(units, rows[s:s + mb]) for s in range(0, len(rows), mb)]

    def _backward_fn(self, u: TokenUnits, rows: torch.Tensor):
        config = self.config

        def run(sync: bool) -> Dict[str, torch.Tensor]:
            logp, entropy = self.policy.token_logprobs(u.input_ids[rows], u.attention_mask[rows], u.response_mask[rows],
                                                       config.temperature)
            loss, stats = grpo_loss(logp, u.old_logp[rows], u.prep.advantages[rows], u.prep.mask[rows], u.prep.counts,
                                    config, ref_logp=None if u.ref_logp is None else u.ref_logp[rows], entropy=entropy)
            self.step.backward(loss, sync)
            stats["loss"] = loss.detach()
            stats["entropy"] = losses.masked_mean(entropy.detach(), u.response_mask[rows])
            return stats
        return run


def grpo_step(
    policy: CausalLMPolicy,
    optimizer: torch.optim.Optimizer,
    batch: Mapping[str, torch.Tensor],
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    config: Union[GRPOStepConfig, Mapping[str, Any], None] = None,
    step: Optional[OptimizerStep] = None,
) -> Dict[str, float]:
    """One GRPO optimizer step on a generated batch -> stats (python floats, averaged over micro-batches).

    batch: output of :meth:`CausalLMPolicy.generate` (or :func:`dynamic_sample`), optionally with ``old_logp``
    ``[B, T]`` (log-probs at sampling time; absent -> recomputed now, i.e. ratio 1) and ``ref_logp`` ``[B, T]``
    (for the KL term). rewards ``[B]``; group_ids ``[B]``. The :class:`TokenPolicyGradient` objective (advantages,
    loss mask and global counts from :func:`grpo_prepare`, loss per micro-batch from :func:`grpo_loss`) runs
    through the project's one optimizer step (:class:`genalign.optim.OptimizerStep`: clipping, the non-finite
    check, ``optimizer.step()``), as every diffusion objective does. Pass ``step`` (an ``OptimizerStep`` built with
    an accelerator, ``distributed=True``) to train under DDP / FSDP / DeepSpeed with the loss normalised by global
    counts; by default the step is local to this process. Stats include ``zero_std_frac`` (fraction of samples in
    zero-variance groups).
    """
    config = _as_config(config)
    if step is None:
        step = OptimizerStep(None, policy.model, optimizer, max_grad_norm=config.max_grad_norm, distributed=False)
    objective = TokenPolicyGradient(policy, step, config)
    units = objective.prepare(batch, rewards, group_ids)
    policy.model.train()
    (rows,) = objective.minibatches(units)
    fns = objective.backwards(units, rows)
    totals, grad_norm = step.run(fns, where=" in grpo_step: ")
    n_micro = len(fns)
    out = {k: float(v) / n_micro for k, v in totals.items()}
    out["loss"] = out["loss"] * n_micro  # micro-batch losses sum to the full-batch loss
    out.update(grad_norm=float(grad_norm), reward_mean=float(units.rewards.mean()),
               adv_abs_mean=float(units.prep.advantages.abs().mean()),
               zero_std_frac=float(units.prep.zero_std.float().mean()))
    return out


# ----------------------------------------------------------------------------------------------------
# DAPO dynamic sampling


class DynamicSample(NamedTuple):
    """:func:`dynamic_sample` result: ``batch`` (the generate layout, ``num_groups * group_size`` rows, groups
    contiguous, ``group_ids`` relabelled ``0..G-1`` in kept order), ``rewards`` (the kept rows'), ``group_ids``
    (= ``batch["group_ids"]``) and ``stats``: ``rounds``, ``groups_sampled``, ``groups_with_variance``,
    ``groups_kept`` and ``complete`` (1.0 when ``num_groups`` groups were found)."""

    batch: Dict[str, Any]
    rewards: torch.Tensor
    group_ids: torch.Tensor
    stats: Dict[str, float]


class DynamicSamplingError(RuntimeError):
    """Raised by :func:`dynamic_sample` when ``max_rounds`` rounds did not yield ``num_groups`` groups with
    reward variance; ``.partial`` holds the :class:`DynamicSample` of the groups that were found."""

    def __init__(self, message: str, partial: DynamicSample):
        super().__init__(message)
        self.partial = partial


_PADDED_BOTH_SIDES = ("input_ids", "attention_mask")


def _per_row(value: Any, rows: int) -> bool:
    """Whether ``value`` holds one entry per row (a tensor with first dim ``rows``, or a list of that length)."""
    if isinstance(value, torch.Tensor):
        return value.ndim >= 1 and value.shape[0] == rows
    return isinstance(value, (list, tuple)) and len(value) == rows


def _select_rows(batch: Mapping[str, Any], rows: torch.Tensor) -> Dict[str, Any]:
    """The rows ``rows`` of every per-row entry of ``batch``; other entries are kept as they are."""
    n = batch["input_ids"].shape[0]
    out = {}
    for k, v in batch.items():
        if not _per_row(v, n):
            out[k] = v
        elif isinstance(v, torch.Tensor):
            out[k] = v[rows.to(v.device)]
        else:
            out[k] = [v[i] for i in rows.tolist()]
    return out


def concat_batches(batches: List[Mapping[str, Any]], pad_token_id: int = 0) -> Dict[str, Any]:
    """Concatenate batches of the generate layout (see the module docstring) whose prompt / response widths differ.

    ``input_ids`` / ``attention_mask``: the prompt part is left-padded and the response part right-padded to
    the widest (``pad_token_id`` / 0); per-row tensors ``[B, T, ...]`` whose second dim is the batch's response
    width ``T`` (``response_mask``, ``old_logp``, ``ref_logp``, ...) are right-padded with zeros; other per-row
    tensors are concatenated along dim 0 (their other dims must agree), per-row lists are joined, and any other
    entry is taken from the first batch. Prompt and response columns that are padding in every row are dropped.
    """
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    # widths used by the rows present: responses end at their longest valid prefix; prompts start at the first
    # column of the prompt part attended by some row
    T, P, spans = 1, 1, []
    for b in batches:
        t = b["response_mask"].shape[1]
        p = b["input_ids"].shape[1] - t
        spans.append((p, t))
        if b["input_ids"].shape[0]:
            T = max(T, int(b["response_mask"].bool().sum(1).max()))
            used = torch.where(b["attention_mask"][:, :p].bool().any(0))[0]
            P = max(P, p - int(used[0]) if len(used) else 0)
    out: Dict[str, Any] = {}
    for key, first in batches[0].items():
        if not _per_row(first, batches[0]["input_ids"].shape[0]):
            out[key] = first
        elif not isinstance(first, torch.Tensor):
            out[key] = [x for b in batches for x in b[key]]
        else:
            parts = []
            for b, (p, t) in zip(batches, spans):
                v = b[key]
                if key in _PADDED_BOTH_SIDES:
                    fill = pad_token_id if key == "input_ids" else 0
                    v = torch.cat([_fit(v[:, :p], P, fill, left=True), _fit(v[:, p:], T, fill, left=False)], 1)
                elif v.ndim >= 2 and v.shape[1] == t:
                    v = _fit(v, T, 0, left=False)
                parts.append(v)
            try:
                out[key] = torch.cat(parts, dim=0)
            except RuntimeError as exc:
                shapes = [tuple(x.shape) for x in parts]
                raise ValueError(f"cannot concatenate batch key {key!r}: shapes {shapes}") from exc
    return out


def _fit(x: torch.Tensor, width: int, fill, left: bool) -> torch.Tensor:
    """Crop or pad ``x`` ``[B, W, ...]`` to ``width`` columns, on the left (prompts) or the right (responses)."""
    w = x.shape[1]
    if w >= width:
        return x[:, w - width:] if left else x[:, :width]
    pad = x.new_full((x.shape[0], width - w, *x.shape[2:]), fill)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def dynamic_sample(
    generate_fn: Callable[[int, int], Mapping[str, Any]],
    reward_fn: Callable[[Mapping[str, Any]], Any],
    num_groups: int,
    group_size: int,
    max_rounds: int = 4,
    groups_per_round: Optional[int] = None,
    pad_token_id: int = 0,
    allow_partial: bool = False,
) -> DynamicSample:
    """DAPO dynamic sampling (arXiv 2503.14476): refill the batch with groups that have reward variance.

    Each round calls ``generate_fn(round_index, n)`` with ``n = groups_per_round`` (default ``num_groups``;
    larger values oversample) for a batch of the generate layout holding ``n`` groups of ``group_size``
    samples (``group_ids`` ``[B]``, e.g. ``policy.generate(prompts_of_round, k, num_return_sequences=
    group_size, seed=round_index)``), then ``reward_fn(batch)`` for its rewards ``[B]`` (or ``[B, K]``).
    Groups whose rewards are all equal (they carry no GRPO signal) are dropped; rounds continue until
    ``num_groups`` groups with variance are collected or ``max_rounds`` rounds ran. The FIRST ``num_groups``
    such groups, in generation order, are returned (exactly ``num_groups * group_size`` rows, batches of
    different widths merged by :func:`concat_batches`), with ``group_ids`` relabelled ``0..num_groups-1``.

    When ``max_rounds`` rounds yield fewer groups: raises :class:`DynamicSamplingError` (its message gives
    the counts; ``.partial`` holds what was found), or, with ``allow_partial=True``, warns and returns the
    smaller batch with ``stats["complete"] = 0.0``.
    """
    if num_groups < 1 or group_size < 2 or max_rounds < 1:
        raise ValueError(f"need num_groups >= 1, group_size >= 2 and max_rounds >= 1, got {num_groups}, "
                         f"{group_size}, {max_rounds}")
    per_round = num_groups if groups_per_round is None else groups_per_round
    if per_round < 1:
        raise ValueError(f"groups_per_round must be >= 1, got {per_round}")
    kept_parts, kept_rewards = [], []
    kept = sampled = with_variance = rounds = 0
    while kept < num_groups and rounds < max_rounds:
        batch = generate_fn(rounds, per_round)
        rounds += 1
        gids = torch.as_tensor(batch["group_ids"]).cpu()
        order = list(dict.fromkeys(gids.tolist()))  # groups in order of first appearance
        sizes = {g: int((gids == g).sum()) for g in order}
        if any(n != group_size for n in sizes.values()) or batch["input_ids"].shape[0] != gids.shape[0]:
            raise ValueError(f"round {rounds - 1}: every group must have group_size = {group_size} samples and every "
                             f"row a group id; got group sizes {sizes} for {batch['input_ids'].shape[0]} rows")
        rewards = torch.as_tensor(reward_fn(batch))
        rewards = rewards if rewards.is_floating_point() else rewards.float()
        if rewards.shape[0] != gids.shape[0]:
            raise ValueError(f"round {rounds - 1}: reward_fn returned {rewards.shape[0]} rewards for "
                             f"{gids.shape[0]} rows")
        flat = zero_variance_groups(rewards.cpu(), gids)
        sampled += len(order)
        good = [g for g in order if not bool(flat[gids == g][0])]
        with_variance += len(good)
        take = good[: num_groups - kept]
        kept += len(take)
        if take:
            rows = torch.cat([(gids == g).nonzero().flatten() for g in take])
            kept_parts.append(_select_rows(batch, rows))
            kept_rewards.append(rewards[rows.to(rewards.device)])
    stats = {"rounds": float(rounds), "groups_sampled": float(sampled), "groups_with_variance": float(with_variance),
             "groups_kept": float(kept), "complete": float(kept == num_groups)}
    if kept_parts:
        merged = concat_batches(kept_parts, pad_token_id)
        rewards_out = torch.cat([r.cpu() for r in kept_rewards])
    else:
        merged, rewards_out = {}, torch.zeros(0)
    group_ids = torch.arange(kept).repeat_interleave(group_size)
    if merged:
        merged["group_ids"] = group_ids.to(merged["input_ids"].device)
    result = DynamicSample(merged, rewards_out, group_ids, stats)
    if kept < num_groups:
        message = (f"dynamic sampling found {kept} of {num_groups} groups with reward variance in {rounds} rounds "
                   f"(max_rounds={max_rounds}; {sampled} groups sampled, {sampled - with_variance} with all rewards "
                   f"equal)")
        if not allow_partial:
            raise DynamicSamplingError(message + "; raise max_rounds or groups_per_round, or pass allow_partial=True",
                                       result)
        warnings.warn(message + "; returning the smaller batch", stacklevel=2)
    return result
