"""Run configuration: dataclasses (one docstring per field), YAML loading, dotted overrides, validation.

Batch arithmetic (explained once, here)
---------------------------------------
Each epoch draws ``sampling.groups_per_epoch`` prompts and generates ``sampling.group_size`` images
per prompt (a *group*): ``samples_per_epoch = groups_per_epoch * group_size`` images over all
processes. Groups may span processes. Every process generates ``samples_per_epoch / world_size``
images in rollout batches of ``sampling.batch_size``, so ``samples_per_epoch`` must be divisible by
``world_size * sampling.batch_size``.

The epoch's samples are then split into ``train.num_minibatches`` optimizer steps (per inner epoch):
each optimizer step sees ``samples_per_epoch / num_minibatches`` samples over all processes, processed
in micro-batches of ``train.batch_size`` per process, and every micro-batch is trained on each of its
trainable denoising steps. Gradients of all micro-batches and steps of one optimizer step are
accumulated, and the loss is normalised by the number of (sample, step) tokens of the whole
optimizer step, so accumulation does not change the loss. Optimizer steps per epoch:
``num_minibatches * num_inner_epochs``.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import re
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

import yaml

from .errors import ConfigError, check_choice as _choice  # noqa: F401 - ConfigError is re-exported here
from .choices import LR_SCHEDULES

if TYPE_CHECKING:  # imported inside functions below (torch); method_specs never imports this module
    from .method_specs import MethodSpec


class _Loader(yaml.SafeLoader):
    """YAML 1.1 SafeLoader that also reads ``1e-4`` (no dot) as a float, like YAML 1.2 and Python do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))



def _int_at_least_or_null(key: str, value: Any, low: int = 1) -> None:
    """Refuse ``value`` (of config ``key``) unless it is null or an int (not a bool) >= ``low``."""
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise ConfigError(f"{key} must be an int >= {low} or null, got {value!r}")


DIGITS_MODELS = ("digits", "digits_wide")
"""The shipped digits generators (folders of ``genalign.assets``; ``genalign.pipelines.digits.SHIPPED_NAMES``);
defined here so that validating a config imports no model code."""

@dataclass
class ModelConfig:
    id: str = "digits"
    """Model to align: 'digits' (the shipped tiny model), a hub id or a local diffusers directory."""
    dtype: str = "float32"
    """Weights dtype for the frozen parts and the forward: float32, bfloat16 or float16."""
    guidance_scale: Optional[float] = None
    """CFG scale (Flux: guidance embedding value) for rollout and training; None = the adapter's default."""
    height: Optional[int] = None
    """Image height in pixels; None = the model's default."""
    width: Optional[int] = None
    """Image width in pixels; None = the model's default."""
    device: Optional[str] = None
    """Device override; None = accelerate's device for this process."""
    xformers: bool = False
    """Use xformers attention in the denoiser when xformers is installed and the device is CUDA (else PyTorch SDPA)."""
    decode_batch_size: Optional[int] = None
    """VAE-decode at most this many latents at once (lower peak memory at large batches); None = whole batch."""
    drop_t5: bool = False
    """SD3 / SD3.5: run without the T5-XXL text encoder (not loaded: about 9.5 GB less in bf16); diffusers fills
    the T5 part of the prompt embeddings with zeros. Sample and evaluate such a LoRA the same way."""
    offload_text_encoders: bool = False
    """Keep the text encoders on the CPU, moved to the device only while prompts are encoded (diffusers models)."""
    cache_prompt_embeds: bool = False
    """Encode each distinct prompt once and reuse its embeddings, kept on the CPU (diffusers models); training
    prompts repeat every epoch."""
    condition_size: Optional[Union[int, List[int]]] = None
    """FLUX.1 Kontext (flux_kontext): the pixel size the prompt set's condition images are resized to, an int
    (square) or [height, width] (multiples of 16); None = the pipeline's choice: the preferred Kontext resolution
    (about 1024x1024 pixels) closest to each image's aspect ratio."""

    options: Dict[str, Any] = field(default_factory=dict)
    """Further keyword options of the model adapter, e.g. {num_frames: 81} (wan), {true_cfg_scale: 4.0} (flux,
    qwen_image), {max_sequence_length: 256} (qwen_image, z_image). Options the adapter's constructor does not take
    go to diffusers' ``from_pretrained`` (e.g. {variant: fp16, revision: main})."""

    def policy_kwargs(self) -> Dict[str, Any]:
        """The adapter keyword arguments set here (``height``, ``width``, ``drop_t5``, ``offload_text_encoders``,
        ``cache_prompt_embeds``, ``condition_size`` and ``options``), only those given or switched on, for
        ``load_policy(id, **kwargs)``."""
        names = ("height", "width", "drop_t5", "offload_text_encoders", "cache_prompt_embeds", "condition_size")
        out = {k: getattr(self, k) for k in names if getattr(self, k)}
        clash = sorted(set(out) & set(self.options))
        if clash:
            raise ConfigError(f"model.options sets {clash}, which model.{clash[0]} already sets: use one of them")
        return {**out, **self.options}


