"""The embedded default model: a tiny text-to-digit flow-matching generator on 8x8 pixels.

Design (see ``genalign.pipelines.digits_pretrain`` for how the assets are trained):

* Denoiser: a real diffusers ``SD3Transformer2DModel`` (MMDiT, PeftAdapterMixin) working directly in
  pixel space: ``in_channels=1``, sample 8x8, ``patch_size=4`` (4 image tokens), 3 joint blocks of
  width 64. Patch 4 keeps the token count (4 image + 6 text) small enough that a batch of 512
  (256 prompts with CFG) runs in ~45 ms on 2 CPU cores; the same LoRA targets as SD3 apply.
* Prompt encoder (:class:`PromptEncoder`): word-level, over a small fixed vocabulary stored with the
  weights. Each word gets a token + position embedding and a residual MLP; the sequence goes to the
  transformer's joint attention, a masked mean of it (-> linear) to ``pooled_projections``. Words are
  lower-cased ``[a-z0-9]+`` runs (punctuation is ignored); an unknown word raises ``ValueError``
  listing the vocabulary. The empty prompt (all padding) is the unconditional input for CFG.
* Latents are the pixels scaled to ``[-1, 1]``, shape ``[B, 1, 8, 8]``; :meth:`DigitsPolicy.decode`
  maps them to ``[B, 3, 8, 8]`` in ``[0, 1]``.
* Schedule: ``FlowMatchEulerDiscreteScheduler`` semantics, ``x_s = (1 - s) x0 + s noise``, velocity
  ``noise - x0``, timesteps ``1000 * s``. Sigmas are uniform ``linspace(1, 0, T + 1)`` (shift 1), the
  schedule that worked best for Flow-GRPO on this task (docs/algorithms.md §10.3); a ``shift`` in
  ``policy.json`` applies SD3's ``shift * s / (1 + (shift - 1) s)``.
* Default sampling settings live in ``policy.json`` (``num_steps``, ``guidance_scale``,
  ``noise_level`` = 0 i.e. ODE) and are deliberately weak so alignment has headroom.

Asset directory layout (``genalign pretrain-digits --out DIR`` writes it)::

    DIR/transformer/{config.json, diffusion_pytorch_model.safetensors}
    DIR/prompt_encoder.{json, safetensors}
    DIR/policy.json                      sampling defaults and provenance
    DIR/classifier.{json, safetensors}   reward model (genalign.rewards.digits)
    DIR/prompts_train.txt, DIR/prompts_eval.txt, DIR/metrics.json
"""

from __future__ import annotations

import json
import os
import re
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from genalign.policy import (
    Cond,
    ModelNotAvailableError,
    cfg_combine,
    refuse_conditioning,
    resolve_device,
)

PAD = "<pad>"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEFAULT_NAME = "digits"
from genalign.config import DIGITS_MODELS as SHIPPED_NAMES  # noqa: E402  (one list of the shipped names)
"""The shipped generators (folders of ``genalign.assets``): ``digits`` (patch 4, 3 blocks of width 64; the base of
the method comparisons) and ``digits_wide`` (patch 2, 4 blocks of width 128; the base of the default run, README
"The default run"). Both were pretrained with 40% random captions by ``genalign pretrain-digits``."""
POLICY_CONFIG = "policy.json"
ENCODER_CONFIG = "prompt_encoder.json"
ENCODER_WEIGHTS = "prompt_encoder.safetensors"
TRANSFORMER_DIR = "transformer"
_WORD_RE = re.compile(r"[a-z0-9]+")

# SD3's Flow-GRPO LoRA targets (docs/algorithms.md §3.1); the last block has no ``to_add_out`` (context pre-only).
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


SPLIT_RANDOM_STATE = 0
HELD_OUT_FRACTION = 0.25


def load_split() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_held_out, y_held_out)``; images ``[N, 1, 8, 8]`` in ``[-1, 1]``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_tr, idx_te = train_test_split(torch.arange(len(y)).numpy(), test_size=HELD_OUT_FRACTION,
                                      random_state=SPLIT_RANDOM_STATE, stratify=y.numpy())
    idx_tr, idx_te = torch.as_tensor(idx_tr), torch.as_tensor(idx_te)
    return x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]


def split_words(prompt: str) -> List[str]:
    """Lower-cased word tokens of ``prompt`` (runs of ``[a-z0-9]``; punctuation is dropped)."""
    return _WORD_RE.findall(prompt.lower())


