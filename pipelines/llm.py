"""Causal language models as policies over tokens, and a small GRPO step.

The LLM counterpart of the diffusion adapters: here a "token" of the shared loss module
(``genalign.losses``) is a response token, where for diffusion it is a denoising step. The GRPO step
below calls exactly the same :func:`genalign.losses.policy_loss` and
:func:`genalign.advantages.compute_advantages` as the diffusion trainer.

Batch layout (what :meth:`CausalLMPolicy.generate` returns and :func:`grpo_step` consumes):
``input_ids`` / ``attention_mask`` ``[B, P + T]`` hold the LEFT-padded prompt followed by the
RIGHT-padded response; ``response_mask`` ``[B, T]`` marks the generated tokens (the EOS token included,
everything after it excluded), so the response is always the last ``T`` columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from genalign import losses
from genalign.advantages import compute_advantages
from genalign.policy import resolve_device, resolve_pretrained


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
    ) -> Dict[str, torch.Tensor]:
        """Sample ``num_return_sequences`` responses per prompt -> batch dict (see module docstring).

        Returns ``input_ids``, ``attention_mask``, ``response_mask`` and ``group_ids`` (``[B]``, the prompt
        index: samples of one prompt form a GRPO group), with ``B = len(prompts) * num_return_sequences``
        ordered prompt-major. ``temperature = 0`` is greedy. Randomness comes only from ``generator`` (or
        a fresh one seeded with ``seed``).
        """
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


@dataclass
class GRPOStepConfig:
    """Settings of :func:`grpo_step` (names match ``policy_loss`` / ``compute_advantages``)."""

    advantage: str = "grpo"
    """Advantage estimator name (``genalign.advantages``): grpo, dr_grpo, bnpo, hapo, ..."""
    advantage_options: Dict[str, Any] = field(default_factory=dict)
    """Keyword options of the estimator (e.g. ``{"std": "batch", "clip": 5.0}``)."""
    surrogate: str = "ppo_clip"
    """Surrogate name (``genalign.losses.SURROGATES``); ``"hapo"`` gets the entropy score automatically."""
    ratio_level: str = "token"
    """token | sequence (GSPO) | sequence_token (GSPO-token)."""
    aggregation: str = "token_mean"
    """token_mean | seq_mean_token_mean | seq_mean_token_sum | constant."""
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


def grpo_step(
    policy: CausalLMPolicy,
    optimizer: torch.optim.Optimizer,
    batch: Mapping[str, torch.Tensor],
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    config: Union[GRPOStepConfig, Mapping[str, Any], None] = None,
) -> Dict[str, float]:
    """One GRPO optimizer step on a generated batch -> stats (python floats, averaged over micro-batches).

    batch: output of :meth:`CausalLMPolicy.generate`, optionally with ``old_logp`` ``[B, T]`` (log-probs at
    sampling time; absent -> recomputed now, i.e. ratio 1) and ``ref_logp`` ``[B, T]`` (for the KL term).
    rewards ``[B]``; group_ids ``[B]``. Advantages from ``genalign.advantages``, loss from
    ``genalign.losses.policy_loss`` with global token/sequence counts across micro-batches, then
    grad-norm clipping and ``optimizer.step()``.
    """
    if config is None:
        config = GRPOStepConfig()
    elif isinstance(config, Mapping):
        unknown = set(config) - {f.name for f in fields(GRPOStepConfig)}
        if unknown:
            valid = [f.name for f in fields(GRPOStepConfig)]
            raise ValueError(f"unknown grpo_step config keys {sorted(unknown)}; valid: {valid}")
        config = GRPOStepConfig(**config)
    device = policy.device
    input_ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    mask = batch["response_mask"].to(device).bool()
    rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device)
    adv = compute_advantages(config.advantage, rewards, torch.as_tensor(group_ids, device=device), mask,
                             **config.advantage_options)
    old_logp = batch.get("old_logp")
    if old_logp is None:
        with torch.no_grad():
            old_logp, _ = policy.token_logprobs(input_ids, attn, mask, config.temperature)
    ref_logp = batch.get("ref_logp")
    if config.kl_kind is not None and ref_logp is None:
        raise ValueError(f"kl_kind={config.kl_kind!r} needs batch['ref_logp']")

    B = input_ids.shape[0]
    mb = config.micro_batch_size or B
    counts = dict(num_tokens=mask.sum().clamp_min(1), num_seqs=B, normalizer=mask.shape[1])
    policy.model.train()
    optimizer.zero_grad(set_to_none=True)
    totals: Dict[str, torch.Tensor] = {}
    n_micro = 0
    for s in range(0, B, mb):
        sl = slice(s, s + mb)
        logp, entropy = policy.token_logprobs(input_ids[sl], attn[sl], mask[sl], config.temperature)
        extra = {}
        if config.surrogate == "hapo":
            extra["entropy_score"] = losses.entropy_score(entropy.detach(), mask[sl])
        loss, stats = losses.policy_loss(
            logp, old_logp[sl].to(device), adv[sl], mask[sl],
            surrogate=config.surrogate, ratio_level=config.ratio_level, aggregation=config.aggregation,
            eps_low=config.eps_low, eps_high=config.eps_high, dual_clip=config.dual_clip,
            ref_logp=None if ref_logp is None else ref_logp[sl].to(device), kl_kind=config.kl_kind,
            kl_coef=config.kl_coef, **counts, **extra,
        )
        loss.backward()
        stats["loss"] = loss.detach()
        stats["entropy"] = losses.masked_mean(entropy.detach(), mask[sl])
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v
        n_micro += 1
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.model.parameters(), config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out = {k: float(v) / n_micro for k, v in totals.items()}
    out["loss"] = out["loss"] * n_micro  # micro-batch losses sum to the full-batch loss
    out.update(grad_norm=float(grad_norm), reward_mean=float(rewards.mean()), adv_abs_mean=float(adv.abs().mean()))
    return out