@dataclass
class SamplingConfig:
    num_steps: int = 10
    """Denoising steps T of a training rollout."""
    step_kind: str = "sde"
    """Stochastic step: 'sde' (Flow-GRPO), 'cps' (coefficient-preserving), 'dance' (Dance-SDE: constant diffusion
    coefficient eta = noise_level, docs/algorithms.md §1.6) or 'ddim' (DDPM-family models)."""
    noise_level: float = 0.7
    """Noise level a of the stochastic steps (DDIM: eta)."""
    last_step_deterministic: bool = False
    """Make the final step an ODE step (it is then never trained)."""
    groups_per_epoch: int = 8
    """Prompts drawn per epoch (over all processes); each gives one group."""
    group_size: int = 16
    """Images per prompt (group size k >= 2); advantages are relative within a group."""
    batch_size: int = 32
    """Rollout batch per process."""
    log_prob_reduction: str = "mean"
    """Reduce per-element Gaussian log-densities by 'mean' (Flow-GRPO's, default) or 'sum' (true density)."""
    async_rewards: bool = False
    """Score a batch in a background thread while the next batch is sampled."""
    window: Optional[Dict[str, Any]] = None
    """The option of method flow_grpo_fast (kind fast) and mixgrpo (kind mixgrpo), which set it; refused under
    the other methods. SDE window (only its steps are stochastic and trained; ODE elsewhere): ``{kind: fast, size: 2,
    max_start: null}`` (Flow-GRPO-Fast: start drawn per group in [0, max_start], null = T//2 - size) or
    ``{kind: mixgrpo, size: 4, shift_every: 25, stride: 1, schedule: wrap}`` (MixGRPO, arXiv 2507.21802: one
    window for all samples of an epoch, moved by ``stride`` steps every ``shift_every`` epochs; stride 0 = a
    frozen window). ``schedule``: 'wrap' (default: start ``stride * q mod (n - size + 1)`` with
    ``q = epoch // shift_every``, always ``size`` steps), 'roll_back' (the released MixGRPO scripts: the
    window is cut at the last trainable step, so it shrinks to ``n - start`` steps near the end, then
    restarts at step 0) or 'random' (start drawn uniformly in [0, n - size] every shift_every epochs from
    (seed, q), stride unused; the released random strategy redraws every iteration: shift_every 1). Windows lie within the
    n trainable steps (see train.timestep_fraction; the released MixGRPO window stays below step T - 2)."""
    branching: Optional[Dict[str, Any]] = None
    """The option of method tempflow_grpo (which sets it; refused under the other methods). TempFlow-GRPO
    branching: ``{seeds: N, branches: K, steps: all | [j, ...] | n}``. Per prompt
    and seed an ODE main trajectory; at each branching step j (all trainable steps, a list, or n drawn at
    random per seed) K branches take one SDE step from x_j and continue by ODE. Needs
    group_size = seeds * branches * (number of branching steps)."""


@dataclass
class LoraConfig:
    enabled: bool = True
    """Train LoRA adapters (True) or the full denoiser (False)."""
    rank: int = 32
    """LoRA rank r."""
    alpha: float = 64.0
    """LoRA alpha."""
    target_modules: Optional[List[str]] = None
    """Module names to adapt; None = the model adapter's defaults."""


@dataclass
class TrainConfig:
    optimizer: str = "adamw"
    """'adamw' (torch, fused on CUDA) or 'adamw8bit' (bitsandbytes' 8-bit AdamW, Dettmers et al. 2022,
    arXiv 2110.02861: optimizer state in 8 bits, about 75% less optimizer memory; pip install 'genalign[bnb]')."""
    lr: float = 3e-4
    """AdamW learning rate (the peak of ``lr_schedule``)."""
    lr_schedule: str = "constant"
    """Learning rate over the run, set at the start of every epoch from the epoch index (so a resumed run continues
    it exactly): 'constant', 'cosine' (half a cosine from ``lr`` down to ``lr * lr_min_ratio`` over the epochs after
    the warm-up; Loshchilov & Hutter, arXiv 1608.03983) or 'linear' (a straight line between the same ends). The
    schedule spans ``num_epochs``: raising ``num_epochs`` when resuming stretches what is left of it."""
    lr_warmup_epochs: int = 0
    """Epochs of linear warm-up before the schedule (epoch e < warm-up uses ``lr * (e + 1) / lr_warmup_epochs``)."""
    lr_min_ratio: float = 0.0
    """Where 'cosine' and 'linear' end, as a fraction of ``lr``."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold (0 disables)."""
    num_minibatches: int = 2
    """Optimizer steps per inner epoch (the epoch's samples are split into this many parts)."""
    num_inner_epochs: int = 1
    """Passes over an epoch's samples."""
    batch_size: int = 16
    """Training micro-batch per process."""
    timestep_fraction: float = 0.99
    """Fraction of the stochastic steps that are trained (the first ones; Flow-GRPO trains int(0.99*T))."""
    shuffle_steps: bool = False
    """Train each sample's steps in a random order (instead of 0, 1, ...)."""
    clip_range: float = 1e-4
    """PPO clip epsilon (lower side)."""
    clip_range_high: Optional[float] = None
    """PPO clip epsilon (upper side); None = clip_range."""
    kl_beta: float = 0.0
    """Coefficient of the Gaussian mean KL to the reference policy (LoRA: adapters disabled)."""
    kl_form: str = "exact"
    """Gaussian KL scale: 'exact' (KL of the transitions, divided by the transition variance
    (sigma_t sqrt(dt))^2) or 'flow_grpo' (flow_grpo's code: the SDE step divides by sigma_t^2 only, i.e. the
    exact KL times dt_j, 3.7x-25x weaker on the trained steps of SD3's 10-step shift-3 schedule; a kl_beta copied from a flow_grpo
    config needs this form; CPS steps have no sqrt(dt) in their std, so both forms agree there). The KL is
    reduced over elements like the log-probs (sampling.log_prob_reduction)."""
    reference_copy: bool = False
    """Full fine-tuning with kl_beta > 0: keep a frozen copy of the denoiser as the reference."""
    advantage: str = "grpo"
    """Advantage estimator name (see genalign.advantages)."""
    advantage_std: str = "group"
    """Advantage scaling: 'group' std, 'batch' (global) std, or 'none' (Dr.GRPO)."""
    advantage_unbiased_std: bool = False
    """Scale advantages by the unbiased (n - 1) std instead of the population (n) std; TRL and verl use the
    unbiased one, Flow-GRPO's code the population one."""
    advantage_clip: float = 5.0
    """Clamp advantages to +- this value."""
    positive_advantage_weight: float = 1.0
    """Multiply positive advantages by this weight, negative ones unchanged (W-REINFORCE, Zhu et al. 2025,
    "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning", arXiv 2506.01347, uses 0.1):
    below 1 the update mostly pushes probability away from low-reward samples and lets the model's own prior
    redistribute it, instead of pulling it onto the high-reward samples drawn (which narrows each prompt's
    distribution). 1 = the estimator's advantages; 0 = negative samples only. Applies wherever group advantages
    are formed (the policy-gradient methods with TempFlow's branch advantages included, AWM, DGPO, DiffusionNFT)."""
    filter_zero_std_groups: bool = True
    """Groups whose rewards are all equal contribute no policy-gradient tokens (and do not count in the
    loss denominator)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: after sampling an epoch, drop groups whose rewards are all equal and sample further
    rounds of groups (new prompts, new noise) until sampling.groups_per_epoch groups with reward variance are
    collected; the first ones in sampling order are trained."""
    dynamic_sampling_max_rounds: int = 4
    """Dynamic sampling: at most this many sampling rounds per epoch (the first included); when fewer groups
    with reward variance exist after the last round, the epoch trains on those and logs a warning."""
    surrogate: str = "ppo_clip"
    """Surrogate objective name (see genalign.losses): 'ppo_clip', 'cispo' or 'dppo_mask' (DPPO's divergence trust
    region: no ratio clipping; a (sample, step) token loses its gradient when its Gaussian KL from the sampling
    policy's transition exceeds train.dppo_threshold and its ratio already moved the way its advantage pushes)."""
    dppo_threshold: float = 1e-6
    """train.surrogate = 'dppo_mask': the per-step KL(current || sampling policy) above which a token that moves
    further away loses its gradient (KL of the transition Gaussians, reduced over elements like the log-probs)."""
    kl_space: Optional[str] = None
    """Where the KL to the reference is measured (train.kl_beta > 0): 'x' (latent space: for the policy-gradient
    objective the Gaussian KL of the transition means, for the forward-process objectives the squared difference of
    the predicted clean samples s^2 (v - v_ref)^2) or 'v' (velocity space: mean (v - v_ref)^2 of the denoiser's
    predictions at the same input). None: the objective's own ('x' for the policy gradient, 'v' for DiffusionNFT,
    AWM, DGPO and SFT)."""
    frozen_modules: List[str] = field(default_factory=list)
    """Full fine-tuning: regular expressions searched (``re.search``) in the denoiser's parameter names; the
    parameters that match stay frozen (not trained, not in the EMA or the optimizer). Each pattern must match at
    least one parameter. E.g. ``['context', 'add_', 'text_embedder']`` keeps an MMDiT's text stream (SD3 / the
    digits model) as pretrained and trains the image stream only. With LoRA choose ``lora.target_modules`` instead."""
    reference_device: Optional[str] = None
    """Full fine-tuning with train.reference_copy: keep the frozen reference copy on this device ('cpu' saves
    accelerator memory; its forward then runs on the CPU). None: the policy's device."""
    aggregation: str = "token_mean"
    """Loss aggregation over (sample, step) tokens (see genalign.losses)."""
    ema: bool = True
    """Keep an EMA of the trainable weights for evaluation."""
    ema_decay: float = 0.9
    """EMA decay."""
    ema_every: int = 8
    """Update the EMA every this many optimizer steps."""
    gradient_checkpointing: bool = False
    """Enable gradient checkpointing in the denoiser (saves activation memory)."""
    step_weighting: str = "none"
    """Per-step policy-loss weights (the KL term is never weighted): 'none', 'noise_aware' (TempFlow-GRPO,
    arXiv 2508.04324: w_j = s_j / mean_k s_k with s_j = sigma_t(j) sqrt(dt_j), mean over the trainable steps),
    'noise_aware_released' (TempFlow's released SD3.5-M code: w_j = 2.25 * 0.7 sqrt(s/(1-s)) sqrt(dt_j), the SDE
    std at its fixed noise level 0.7 (whatever sampling.noise_level), not normalised; on SD3's 10-step
    shift-3 schedule it equals 'noise_aware' times 0.999), 'noise_aware_released_flux' (the same with 1.73,
    its FLUX script), 'noise_aware_released_qwenimage' (1.53, its Qwen-Image script) or 'inverse_dt'
    (GRPO-Guard: 1/dt_j, normalised to mean 1 over the trainable steps)."""
    ratio_norm: bool = False
    """GRPO-Guard RatioNorm: log r_hat = (logp - logp_old + bias) * std with
    bias = reduce_e((mu - mu_old)^2) / (2 std^2), i.e. reduce_e(eps * dmu) (see genalign.methods)."""