def prompt_digit(prompt: str) -> int:
    """The digit a prompt asks for: its single digit word or numeral ("a handwritten seven" -> 7)."""
    found = {DIGIT_WORDS.index(w) if w in DIGIT_WORDS else int(w)
             for w in split_words(prompt) if w in DIGIT_WORDS or (len(w) == 1 and w.isdigit())}
    if len(found) != 1:
        what = "no digit" if not found else f"several digits {sorted(found)}"
        raise ValueError(f"prompt {prompt!r} names {what}; a digits prompt names exactly one digit 0-9 "
                         f"(as a word like 'seven' or a numeral like '7')")
    return found.pop()


def resolve_digits_dir(path_or_name: Optional[str] = None, required: Sequence[str] = (POLICY_CONFIG,)) -> str:
    """Map ``None`` / a name of :data:`SHIPPED_NAMES` to its installed ``genalign.assets`` folder, else use the path.

    Raises :class:`ModelNotAvailableError` naming the pretraining command when the directory or one of
    the ``required`` files is missing.
    """
    if path_or_name is None or path_or_name in SHIPPED_NAMES:
        from importlib import resources

        path = str(resources.files("genalign.assets").joinpath(path_or_name or DEFAULT_NAME))
    else:
        path = os.path.expanduser(str(path_or_name))
    missing = [f for f in required if not os.path.exists(os.path.join(path, f))]
    if not os.path.isdir(path) or missing:
        what = "does not exist" if not os.path.isdir(path) else f"lacks {', '.join(missing)}"
        raise ModelNotAvailableError(
            f"digits assets directory {path!r} {what}. Create it with `genalign pretrain-digits --out {path}` "
            f"(about 10 minutes on a CPU)."
        )
    return path


def _load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