@dataclass
class EvalConfig:
    every: int = 5
    """Evaluate every this many epochs (0 disables periodic evaluation; the end always evaluates)."""
    height: Optional[int] = None
    """Evaluation image height in pixels (diffusers models), decoupled from training: e.g. train at 512 and evaluate
    at 1024; None = the training resolution (model.height)."""
    width: Optional[int] = None
    """Evaluation image width in pixels; None = the training resolution (model.width)."""
    num_per_prompt: int = 4
    """Images per evaluation prompt."""
    num_steps: Optional[int] = None
    """ODE steps for evaluation; None = sampling.num_steps."""
    seed: int = 1234
    """Seed of the evaluation noise (identical every evaluation)."""
    use_ema: bool = True
    """Evaluate with the EMA weights when an EMA is kept."""
    judge: bool = True
    """Also log an independent realism / diversity judge when the model adapter provides one
    (``independent_judge()``; digits: ``eval/fd_independent``, ``eval/diversity_ratio``, ``eval/vendi`` in a
    pixel-PCA space no reward shares; one process only)."""
    judge_encoder: Optional[str] = None
    """Judge realism / diversity with this image encoder instead of the adapter's own judge (a
    ``genalign.encoders`` entry point: ``dino``, ``clip`` or ``digits``; pick one that no reward in use shares): ``eval/fd_independent`` to ``eval.judge_references``,
    ``eval/diversity`` (mean pairwise feature distance within each prompt), ``eval/vendi``,
    ``eval/precision`` / ``eval/recall`` (k-NN manifolds, arXiv 1904.06991). Needs ``eval.judge_references``."""
    judge_references: Optional[str] = None
    """Reference images for ``eval.judge_encoder`` (a directory of images): the real distribution to match."""
    judge_options: Dict[str, Any] = field(default_factory=dict)
    """Keyword options of the judge encoder (e.g. ``{model: facebook/dinov2-base}``)."""
    max_fd_rise: float = 0.10
    """Reward-hacking check: flag an evaluation whose eval/reward is above the first evaluation's while
    eval/fd_independent is more than this fraction above the first evaluation's (0 disables the check)."""
    max_diversity_drop: float = 0.10
    """Reward-hacking check: flag when the diversity (eval/diversity_ratio, else eval/diversity) is more than this
    fraction below the first evaluation's while eval/reward is above it (0 disables the check)."""
    on_hacking: str = "warn"
    """What a flagged evaluation does: 'warn' (a RewardHackingWarning naming the metric and threshold),
    'stop' (warn, then end training after this epoch) or 'ignore'."""
    keep_best: bool = True
    """Keep the weights of the evaluation with the highest eval/reward among those not flagged as hacking in
    <output_dir>/best (with best.json: its epoch and metrics)."""


@dataclass
class CheckpointConfig:
    every: int = 10
    """Save a checkpoint every this many epochs (0: only by time and at the end)."""
    every_minutes: float = 30.0
    """Also save when this many minutes passed since the last checkpoint (checked after each epoch, decided by
    the main process; 0 disables), so a crash loses at most about this much work."""
    keep_last: int = 2
    """Checkpoints kept on disk."""


@dataclass
class NFTConfig:
    """Options of ``method: diffusion_nft`` (DiffusionNFT, arXiv 2509.16117; docs/algorithms.md §11; refused under
    other methods when changed from their defaults)."""

    beta: float = 1.0
    """Implicit-policy strength: positive velocity ``beta v + (1 - beta) v_old``, negative
    ``(1 + beta) v_old - beta v`` (the paper's beta; 1.0 by default, 0.1 for its OCR run)."""
    old_decay_rate: float = 0.001
    """The sampling ("old") policy follows the trained one after every epoch as ``old = d old + (1 - d) theta``
    with ``d = min(old_decay_rate * (optimizer steps - old_decay_delay), old_decay_max)`` (0 before the delay)."""
    old_decay_max: float = 0.5
    """Upper bound of that decay d (0: the old policy is the trained one after every epoch; 1: once d reaches 1
    the old policy stays where it is, and with ``old_decay_rate`` >= 1 it is the initial model for the whole run)."""
    old_decay_delay: int = 0
    """Optimizer steps before the decay starts growing."""
    optimality: str = "linear"
    """How advantages become optimality weights r: 'linear' ``clip(A / train.advantage_clip / 2 + 1/2, 0, 1)``
    (the paper's default), 'binary' (1 above the group's mean, 0 below, 1/2 at it: the released code's
    ``adv_mode: binary``) or 'reward' (rewards in [0, 1] scaled to mean 1/2: ``clip(R / (2 mean R), 0, 1)``)."""
    adaptive_weight: bool = True
    """Divide each sample's x0 squared error by its (stop-gradient) mean absolute x0 error, as the released code
    does; false: the plain flow-matching MSE."""


@dataclass
class DragonConfig:
    """Options of ``method: dragon`` (refused under other methods when changed from their defaults)."""

    loss: str = "dpo"
    """DRAGON loss on the flow-matching MSE: 'dpo' (Diffusion-DPO; needs pairing 'paired') or 'kto' (Diffusion-KTO)."""
    beta: Optional[float] = None
    """Loss temperature; None = 5000 for dpo, 1000 for kto (docs/algorithms.md §6.5)."""
    criterion: str = "instance"
    """How D+ / D- are formed: 'instance' (per prompt group, the better half of the rewards -> D+) or 'set'
    (the rewards are a set reward's per-sample contributions, e.g. frechet_set / vendi; see set_split)."""
    pairing: str = "paired"
    """'paired': (D+, D-) pairs within a prompt group share noise and timestep; 'unpaired': every labelled sample."""
    set_split: str = "loo"
    """criterion 'set': 'loo' (top half of the leave-one-out contributions over the batch -> D+) or 'greedy'
    (pair swaps while the set reward of D+ improves; needs exactly one set reward and one process)."""
    max_swaps: int = 100
    """set_split 'greedy': at most this many swaps."""
    kto_reference: str = "mean"
    """loss 'kto': reference point z subtracted from each implicit reward g = L_ref - L (per micro-batch).
    'mean': z = max(0, mean of g over the micro-batch), the KTO batch KL estimate clamped at 0 (the released
    Diffusion-KTO code's default, --bce_offset none). 'sigmoid': z = (mean of g over D+ + mean of g over D-) / 2,
    not clamped (the released code's --bce_offset sigmoid option; an absent class contributes 0)."""


@dataclass
class AWMConfig:
    """Options of ``method: awm`` (Advantage Weighted Matching, arXiv 2509.25050; docs/algorithms.md §13.1)."""

    weighting: str = "uniform"
    """Noise-level weight w(s) of the matching log-likelihood -w(s) mean (v - (eps - x0))^2: 'uniform', 't' (s)
    or 't2' (s^2)."""


@dataclass
class DGPOConfig:
    """Options of ``method: dgpo`` (Direct Group Preference Optimization, arXiv 2510.08425; docs/algorithms.md
    §13.2)."""

    beta: float = 100.0
    """DPO temperature of the group margin (beta / G) sum_i A_i (L_i - L_ref,i) (the released default, 100)."""
    clip: bool = True
    """PPO-style trust region on the matching loss, as released: a unit whose likelihood ratio exp(L_old - L) against
    the old policy (below) already passed 1 + train.clip_range_high (A > 0) or 1 - train.clip_range (A < 0) gets no
    gradient."""
    old_decay_rate: float = 0.001
    """The old policy is an EMA of the trained weights, updated after every optimizer step as
    old = d old + (1 - d) theta with d = min(old_decay_rate * optimizer steps, old_decay_max)."""
    old_decay_max: float = 0.3
    """Upper bound of that decay (the released 0.3)."""
    reference: str = "base"
    """The DPO reference L_ref of the margins: 'base' (the frozen base: LoRA disabled or the frozen copy) or 'old'
    (the EMA old policy, a moving reference; needs dgpo.clip for the old policy; the released use_ema_ref)."""
    sample_with_old_after: Optional[int] = 200
    """After this many optimizer steps the old policy draws the samples (the released switch, 200); None: always the
    trained weights."""


@dataclass
class SFTConfig:
    """Options of ``method: sft`` (docs/algorithms.md §13.3)."""

    top_k: Optional[int] = None
    """SFT on samples: train on the best top_k samples of each prompt group only (best-of-N distillation); None =
    every sample. Not used with a data set (data.train_file)."""
    sample_from: str = "policy"
    """Who draws the samples SFT trains on: 'policy' (the trained weights: iterated best-of-N, which narrows every
    epoch) or 'reference' (the frozen base: LoRA adapters disabled or the frozen copy; the fit then targets the
    base's own best-of-N distribution, a fixed tilt of the base)."""