class PromptEncoder(nn.Module):
    """Word-level prompt encoder: ``[B]`` prompts -> ``(sequence [B, L, D], pooled [B, D])``.

    vocab: the known words (``<pad>`` is added as id 0). max_words: ``L``; longer prompts raise.
    dim: embedding width ``D`` (= the transformer's ``joint_attention_dim`` and ``pooled_projection_dim``).
    """

    def __init__(self, vocab: Sequence[str], max_words: int = 6, dim: int = 32, hidden: int = 128):
        super().__init__()
        words = [w for w in vocab if w != PAD]
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has duplicate words")
        self.vocab = [PAD] + words
        self.word_to_id = {w: i for i, w in enumerate(self.vocab)}
        self.max_words, self.dim, self.hidden = max_words, dim, hidden
        self.token = nn.Embedding(len(self.vocab), dim)
        self.position = nn.Embedding(max_words, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim)
        self.pool = nn.Linear(dim, dim)

    def config(self) -> dict:
        return {"vocab": self.vocab[1:], "max_words": self.max_words, "dim": self.dim, "hidden": self.hidden}

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> word ids ``[B, L]`` (0 = padding). Unknown words or too many words raise ValueError."""
        if isinstance(prompts, str):
            raise TypeError("tokenize expects a list of prompts, got a single string")
        ids = torch.zeros(len(prompts), self.max_words, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            words = split_words(prompt)
            unknown = [w for w in words if w not in self.word_to_id]
            if unknown:
                raise ValueError(
                    f"prompt {prompt!r} has words outside the digits vocabulary: {unknown}. "
                    f"Known words: {' '.join(self.vocab[1:])}"
                )
            if len(words) > self.max_words:
                raise ValueError(f"prompt {prompt!r} has {len(words)} words; the digits encoder takes at most "
                                 f"{self.max_words}")
            ids[i, : len(words)] = torch.tensor([self.word_to_id[w] for w in words], dtype=torch.long)
        return ids

    def forward(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.token(ids) + self.position.weight[: ids.shape[1]]
        h = self.norm(h + self.mlp(h))
        keep = (ids != 0).to(h.dtype).unsqueeze(-1)
        # The empty prompt (all padding) pools over its padding tokens: a learned unconditional vector.
        keep = torch.where(keep.sum(1, keepdim=True) > 0, keep, torch.ones_like(keep))
        pooled = self.pool((h * keep).sum(1) / keep.sum(1))
        return h, pooled

    def encode(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        return self(self.tokenize(prompts).to(self.token.weight.device))


def build_transformer(**overrides):
    """The default pixel-space SD3 transformer (config keys of ``SD3Transformer2DModel``); unless given,
    ``pos_embed_max_size`` is the token grid side ``sample_size // patch_size`` and ``caption_projection_dim`` the
    transformer width ``num_attention_heads * attention_head_dim`` (the joint blocks need them equal)."""
    from diffusers import SD3Transformer2DModel

    cfg = dict(sample_size=8, patch_size=4, in_channels=1, out_channels=1, num_layers=3, attention_head_dim=16,
               num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32)
    cfg.update(overrides)
    cfg.setdefault("pos_embed_max_size", cfg["sample_size"] // cfg["patch_size"])
    cfg.setdefault("caption_projection_dim", cfg["num_attention_heads"] * cfg["attention_head_dim"])
    return SD3Transformer2DModel(**cfg)


class DigitsPolicy:
    """:class:`genalign.policy.Policy` for the embedded digits model (``kind = "flow"``).

    Conditioning keys: ``prompt_embeds [B, L, D]``, ``pooled_prompt_embeds [B, D]`` and, when
    ``guidance_scale != 1``, ``negative_prompt_embeds`` / ``negative_pooled_prompt_embeds`` (the empty
    prompt, repeated per sample). CFG batches ``[negative; positive]`` through one forward.
    """

    kind = "flow"
    lora_target_modules = LORA_TARGET_MODULES

    def __init__(self, transformer, prompt_encoder: PromptEncoder, config: Optional[dict] = None,
                 guidance_scale: Optional[float] = None):
        self.transformer = transformer
        self.prompt_encoder = prompt_encoder
        self.config = dict(config or {})
        default_scale = self.config.get("guidance_scale", 1.0)
        self.guidance_scale = float(guidance_scale if guidance_scale is not None else default_scale)
        self.num_steps = int(self.config.get("num_steps", 10))
        self.noise_level = float(self.config.get("noise_level", 0.0))
        self.shift = float(self.config.get("shift", 1.0))
        tcfg = transformer.config
        self.height = self.width = int(tcfg.sample_size)
        self.channels = int(tcfg.in_channels)
        self.transformer.eval()
        self.prompt_encoder.eval()

    # ---------------------------------------------------------------- loading / saving
    @classmethod
    def handles(cls, path_or_id) -> bool:
        """Whether this adapter loads ``path_or_id``: a name of :data:`SHIPPED_NAMES` or a directory holding
        ``policy.json`` (asked by :func:`genalign.plugins.policy_class`)."""
        return str(path_or_id) in SHIPPED_NAMES or os.path.isfile(os.path.join(str(path_or_id), POLICY_CONFIG))

    @classmethod
    def from_pretrained(cls, path_or_name: Optional[str] = DEFAULT_NAME, device=None, dtype=None,
                        guidance_scale: Optional[float] = None) -> "DigitsPolicy":
        """Load from an asset directory; ``"digits"`` (default) is the copy installed with genalign.

        dtype: the transformer's dtype (default float32; predictions are returned in float32 anyway).
        """
        from diffusers import SD3Transformer2DModel
        from safetensors.torch import load_file

        required = (POLICY_CONFIG, ENCODER_CONFIG, ENCODER_WEIGHTS, TRANSFORMER_DIR)
        path = resolve_digits_dir(path_or_name, required=required)
        dev = resolve_device(device)
        transformer = SD3Transformer2DModel.from_pretrained(os.path.join(path, TRANSFORMER_DIR),
                                                            torch_dtype=dtype or torch.float32)
        encoder = PromptEncoder(**_load_json(os.path.join(path, ENCODER_CONFIG)))
        encoder.load_state_dict(load_file(os.path.join(path, ENCODER_WEIGHTS)))
        transformer.to(dev)
        encoder.to(dev)
        return cls(transformer, encoder, _load_json(os.path.join(path, POLICY_CONFIG)), guidance_scale=guidance_scale)

    def save_pretrained(self, path: str) -> None:
        """Write the transformer, the prompt encoder and ``policy.json`` into ``path``."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        self.transformer.save_pretrained(os.path.join(path, TRANSFORMER_DIR))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.prompt_encoder.state_dict().items()},
                  os.path.join(path, ENCODER_WEIGHTS))
        with open(os.path.join(path, ENCODER_CONFIG), "w") as f:
            json.dump(self.prompt_encoder.config(), f, indent=1)
        with open(os.path.join(path, POLICY_CONFIG), "w") as f:
            json.dump(self.config, f, indent=1)

    def to(self, device) -> "DigitsPolicy":
        self.transformer.to(device)
        self.prompt_encoder.to(device)
        return self

    # ---------------------------------------------------------------- Policy protocol
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale != 1.0

    def denoiser(self) -> nn.Module:
        return self.transformer

    def check_conditioning(self, prompts: List[str], conditioning: Optional[List[Optional[dict]]]) -> List[dict]:
        """Per-prompt ``conditioning`` (negative prompts, condition images) is refused unless empty: the digits
        model learned only its empty negative and has no image input."""
        refuse_conditioning(type(self).__name__, list(prompts), conditioning,
                            "the digits model takes no per-prompt negative prompts or condition images")
        return [{} for _ in prompts]

    @torch.no_grad()
    def encode(self, prompts: List[str], conditioning: Optional[List[Optional[dict]]] = None) -> Cond:
        """Prompt embeddings (and the empty prompt's when CFG is on); see :meth:`check_conditioning`."""
        self.check_conditioning(list(prompts), conditioning)
        seq, pooled = self.prompt_encoder.encode(list(prompts))
        cond = {"prompt_embeds": seq.float(), "pooled_prompt_embeds": pooled.float()}
        if self.uses_cfg:
            neg_seq, neg_pooled = self.prompt_encoder.encode([""])
            cond["negative_prompt_embeds"] = neg_seq.float().expand_as(seq).clone()
            cond["negative_pooled_prompt_embeds"] = neg_pooled.float().expand_as(pooled).clone()
        return cond

    def schedule(self, num_steps: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps [T] = 1000 * sigmas[:-1], sigmas [T+1])``: uniform from 1 to 0, then SD3 shift."""
        steps = self.num_steps if num_steps is None else int(num_steps)
        if steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {steps}")
        sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32, device=self.device)
        if self.shift != 1.0:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        return sigmas[:-1] * 1000.0, sigmas

    def initial_latents(self, batch_size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return torch.randn((batch_size, self.channels, self.height, self.width), generator=generator,
                           device=self.device, dtype=torch.float32)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity ``[B, 1, 8, 8]`` (float32) with CFG ``neg + w (pos - neg)`` batched in one forward."""
        seq, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        t = timesteps.reshape(-1).expand(latents.shape[0]) if timesteps.numel() == 1 else timesteps
        if self.uses_cfg:
            if "negative_prompt_embeds" not in cond:
                raise ValueError(f"guidance_scale is {self.guidance_scale} but the conditioning has no negative "
                                 f"embeddings; encode the prompts with the same guidance_scale")
            latents = torch.cat([latents, latents])
            t = torch.cat([t, t])
            seq = torch.cat([cond["negative_prompt_embeds"], seq])
            pooled = torch.cat([cond["negative_pooled_prompt_embeds"], pooled])
        dtype = self.transformer.dtype
        out = self.transformer(hidden_states=latents.to(dtype), encoder_hidden_states=seq.to(dtype),
                               pooled_projections=pooled.to(dtype), timestep=t, return_dict=False)[0].float()
        return cfg_combine(out, self.guidance_scale) if self.uses_cfg else out

    def independent_judge(self):
        """An evaluation hook ``(images, prompts) -> {eval/fd_independent, eval/diversity_ratio, eval/vendi}``
        measuring realism and diversity in a feature space no reward uses: pixel PCA fitted on the TRAIN split of
        scikit-learn's real digits, Frechet distance to the HELD-OUT split, within-prompt-digit diversity relative
        to the real digits of the same class (:mod:`genalign.judge`)."""
        from genalign.judge import PixelPCA, judge

        x_tr, _, x_te, y_te = load_split()
        pca = PixelPCA.fit((x_tr + 1) / 2)
        real, labels = (x_te + 1) / 2, torch.as_tensor(y_te)

        def hook(images: torch.Tensor, prompts) -> dict:
            digits = torch.tensor([prompt_digit(p) for p in prompts])
            out = judge(images.float().mean(1, keepdim=True), digits, real, labels, pca)
            return {f"eval/{k}": float(v) for k, v in out.items() if k != "diversity"}

        return hook

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in ``[-1, 1]`` -> RGB images ``[B, 3, 8, 8]`` in ``[0, 1]`` (grey, clamped)."""
        return ((latents.float() + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1).contiguous()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`decode`: RGB images ``[B, 3, 8, 8]`` in ``[0, 1]`` -> pixels in ``[-1, 1]``
        (the channel mean)."""
        return (images.float().mean(1, keepdim=True) * 2 - 1).to(self.device)


def load_digits_policy(path_or_name: Optional[str] = DEFAULT_NAME, **kwargs) -> DigitsPolicy:
    """Shortcut for :meth:`DigitsPolicy.from_pretrained`."""
    return DigitsPolicy.from_pretrained(path_or_name, **kwargs)


__all__ = ["DigitsPolicy", "PromptEncoder", "SHIPPED_NAMES", "build_transformer", "resolve_digits_dir",
                              "prompt_digit", "split_words", "DIGIT_WORDS", "LORA_TARGET_MODULES"]