@dataclass
class DataConfig:
    """A data set of images for the data-driven methods (``sft``: demonstrations; ``diffusion_dpo``: preference
    pairs) instead of on-policy samples (docs/algorithms.md §13.4)."""

    train_file: Optional[str] = None
    """jsonl: one record per line with 'prompt' and 'image' (sft) or 'prompt', 'chosen' and 'rejected'
    (diffusion_dpo); image paths are relative to the file's folder. None: train on the policy's own samples."""
    samples_per_epoch: Optional[int] = None
    """Records per epoch (drawn without replacement from a fresh permutation every epoch); None = all."""
    anchor_file: Optional[str] = None
    """Reference-data anchor (any method; README "Aligning without collapse", docs/algorithms.md §13.6): jsonl of
    demonstrations ('prompt', 'image'; ``digits:NAME`` names a shipped file) whose flow-matching loss, weighted by
    ``anchor_coef``, is added to every optimizer step. None: no anchor."""
    anchor_coef: float = 1.0
    """Weight of the anchor's flow-matching loss (a mean over its units) beside the method's loss."""
    anchor_per_epoch: int = 64
    """Anchor records per epoch (a fresh permutation each epoch), spread over the epoch's optimizer steps; each
    record is trained at every trained noise level of the sampler's schedule."""
    anchor_levels: str = "continuous"
    """Noise levels of the anchor's units: 'continuous' (each record's units stratified over the whole schedule,
    sigma in (0, 1], as in pretraining) or 'schedule' (the sampler's trained levels sigmas[j], as the
    forward-process objectives)."""
    anchor_units: Optional[int] = None
    """Units (noise levels) per anchor record with ``anchor_levels: continuous``, stratified over the whole schedule;
    None = one per trained step of the sampler (as ``schedule``). Fewer units per record cost less per epoch; more
    records (``anchor_per_epoch``) cover the data better for the same cost."""
    anchor_batch_size: Optional[int] = None
    """Units per backward pass of the anchor (its micro-batch); None: ``train.batch_size``. The anchor's loss is
    normalised by the optimizer step's unit count, so this changes speed and memory, not the gradient (float
    rounding aside). A larger one than the method's (bounded by its minibatch) speeds small models on CPUs."""
    anchor_shift: float = 1.0
    """With ``anchor_levels: continuous``: the stratified levels ``s`` are moved towards high noise by the time shift
    ``shift * s / (1 + (shift - 1) * s)`` (SD3's shift, arXiv 2403.03206 §5.3.2); 1 = unchanged, 3 puts the median
    level at 0.75. High noise is where the drawn class is decided; low noise is texture."""


@dataclass
class AdversarialConfig:
    """Options of ``method: adv_grpo`` (refused under other methods when changed from their defaults)."""

    steps: int = 9
    """Discriminator steps before each generator round, each on fresh generated images (method adv_grpo);
    0 keeps the discriminator frozen."""
    rule: str = "fixed"
    """'fixed': always `steps` steps; 'while_behind': at most `steps`, each only while the generated images
    still outscore the references."""
    num_samples: int = 32
    """Generated images per discriminator step (training prompts, sampling.num_steps, sampling.noise_level)."""


@dataclass
class Config:
    output_dir: str = "runs/digits"
    """Run directory: metrics.jsonl, checkpoints/, lora/, plots and grids."""
    num_epochs: int = 40
    """Training epochs (sampling + training rounds)."""
    seed: int = 0
    """Seed of prompts, noise and initialisation."""
    reward: Any = "digit_correct"
    """Reward: a registered name, 'path/to/file.py:function', or a mapping {reward: weight}."""
    reward_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    """Keyword options per registered reward name, e.g. {digit_correct: {model_dir: digits}}."""
    prompts_file: str = "digits:prompts_train.txt"
    """Training prompts, one per line ('digits:NAME' = a file of the shipped digits assets, 'prompts:NAME' = a
    shipped prompt set of genalign.assets/prompts)."""
    eval_prompts_file: Optional[str] = "digits:prompts_eval.txt"
    """Evaluation prompts, one per line; None disables evaluation. A model other than digits must not use a
    'digits:' file (refused at validation); 'prompts:NAME' = a shipped prompt set (genalign.assets/prompts)."""
    eval_split: Optional[float] = None
    """Train / test split of one prompt set: hold out this fraction of prompts_file's records (drawn by ``seed``, at
    least one) as the evaluation prompts and train on the rest; eval_prompts_file must then be null."""
    mixed_precision: str = "no"
    """accelerate mixed precision: no, bf16 or fp16 (step math stays float32)."""
    log_with: List[str] = field(default_factory=list)
    """accelerate trackers to log to as well (tensorboard, wandb), when installed."""
    method: str = "flow_grpo"
    """Training method (genalign.method_specs): flow_grpo, flow_grpo_fast, mixgrpo, tempflow_grpo, grpo_guard,
    dragon, adv_grpo, diffusion_nft, awm, dgpo, diffusion_dpo or sft. It picks the objective and the epoch plan and sets defaults (merged under the YAML and
    the overrides: explicit keys win); sampling.window / sampling.branching / dragon.* / adversarial.* are the
    options of their methods and refused under the others."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dragon: DragonConfig = field(default_factory=DragonConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    awm: AWMConfig = field(default_factory=AWMConfig)
    dgpo: DGPOConfig = field(default_factory=DGPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @property
    def samples_per_epoch(self) -> int:
        return self.sampling.groups_per_epoch * self.sampling.group_size

    def validate(self, world_size: int = 1) -> None:
        """Check values and the batch arithmetic for ``world_size`` processes (raise ConfigError)."""
        s, t = self.sampling, self.train
        _choice("sampling.step_kind", s.step_kind, ["sde", "cps", "dance", "ddim"])
        _choice("sampling.log_prob_reduction", s.log_prob_reduction, ["mean", "sum"])
        _choice("model.dtype", self.model.dtype, ["float32", "bfloat16", "float16"])
        _choice("mixed_precision", self.mixed_precision, ["no", "bf16", "fp16"])
        _choice("train.advantage_std", t.advantage_std, ["group", "batch", "none"])
        _choice("train.kl_form", t.kl_form, ["exact", "flow_grpo"])
        if self.eval_split is not None:
            if not (isinstance(self.eval_split, float) and 0 < self.eval_split < 1):
                raise ConfigError(f"eval_split must be a fraction in (0, 1) or null, got {self.eval_split!r}")
            if self.eval_prompts_file:
                raise ConfigError(f"eval_split holds out part of prompts_file as the evaluation prompts; "
                                  f"eval_prompts_file = {self.eval_prompts_file!r} would be a second source: set it "
                                  f"to null")
        for key in ("height", "width"):
            value = getattr(self.eval, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"eval.{key} must be a positive int (pixels) or null, got {value!r}")
        if t.reference_device and not t.reference_copy:
            raise ConfigError(f"train.reference_device = {t.reference_device!r} places the frozen reference copy; it "
                              f"needs train.reference_copy = true (with LoRA the reference is the base weights)")
        if t.kl_space is not None:
            _choice("train.kl_space", t.kl_space, ["x", "v"])
        if not (isinstance(t.frozen_modules, list) and all(isinstance(x, str) and x for x in t.frozen_modules)):
            raise ConfigError(f"train.frozen_modules must be a list of non-empty regular expressions, got "
                              f"{t.frozen_modules!r}")
        for pattern in t.frozen_modules:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"train.frozen_modules: {pattern!r} is not a regular expression ({e})") from None
        if t.frozen_modules and self.lora.enabled:
            raise ConfigError(f"train.frozen_modules ({t.frozen_modules}) selects what full fine-tuning trains; with "
                              f"lora.enabled the adapters' lora.target_modules decide it")
        if t.surrogate == "dppo_mask" and not t.dppo_threshold > 0:
            raise ConfigError(f"train.dppo_threshold must be > 0, got {t.dppo_threshold}")
        _choice("train.optimizer", t.optimizer, ["adamw", "adamw8bit"])
        _choice("train.lr_schedule", t.lr_schedule, list(LR_SCHEDULES))
        if not (isinstance(t.lr_warmup_epochs, int) and not isinstance(t.lr_warmup_epochs, bool)
                and 0 <= t.lr_warmup_epochs <= max(self.num_epochs, 0)):
            raise ConfigError(f"train.lr_warmup_epochs must be an int in [0, num_epochs = {self.num_epochs}], got "
                              f"{t.lr_warmup_epochs!r}")
        if not (isinstance(t.lr_min_ratio, (int, float)) and 0 <= t.lr_min_ratio <= 1):
            raise ConfigError(f"train.lr_min_ratio must be in [0, 1] (a fraction of train.lr), got {t.lr_min_ratio!r}")
        _choice("eval.on_hacking", self.eval.on_hacking, ["warn", "stop", "ignore"])
        if self.eval.judge_encoder and not self.eval.judge_references:
            raise ConfigError(f"eval.judge_encoder = {self.eval.judge_encoder!r} needs eval.judge_references "
                              f"(a directory of reference images the judge compares with)")
        text_options = [k for k in ("drop_t5", "offload_text_encoders", "cache_prompt_embeds") if getattr(self.model, k)]
        if text_options and self.model.id in DIGITS_MODELS:
            raise ConfigError(f"model.{text_options[0]} applies to diffusers text-to-image models (SD3 / Flux / SD); "
                              f"the digits model has no text encoders to drop, offload or cache")
        self._validate_estimators()
        self._validate_anchor()
        for key, val, lo in [("sampling.num_steps", s.num_steps, 1), ("sampling.groups_per_epoch", s.groups_per_epoch, 1),
                             ("sampling.batch_size", s.batch_size, 1), ("train.batch_size", t.batch_size, 1),
                             ("train.num_minibatches", t.num_minibatches, 1), ("train.num_inner_epochs", t.num_inner_epochs, 1),
                             ("num_epochs", self.num_epochs, 0), ("lora.rank", self.lora.rank, 1),
                             ("train.ema_every", t.ema_every, 1), ("checkpoint.keep_last", self.checkpoint.keep_last, 1),
                             ("train.dynamic_sampling_max_rounds", t.dynamic_sampling_max_rounds, 1)]:
            if val < lo:
                raise ConfigError(f"{key} must be >= {lo}, got {val}")
        if s.group_size < 2:
            raise ConfigError(f"sampling.group_size must be >= 2 (advantages are relative within a group), got {s.group_size}")
        if s.noise_level < 0 or (s.step_kind == "cps" and s.noise_level > 1):
            raise ConfigError(f"sampling.noise_level must be in [0, 1] for cps and >= 0 otherwise, got {s.noise_level}")
        if not 0 < t.timestep_fraction <= 1:
            raise ConfigError(f"train.timestep_fraction must be in (0, 1], got {t.timestep_fraction}")
        if t.clip_range <= 0 or (t.clip_range_high is not None and t.clip_range_high <= 0):
            raise ConfigError("train.clip_range and train.clip_range_high must be > 0")
        if t.kl_beta < 0:
            raise ConfigError(f"train.kl_beta must be >= 0, got {t.kl_beta}")
        if not 0 <= t.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
        _choice("train.step_weighting", t.step_weighting, ["none", "noise_aware", "inverse_dt", "noise_aware_released",
                                                            "noise_aware_released_flux", "noise_aware_released_qwenimage"])
        self._validate_deterministic_steps()
        self._validate_method()
        self._validate_eval_prompts()
        n = self.samples_per_epoch

        def nearest(key: str, current: int, ok) -> str:
            """'use KEY a or b': the valid values of KEY (ok(v) true) nearest below and above ``current``."""
            below = next((v for v in range(min(current, n), 0, -1) if ok(v)), None)
            above = next((v for v in range(current + 1, 4 * max(n, current) + 1) if ok(v)), None)
            picks = [str(v) for v in (below, above) if v is not None and v != current]
            return f"use {key} {' or '.join(picks)}" if picks else ""

        if n % (world_size * s.batch_size):
            hint = nearest("sampling.batch_size", s.batch_size, lambda b: n % (world_size * b) == 0)
            if not hint:  # no rollout batch fits: the samples per epoch must change
                hint = nearest("sampling.groups_per_epoch", s.groups_per_epoch,
                               lambda g: (g * s.group_size) % (world_size * s.batch_size) == 0)
            raise ConfigError(
                f"samples per epoch (sampling.groups_per_epoch * sampling.group_size = {n}) must be divisible by "
                f"world_size * sampling.batch_size = {world_size} * {s.batch_size}" + (f"; {hint}" if hint else ""))
        per_step = n // t.num_minibatches
        if n % t.num_minibatches or per_step % (world_size * t.batch_size):
            hints = [h for h in (
                nearest("train.batch_size", t.batch_size,
                        lambda b: n % t.num_minibatches == 0 and per_step % (world_size * b) == 0),
                nearest("train.num_minibatches", t.num_minibatches,
                        lambda m: n % m == 0 and (n // m) % (world_size * t.batch_size) == 0)) if h]
            raise ConfigError(
                f"samples per epoch ({n}) must split into train.num_minibatches = {t.num_minibatches} optimizer steps "
                f"whose samples ({n / t.num_minibatches:g}) are divisible by world_size * train.batch_size = "
                f"{world_size} * {t.batch_size}" + (f"; {', or '.join(hints)}" if hints else ""))

    def _validate_anchor(self) -> None:
        d = self.data
        if d.anchor_file is None:
            return
        if not (isinstance(d.anchor_file, str) and d.anchor_file.endswith(".jsonl")):
            raise ConfigError(f"data.anchor_file must be a .jsonl file of records with 'prompt' and 'image', got "
                              f"{d.anchor_file!r}")
        if not (isinstance(d.anchor_coef, (int, float)) and d.anchor_coef > 0):
            raise ConfigError(f"data.anchor_coef must be > 0 (null data.anchor_file: no anchor), got {d.anchor_coef!r}")
        _int_at_least_or_null("data.anchor_batch_size", d.anchor_batch_size)
        if not (isinstance(d.anchor_per_epoch, int) and d.anchor_per_epoch >= 1):
            raise ConfigError(f"data.anchor_per_epoch must be an int >= 1, got {d.anchor_per_epoch!r}")
        if d.anchor_levels not in ("continuous", "schedule"):
            raise ConfigError(f"data.anchor_levels must be 'continuous' or 'schedule', got {d.anchor_levels!r}")
        _int_at_least_or_null("data.anchor_units", d.anchor_units)
        if d.anchor_units is not None and d.anchor_levels != "continuous":
            raise ConfigError(f"data.anchor_units ({d.anchor_units}) needs data.anchor_levels: continuous; with "
                              f"'schedule' every record trains at each trained step (set data.anchor_units: null)")
        if not (isinstance(d.anchor_shift, (int, float)) and not isinstance(d.anchor_shift, bool) and d.anchor_shift > 0):
            raise ConfigError(f"data.anchor_shift must be > 0 (1 = no shift), got {d.anchor_shift!r}")
        if d.anchor_shift != 1 and d.anchor_levels != "continuous":
            raise ConfigError(f"data.anchor_shift ({d.anchor_shift:g}) needs data.anchor_levels: continuous; 'schedule' "
                              f"trains at the sampler's own levels (set data.anchor_shift: 1)")

    def _validate_eval_prompts(self) -> None:
        """A model other than the shipped digits ones ('digits', 'digits_wide' or a directory with the digits ``policy.json``)
        must not evaluate on a ``digits:`` prompt file (the default ``eval_prompts_file``): an SD3 / Flux run
        would silently report scores on digit prompts. Set ``eval_prompts_file`` to the task's prompts (e.g.
        ``prompts:pickscore_eval.txt``, see README "Real models") or null to disable evaluation."""
        import os

        m, f = self.model.id, self.eval_prompts_file
        digits_model = m in DIGITS_MODELS or os.path.isfile(os.path.join(m, "policy.json"))
        if f is not None and f.startswith("digits:") and not digits_model:
            raise ConfigError(
                f"eval_prompts_file = {f!r} is a digits prompt file but model.id = {m!r} is not the digits model "
                f"('digits', 'digits_wide' or a directory holding the digits policy.json; {os.path.join(m, 'policy.json')!r} not found): "
                f"set eval_prompts_file to this task's evaluation prompts (e.g. prompts:pickscore_eval.txt) or to "
                f"null to disable evaluation")


    def method_spec(self) -> "MethodSpec":
        """The :class:`genalign.method_specs.MethodSpec` of ``method`` (``ConfigError`` listing the valid names);
        its ``objective`` names the training objective, its ``plan`` the epoch's sampling and trained steps. The
        method's defaults are applied by :func:`load_config` (a ``Config`` built directly has none of them)."""
        from .method_specs import get_method

        return get_method(self.method)

    def _validate_method(self) -> None:
        """The options and rewards of other methods are refused, then the method's own checks run."""
        from .method_specs import check_method_options

        spec = self.method_spec()
        check_method_options(self, spec)
        spec.validate(self)

    def _validate_estimators(self) -> None:
        """Every registered advantage / surrogate / aggregation name either works in the diffusion trainer or is
        refused here with the reason (names are checked before anything is loaded)."""
        from .advantages import ADVANTAGES
        from .losses import AGGREGATIONS, SURROGATES

        t = self.train
        for key, value, registry, supported, unsupported in (
                ("train.advantage", t.advantage, ADVANTAGES, DIFFUSION_ADVANTAGES, UNSUPPORTED_ADVANTAGES),
                ("train.surrogate", t.surrogate, SURROGATES, DIFFUSION_SURROGATES, UNSUPPORTED_SURROGATES),
                ("train.aggregation", t.aggregation, AGGREGATIONS, list(AGGREGATIONS), {})):
            if value in unsupported:
                raise ConfigError(f"{key} = {value!r} is registered but not usable in the diffusion trainer: "
                                  f"{unsupported[value]}; choose one of {sorted(supported)}")
            if value not in registry or value not in supported:
                _choice(key, value, sorted(supported))
        if t.advantage != "grpo" and t.advantage_std != "group":
            raise ConfigError(f"train.advantage_std = {t.advantage_std!r} applies to train.advantage = 'grpo' only "
                              f"(got train.advantage = {t.advantage!r})")
        if t.advantage_unbiased_std and t.advantage not in ("grpo",):
            raise ConfigError(f"train.advantage_unbiased_std applies to train.advantage = 'grpo' only "
                              f"(got {t.advantage!r})")
        if not t.advantage_clip > 0:
            raise ConfigError(f"train.advantage_clip must be > 0, got {t.advantage_clip}")
        if not 0 <= t.positive_advantage_weight <= 1:
            raise ConfigError(f"train.positive_advantage_weight must be in [0, 1], got {t.positive_advantage_weight}")

    def _validate_deterministic_steps(self) -> None:
        """Refuse to train a step whose transition is deterministic by construction (std 0: no density, so
        no log-ratio, KL or RatioNorm): the CPS step onto sigma' = 0 (std = sigma' sin(a pi / 2) = 0)."""
        s = self.sampling
        if s.step_kind == "cps" and s.noise_level > 0 and (s.num_steps - 1) in self.trainable_steps():
            raise ConfigError(
                f"sampling.step_kind = 'cps' would train its last step (step {s.num_steps - 1}, onto sigma' = 0), "
                f"whose std is 0: it has no density, so no log-ratio or KL. Set sampling.last_step_deterministic=true "
                f"or train.timestep_fraction < 1 (now {self.train.timestep_fraction}) so that the last step is not trained")

    def trainable_steps(self) -> List[int]:
        """Steps a full-SDE rollout trains: the first ``max(1, int(timestep_fraction * n))`` of its n
        stochastic steps (all steps, minus the last when ``sampling.last_step_deterministic``)."""
        s = self.sampling
        n = s.num_steps - int(s.last_step_deterministic)
        return list(range(max(1, int(self.train.timestep_fraction * n)))) if n > 0 and s.noise_level > 0 else []

    def window_spec(self) -> Optional[Dict[str, Any]]:
        """``sampling.window`` with defaults filled in and checked: ``{kind, size, max_start}`` (fast) or
        ``{kind, size, shift_every, stride, schedule}`` (mixgrpo)."""
        w = self.sampling.window
        if w is None:
            return None
        kind = w.get("kind")
        _choice("sampling.window.kind", kind, sorted(WINDOW_DEFAULTS))
        spec = {"kind": kind, **WINDOW_DEFAULTS[kind]}
        for key, value in w.items():
            if key not in spec:
                raise ConfigError(f"unknown key sampling.window.{key} for kind {kind!r}; valid: {sorted(spec)}")
            spec[key] = value
        n = len(self.trainable_steps())
        if not isinstance(spec["size"], int) or not 1 <= spec["size"] <= n:
            raise ConfigError(f"sampling.window.size must be an int in [1, {n}] (trainable steps), got {spec['size']!r}")
        if kind == "fast":
            if spec["max_start"] is None:
                spec["max_start"] = max(0, self.sampling.num_steps // 2 - spec["size"])
            if not isinstance(spec["max_start"], int) or not 0 <= spec["max_start"] <= n - spec["size"]:
                raise ConfigError(f"sampling.window.max_start must be an int in [0, {n - spec['size']}], "
                                  f"got {spec['max_start']!r}")
        else:
            if not isinstance(spec["shift_every"], int) or isinstance(spec["shift_every"], bool) or spec["shift_every"] < 1:
                raise ConfigError(f"sampling.window.shift_every must be an int >= 1, got {spec['shift_every']!r}")
            if not isinstance(spec["stride"], int) or isinstance(spec["stride"], bool) or spec["stride"] < 0:
                raise ConfigError(f"sampling.window.stride must be an int >= 0 (0 = frozen window), got {spec['stride']!r}")
            _choice("sampling.window.schedule", spec["schedule"], ["wrap", "roll_back", "random"])
        return spec

    def branching_spec(self) -> Optional[Dict[str, Any]]:
        """``sampling.branching`` checked: ``{seeds, branches, steps: 'all' | list | int, num_steps}``."""
        b = self.sampling.branching
        if b is None:
            return None
        spec = {"seeds": 1, "branches": 4, "steps": "all", **b}
        unknown = set(spec) - {"seeds", "branches", "steps"}
        if unknown:
            raise ConfigError(f"unknown key(s) sampling.branching.{sorted(unknown)}; valid: seeds, branches, steps")
        for key, lo in (("seeds", 1), ("branches", 2)):
            if not isinstance(spec[key], int) or spec[key] < lo:
                raise ConfigError(f"sampling.branching.{key} must be an int >= {lo}, got {spec[key]!r}")
        trainable, steps = self.trainable_steps(), spec["steps"]
        if steps == "all":
            spec["num_steps"] = len(trainable)
        elif isinstance(steps, list) and steps and all(j in trainable for j in steps) and len(set(steps)) == len(steps):
            spec["num_steps"] = len(steps)
        elif isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= len(trainable):
            spec["num_steps"] = steps
        else:
            raise ConfigError(f"sampling.branching.steps must be 'all', a list of distinct trainable steps "
                              f"{trainable} or an int in [1, {len(trainable)}], got {steps!r}")
        return spec


DIFFUSION_ADVANTAGES = ("grpo", "dr_grpo", "bnpo")
"""Advantage estimators of sequence-level rewards that the diffusion trainer runs (``train.advantage``)."""
UNSUPPORTED_ADVANTAGES = {
    "gdpo": "it normalises each reward component separately and needs per-component rewards [B, K]",
    "hapo": "its token-level group statistics equal grpo's when every sample has the same trained steps "
            "(use grpo)",
    "process": "it is TempFlow-GRPO's per-(prompt, seed, step) estimator, used automatically with "
               "sampling.branching (method=tempflow_grpo)",
}
DIFFUSION_SURROGATES = ("ppo_clip", "cispo", "dppo_mask")
"""Surrogates the diffusion trainer runs (``train.surrogate``)."""
UNSUPPORTED_SURROGATES = {"hapo": "it needs per-token entropy scores, which denoising steps do not have"}

WINDOW_DEFAULTS: Dict[str, Dict[str, Any]] = {"fast": {"size": 2, "max_start": None},
                                              "mixgrpo": {"size": 4, "shift_every": 25, "stride": 1, "schedule": "wrap"}}


# ---------------------------------------------------------------- loading, overrides, documentation

def field_docs(cls) -> Dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal below each field)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[prev.target.id] = str(node.value.value)
    return docs


def describe(cls=None, prefix: str = "") -> List[str]:
    """Lines 'key (type) = default: doc' for every config key, sections included."""
    cls = cls or Config
    docs, lines = field_docs(cls), []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines += describe(hints[f.name], prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{prefix}{f.name} = {default!r}: {docs.get(f.name, '')}")
    return lines


def _type_ok(value: Any, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Union:
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, List):
        (inner,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin in (dict, Dict):
        return isinstance(value, dict)
    return isinstance(value, hint)


def _build(cls, data: Dict[str, Any], prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {names}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        hint_t = hints[key]
        if dataclasses.is_dataclass(hint_t):
            kwargs[key] = _build(hint_t, value if value is not None else {}, f"{prefix}{key}.")
            continue
        if hint_t is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _type_ok(value, hint_t):
            raise ConfigError(f"config key {prefix}{key} must be of type {_type_name(hint_t)}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def parse_overrides(overrides: List[str]) -> Dict[str, Any]:
    """``["train.lr=1e-4", "reward=my.py:fn"]`` -> nested dict (values parsed as YAML scalars)."""
    out: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.load(raw, Loader=_Loader) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and ".py:" in raw:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return out


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) and k not in (
            "reward", "reward_options") else v
    return merged


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides; the method's
    defaults (:attr:`genalign.method_specs.MethodSpec.defaults`) are merged under both."""
    data: Dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as fh:
                data = yaml.load(fh, Loader=_Loader) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must contain a mapping of keys, got {type(data).__name__}")
    data = _merge(data, parse_overrides(overrides or []))
    if isinstance(data.get("train"), dict) and "mode" in data["train"]:
        raise ConfigError("train.mode was replaced by method: dragon (train.mode: grpo is the default method, "
                          "flow_grpo: remove the key)")
    from .method_specs import get_method

    data = _merge(copy.deepcopy(get_method(data.get("method", Config.method)).defaults), data)
    return _build(Config, data)


def to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)
