"""Shared machinery of the diffusers adapters (:mod:`sd3`, :mod:`flux`, :mod:`ddpm`).

:class:`DiffusersPolicy` implements everything of :class:`genalign.policy.Policy` that does not depend
on the model family: loading (``from_pretrained``, pipelines saved without text encoders included),
device / dtype, resolution, LoRA target discovery, conditioning assembly and validation, classifier-free
guidance batching, noise drawing and VAE decoding. Subclasses supply the family-specific pieces
(``_encode``, ``_forward``, ``schedule``, latent shapes).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from genalign.policy import (
    Cond,
    cfg_combine,
    conditioning_rows,
    resolve_device,
    resolve_pretrained,
)

EMBED_KEYS = ("prompt_embeds", "pooled_prompt_embeds")


def existing_module_names(module: torch.nn.Module, candidates: Sequence[str]) -> List[str]:
    """The ``candidates`` (module-name suffixes such as ``"to_q"`` or ``"ff.net.2"``) found in ``module``."""
    names = [n for n, _ in module.named_modules()]
    return [c for c in candidates if any(n == c or n.endswith("." + c) for n in names)]


def _read_index(path: str) -> dict:
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        return {}
    with open(index_file) as f:
        return json.load(f)


def _index_class_name(path: str) -> Optional[str]:
    """Pipeline class name recorded in ``path/model_index.json`` (None if absent)."""
    return _read_index(path).get("_class_name")


def null_components(path: str, pipeline_class) -> Dict[str, None]:
    """``{name: None}`` for components ``pipeline_class`` expects but the saved pipeline at ``path`` lacks.

    ``save_pretrained`` writes ``[null, null]`` for components that were None (e.g. text encoders); diffusers'
    ``from_pretrained`` then refuses to load unless they are passed explicitly as None.
    """
    index = _read_index(path)
    if not index:
        return {}
    expected, _optional = pipeline_class._get_signature_keys(pipeline_class)
    return {name: None for name in expected if index.get(name, [None, None]) == [None, None]}


def flow_schedule(scheduler, num_steps: int, image_seq_len: int, device, sigmas: Optional[np.ndarray] = None,
                  max_shift_default: float = 1.15) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flow-matching schedule from a copy of a ``FlowMatchEulerDiscreteScheduler`` (the pipeline's is untouched).

    Applies the scheduler's static ``shift`` or, with ``use_dynamic_shifting``, the resolution-dependent
    shift ``mu`` that the diffusers pipelines compute from ``image_seq_len`` (tokens per image).
    Returns ``(timesteps [T], sigmas [T+1])`` float32 on ``device`` with ``timesteps = sigmas[:-1] * N_train``
    and ``sigmas[-1] = 0``.
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = type(scheduler).from_config(scheduler.config)
    config = sched.config
    kwargs = {}
    if config.get("use_dynamic_shifting", False):
        kwargs["mu"] = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", max_shift_default),
        )
    if sigmas is not None:
        sched.set_timesteps(sigmas=list(sigmas), device="cpu", **kwargs)
    else:
        sched.set_timesteps(num_steps, device="cpu", **kwargs)
    sig = sched.sigmas.to(torch.float32)
    if sig.shape[0] != num_steps + 1:
        raise ValueError(f"scheduler produced {sig.shape[0]} sigmas for {num_steps} steps")
    timesteps = sig[:-1] * config.num_train_timesteps
    return timesteps.to(device), sig.to(device)


class DiffusersPolicy:
    """Base adapter around a diffusers pipeline (see :class:`genalign.policy.Policy`).

    Subclass attributes: ``kind``, ``default_guidance_scale``, ``default_lora_targets``,
    ``pipeline_class_name`` (diffusers class used by :meth:`from_pretrained`), ``pipeline_classes`` (the
    ``model_index.json`` ``_class_name`` values the adapter loads, read by :func:`genalign.plugins.policy_class`),
    ``denoiser_name`` (``"transformer"`` / ``"unet"``)
    and ``resolution_multiple_extra`` (pixel alignment beyond the VAE factor, e.g. the patch size).
    """

    kind: str = "flow"
    default_guidance_scale: float = 1.0
    default_lora_targets: Tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    pipeline_class_name: str = "DiffusionPipeline"
    pipeline_classes: Tuple[str, ...] = ()
    denoiser_name: str = "transformer"
    resolution_multiple_extra: int = 1

    text_encoder_names: Tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    offload_text_encoders: bool = False
    """Keep the text encoders on the CPU and move them to the policy's device only while encoding (config key
    ``model.offload_text_encoders``): their weights (SD3's T5-XXL: 4.7 B parameters, about 9.5 GB in bf16) do
    not occupy accelerator memory during rollouts and training steps."""
    cache_prompt_embeds: bool = False
    """Encode each distinct prompt string once and reuse its embeddings (config key ``model.cache_prompt_embeds``;
    the text encoders are frozen, so the embeddings never change). Cached rows live on the CPU."""

    def __init__(self, pipe, guidance_scale: Optional[float] = None, device=None, dtype: Optional[torch.dtype] = None,
                 height: Optional[int] = None, width: Optional[int] = None,
                 offload_text_encoders: Optional[bool] = None, cache_prompt_embeds: Optional[bool] = None):
        # None keeps the attribute (the class default, or what from_pretrained set before calling __init__)
        if offload_text_encoders is not None:
            self.offload_text_encoders = bool(offload_text_encoders)
        if cache_prompt_embeds is not None:
            self.cache_prompt_embeds = bool(cache_prompt_embeds)
        if device is not None or dtype is not None:
            target = None if device is None else torch.device(device)
            if self.offload_text_encoders:  # everything but the text encoders to the device (they stay on the CPU)
                for name, module in pipe.components.items():
                    if isinstance(module, torch.nn.Module):
                        keep_cpu = name in self.text_encoder_names
                        module.to(device=torch.device("cpu") if keep_cpu else target, dtype=dtype)
            else:
                pipe.to(device=target, dtype=dtype)
        elif self.offload_text_encoders:
            for module in self._text_encoders(pipe):
                module.to("cpu")
        self.pipe = pipe
        self.guidance_scale = float(self.default_guidance_scale if guidance_scale is None else guidance_scale)
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        default_res = self._default_resolution()
        self.height = int(height or default_res)
        self.width = int(width or default_res)
        multiple = self.vae_scale_factor * self.resolution_multiple_extra
        if self.height % multiple or self.width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {self.height}x{self.width}")
        self.lora_target_modules = existing_module_names(self.denoiser(), self.default_lora_targets)

    # ---------------------------------------------------------------- loading
    @classmethod
    def _load_pipeline(cls, path: str, **kw):
        """Load the diffusers class named ``pipeline_class_name`` (``DiffusionPipeline``: the class recorded in
        ``model_index.json``) from ``path``, passing None for components saved as null."""
        import diffusers

        pipeline_class = getattr(diffusers, cls.pipeline_class_name)
        index_class = _index_class_name(path)
        null_class = getattr(diffusers, index_class) if pipeline_class is diffusers.DiffusionPipeline and index_class \
            else pipeline_class
        for name, value in null_components(path, null_class).items():
            kw.setdefault(name, value)
        return pipeline_class.from_pretrained(path, **kw)

    @classmethod
    def _drop_t5_components(cls) -> Dict[str, None]:
        """``from_pretrained`` components to skip for ``drop_t5`` (SD3 overrides it; others have no T5 to drop)."""
        raise ValueError(f"model.drop_t5: {cls.__name__} has no optional T5 encoder to drop (SD3 / SD3.5 only)")

    @classmethod
    def from_pretrained(cls, model_id_or_path: str, device=None, dtype: Optional[torch.dtype] = None,
                        guidance_scale: Optional[float] = None, height: Optional[int] = None,
                        width: Optional[int] = None, drop_t5: bool = False, offload_text_encoders: bool = False,
                        cache_prompt_embeds: bool = False, **kw):
        """Load a hub id (cache only when ``HF_HUB_OFFLINE=1``) or a ``save_pretrained`` directory.

        ``device`` defaults to CUDA when available; ``dtype`` is passed as ``torch_dtype``; other keyword
        arguments go to the adapter's constructor when it takes them (Flux's ``true_cfg_scale``, Wan's
        ``num_frames``, Kontext's ``condition_size``, ...), else to the diffusers ``from_pretrained``. ``drop_t5``
        (SD3: ``model.drop_t5``) does not load the T5 encoder; ``offload_text_encoders`` / ``cache_prompt_embeds``:
        see the class attributes. Raises :class:`genalign.policy.ModelNotAvailableError` with a download hint when
        offline and uncached. ``condition_size`` (``model.condition_size``) is refused by adapters that take no
        condition images (diffusers would drop it silently).
        """
        if drop_t5:
            for name, value in cls._drop_t5_components().items():
                kw.setdefault(name, value)
        own = cls._init_options()
        adapter_kw = {k: kw.pop(k) for k in list(kw) if k in own}
        if kw.get("condition_size") is not None:
            raise ValueError(f"model.condition_size = {kw['condition_size']!r}: {cls.__name__} takes no condition "
                             f"images (the option is for image-conditioned adapters such as flux_kontext)")
        path = resolve_pretrained(model_id_or_path)
        if dtype is not None:
            kw["torch_dtype"] = dtype
        pipe = cls._load_pipeline(path, **kw)
        # the options are set before __init__ runs, so that subclasses whose __init__ does not take them
        # (e.g. DDPMPolicy) still leave the text encoders on the CPU when moving the pipeline to the device
        policy = cls.__new__(cls)
        policy.offload_text_encoders, policy.cache_prompt_embeds = bool(offload_text_encoders), bool(cache_prompt_embeds)
        policy.__init__(pipe, guidance_scale=guidance_scale, device=resolve_device(device), height=height, width=width,
                        **adapter_kw)
        return policy

    @classmethod
    def _init_options(cls) -> Tuple[str, ...]:
        """Keyword options of the adapter's constructor beyond the ones every adapter takes."""
        import inspect

        common = {"self", "pipe", "guidance_scale", "device", "dtype", "height", "width", "offload_text_encoders",
                  "cache_prompt_embeds"}
        params = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in params if p.name not in common and p.kind in (p.KEYWORD_ONLY,
                                                                                  p.POSITIONAL_OR_KEYWORD))

    @contextlib.contextmanager
    def resolution(self, height: Optional[int] = None, width: Optional[int] = None) -> Iterator[None]:
        """Sample at ``height x width`` pixels for the duration (None keeps the current value; evaluation at another
        resolution than training, ``eval.height`` / ``eval.width``); checked like the constructor's sizes."""
        old = (self.height, self.width)
        new = (int(height or self.height), int(width or self.width))
        multiple = self.vae_scale_factor * self.resolution_multiple_extra
        if new[0] % multiple or new[1] % multiple:
            raise ValueError(f"eval.height and eval.width must be multiples of {multiple} for {type(self).__name__}, "
                             f"got {new[0]}x{new[1]}")
        self.height, self.width = new
        try:
            yield
        finally:
            self.height, self.width = old

    # ---------------------------------------------------------------- basic properties
    def denoiser(self) -> torch.nn.Module:
        """The trained network (``pipe.transformer`` or ``pipe.unet``)."""
        return getattr(self.pipe, self.denoiser_name)

    @property
    def device(self) -> torch.device:
        return self.denoiser().device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the denoiser."""
        return self.denoiser().dtype

    def _default_resolution(self) -> int:
        size = getattr(self.pipe, "default_sample_size", None) or self.denoiser().config.sample_size
        return int(size) * self.vae_scale_factor

    @property
    def latent_size(self) -> Tuple[int, int]:
        """Unpacked latent ``(h, w)`` = pixel size / VAE factor."""
        return self.height // self.vae_scale_factor, self.width // self.vae_scale_factor

    @property
    def latent_shape(self) -> Tuple[int, ...]:
        """Shape of one sample's latents as seen by the rollout, without the batch: ``(C, H/f, W/f)`` with
        the VAE factor f (8 for SD/SDXL/SD3); packed adapters override it."""
        h, w = self.latent_size
        return (int(self.denoiser().config.in_channels), h, w)

    # ---------------------------------------------------------------- conditioning
    cond_keys: Tuple[str, ...] = EMBED_KEYS
    accepts_condition_images: bool = False
    """Whether :meth:`encode` takes per-prompt condition images (``conditioning[i]["images"]``, a prompt set's
    ``image`` field): image-conditioned adapters (FLUX.1 Kontext) set it; the others refuse condition images."""
    max_condition_images: int = 0
    """Condition images one prompt may have (when :attr:`accepts_condition_images`)."""
    cfg_scale_name: str = "guidance_scale"
    """The option that sets :attr:`cfg_scale` (named in errors)."""

    @property
    def cfg_scale(self) -> float:
        """Scale of true classifier-free guidance (negative + positive batch); <= 1 disables it."""
        return self.guidance_scale

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale > 1

    def required_cond_keys(self) -> List[str]:
        keys = list(self.cond_keys)
        return keys + ["negative_" + k for k in keys] if self.uses_cfg else keys

    def cond_from_embeds(self, prompt_embeds: torch.Tensor, pooled_prompt_embeds: Optional[torch.Tensor] = None,
                         negative_prompt_embeds: Optional[torch.Tensor] = None,
                         negative_pooled_prompt_embeds: Optional[torch.Tensor] = None) -> Cond:
        """Conditioning dict from given embeddings (for pipelines without text encoders).

        prompt_embeds ``[B, L, D]``; pooled ``[B, P]`` (SD3, Flux, SDXL). With CFG the negative embeddings
        are required; a negative of batch 1 is repeated to B. Tensors keep their dtype (``predict`` casts).
        """
        given = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds,
                 "negative_prompt_embeds": negative_prompt_embeds,
                 "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds}
        keys = self.required_cond_keys()
        missing = [k for k in keys if given[k] is None]
        if missing:
            why = f" (CFG is on: guidance {self.cfg_scale} > 1)" if any(k.startswith("negative_") for k in missing) else ""
            raise ValueError(f"{type(self).__name__} conditioning needs {missing}{why}")
        batch = prompt_embeds.shape[0]
        cond = {}
        for k in keys:
            v = given[k]
            if v.shape[0] == 1 and batch > 1 and k.startswith("negative_"):
                v = v.expand(batch, *v.shape[1:])
            if v.shape[0] != batch:
                raise ValueError(f"{k} has batch {v.shape[0]}, prompt_embeds has {batch}")
            cond[k] = v.to(self.device).contiguous()
        return cond

    def _require_text_encoders(self, *names: str) -> None:
        missing = [n for n in names if getattr(self.pipe, n, None) is None]
        if missing:
            raise ValueError(
                f"{type(self.pipe).__name__} has no {', '.join(missing)}; build the conditioning from embeddings "
                f"with {type(self).__name__}.cond_from_embeds(...) instead of encode()"
            )

    def _encode(self, prompts: List[str], negative: bool = True) -> Dict[str, Optional[torch.Tensor]]:
        """Keyword arguments of :meth:`cond_from_embeds` for ``prompts`` (runs under no_grad); the
        ``negative_*`` ones (the pipeline's negative for the empty prompt) only when CFG is on and ``negative``."""
        raise NotImplementedError

    _negative_cache: Optional[Dict[str, torch.Tensor]] = None

    @classmethod
    def _text_encoders(cls, pipe) -> List[torch.nn.Module]:
        return [m for m in (getattr(pipe, n, None) for n in cls.text_encoder_names) if isinstance(m, torch.nn.Module)]

    @contextlib.contextmanager
    def _text_encoders_on_device(self) -> Iterator[None]:
        """With :attr:`offload_text_encoders`, the text encoders on the policy's device for the duration and back
        on the CPU afterwards (freeing their accelerator memory); otherwise nothing happens."""
        encoders = self._text_encoders(self.pipe) if self.offload_text_encoders else []
        for module in encoders:
            module.to(self.device)
        try:
            yield
        finally:
            for module in encoders:
                module.to("cpu")
            if encoders and self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _negative_embeds(self) -> Dict[str, torch.Tensor]:
        """``negative_*`` embeddings of batch 1, encoded once: the negative (empty) prompt and the frozen text
        encoders never change, so re-encoding it for every batch would only repeat work."""
        if self._negative_cache is None:
            with self._text_encoders_on_device():
                out = self._encode([""], negative=True)
            self._negative_cache = {k: v for k, v in out.items() if k.startswith("negative_") and v is not None}
        return self._negative_cache

    def _positive_embeds(self, prompts: List[str]) -> Dict[str, torch.Tensor]:
        """The non-negative embeddings of ``prompts`` (batch-first). With :attr:`cache_prompt_embeds`, each
        distinct prompt string is encoded once (its row of the batch it was first encoded in, kept on the CPU)
        and later batches are assembled from the cached rows: training prompts repeat every epoch, and the
        rollout and every training step of a sample use the conditioning of that one encoding."""
        if not self.cache_prompt_embeds:
            with self._text_encoders_on_device():
                out = self._encode(prompts, negative=False)
            return {k: v for k, v in out.items() if v is not None and not k.startswith("negative_")}
        cache: Dict[str, Dict[str, torch.Tensor]] = self.__dict__.setdefault("_prompt_cache", {})
        missing = list(dict.fromkeys(p for p in prompts if p not in cache))
        if missing:
            with self._text_encoders_on_device():
                out = self._encode(missing, negative=False)
            keys = [k for k, v in out.items() if v is not None and not k.startswith("negative_")]
            for i, prompt in enumerate(missing):
                cache[prompt] = {k: out[k][i:i + 1].detach().to("cpu") for k in keys}
        return {k: torch.cat([cache[p][k] for p in prompts]).to(self.device) for k in cache[prompts[0]]}

    def check_conditioning(self, prompts: List[str], conditioning: Optional[List[Optional[dict]]]) -> List[dict]:
        """Per-prompt conditioning (see :meth:`encode`) checked for this adapter: one dict per prompt (``{}`` =
        nothing). A ``negative_prompt`` needs CFG on (else it would be silently ignored); condition images need
        :attr:`accepts_condition_images` and at most :attr:`max_condition_images` per prompt. Errors name the
        adapter and the prompt index."""
        name = type(self).__name__
        rows = conditioning_rows(prompts, conditioning, name)
        for i, row in enumerate(rows):
            where = f"prompt {i} ({prompts[i]!r})"
            if row.get("negative_prompt") and not self.uses_cfg:
                raise ValueError(f"{name}: {where} has negative_prompt {row['negative_prompt']!r}, but classifier-free "
                                 f"guidance is off ({self.cfg_scale_name} = {self.cfg_scale:g} <= 1), so the negative "
                                 f"prompt would be ignored; set {self.cfg_scale_name} > 1 or remove it")
            images = row.get("images") or []
            if images and not self.accepts_condition_images:
                raise ValueError(f"{name} does not take condition images, but {where} has {len(images)} "
                                 f"({images[0]!r}); use an image-conditioned adapter (e.g. flux_kontext: FLUX.1 "
                                 f"Kontext) or remove the image from the prompt set")
            if len(images) > self.max_condition_images:
                raise ValueError(f"{name} takes at most {self.max_condition_images} condition image(s) per prompt, "
                                 f"but {where} has {len(images)}")
        return rows

    def _negative_prompt_embeds(self, embeds: Dict[str, torch.Tensor], rows: List[dict],
                                batch: int) -> Dict[str, torch.Tensor]:
        """``embeds`` with the ``negative_*`` rows of prompts that have a ``negative_prompt`` replaced by that
        text's embeddings, encoded like the prompts themselves (:meth:`_positive_embeds`, the same ``_encode``
        path and cache); the other rows keep the cached empty-prompt negative (repeated to ``batch``)."""
        negatives = {i: row["negative_prompt"] for i, row in enumerate(rows) if row.get("negative_prompt")}
        if not negatives:
            return embeds
        texts = list(dict.fromkeys(negatives.values()))
        encoded = self._positive_embeds(texts)
        out = dict(embeds)
        for key, value in embeds.items():
            if not key.startswith("negative_"):
                continue
            source = encoded.get(key[len("negative_"):])
            if source is None:
                raise ValueError(f"{type(self).__name__}: encoding the negative prompts gave no {key[9:]!r}")
            full = value.to(self.device).expand(batch, *value.shape[1:]).clone()
            if tuple(source.shape[1:]) != tuple(full.shape[1:]):
                raise ValueError(f"{type(self).__name__}: {key} of the negative prompts has shape "
                                 f"{tuple(source.shape)}, the default negative {tuple(value.shape)}")
            rows_index = torch.tensor(list(negatives), device=self.device)
            picks = torch.tensor([texts.index(t) for t in negatives.values()], device=source.device)
            full[rows_index] = source[picks].to(full.device, full.dtype)
            out[key] = full
        return out

    def _condition_image_cond(self, prompts: List[str], rows: List[dict]) -> Cond:
        """Conditioning tensors of the prompts' condition images (image-conditioned adapters override it)."""
        return {}

    @torch.no_grad()
    def encode(self, prompts: List[str], conditioning: Optional[List[Optional[dict]]] = None) -> Cond:
        """Encode prompts -> batch-first conditioning (with the empty negative prompt when CFG is on).

        conditioning: None or one dict per prompt (a prompt record's ``"conditioning"``, see
        :func:`genalign.prompts.read_prompt_records`): ``negative_prompt`` replaces the empty negative of that
        row (CFG must be on); ``images`` are condition images (only adapters with
        :attr:`accepts_condition_images`). Checked by :meth:`check_conditioning`."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        rows = self.check_conditioning(prompts, conditioning)
        embeds = self._positive_embeds(prompts)
        if self.uses_cfg:
            embeds.update(self._negative_embeds())  # batch 1, repeated to the batch by cond_from_embeds
            embeds = self._negative_prompt_embeds(embeds, rows, len(prompts))
        cond = self.cond_from_embeds(**embeds)
        cond.update(self._condition_image_cond(prompts, rows))
        return cond

    # ---------------------------------------------------------------- noise / forward
    def initial_latents(self, batch_size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Standard normal float32 latents ``[B, *latent_shape]`` on the policy's device."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor((batch_size, *self.latent_shape), generator=generator, device=self.device,
                            dtype=torch.float32)

    def _check_latents(self, latents: torch.Tensor) -> None:
        expected = tuple(self.latent_shape)
        if latents.ndim != len(expected) + 1 or tuple(latents.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects latents of shape [B, {', '.join(map(str, expected))}] "
                f"(for {self.height}x{self.width} px), got {tuple(latents.shape)}"
            )

    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw denoiser output for model-dtype latents ``x [N, ...]``, timesteps ``t [N]`` and embeddings
        (``cond_keys`` -> model-dtype tensors of batch N)."""
        raise NotImplementedError

    def _postprocess(self, output: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Hook to convert the guided float32 output (e.g. v-prediction -> epsilon); identity by default."""
        return output

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """THE forward of rollout and training: denoiser output with CFG, float32, shape of ``latents``.

        latents ``[B, *latent_shape]``; timesteps ``[B]`` (or a scalar) as returned by :meth:`schedule`;
        cond from :meth:`encode` / :meth:`cond_from_embeds` with batch B. With CFG, one batch
        ``[negative; positive]`` of size 2B is run and combined by :func:`genalign.policy.cfg_combine`.
        """
        self._check_latents(latents)
        batch = latents.shape[0]
        t = torch.as_tensor(timesteps, device=latents.device, dtype=torch.float32)
        t = t.expand(batch) if t.ndim == 0 else t
        if t.shape != (batch,):
            raise ValueError(f"timesteps must have shape [{batch}], got {tuple(t.shape)}")
        missing = [k for k in self.required_cond_keys() if k not in cond]
        if missing:
            raise ValueError(f"conditioning lacks {missing} (has {sorted(cond)})")
        for k in self.required_cond_keys():
            if cond[k].shape[0] != batch:
                raise ValueError(f"conditioning {k!r} has batch {cond[k].shape[0]}, latents have {batch}")
        dtype = self.dtype
        x = latents.to(dtype)
        if self.uses_cfg:
            x, t = torch.cat([x, x]), torch.cat([t, t])
        out = self._forward(x, t, self._model_embeds(cond, dtype)).to(torch.float32)
        if self.uses_cfg:
            out = self._guide(out, t[:batch])
        return self._postprocess(out, latents, t[:batch])

    def _guide(self, output: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance: the float32 ``[negative; positive]`` output ``[2B, ...]`` -> ``[B, ...]``
        (:func:`genalign.policy.cfg_combine` at :attr:`cfg_scale`; adapters whose pipelines guide differently
        override it). ``timesteps [B]``: the model timesteps of the batch."""
        return cfg_combine(output, self.cfg_scale)

    _embeds_cache: Optional[tuple] = None  # (key, embeddings, sources)

    def _model_embeds(self, cond: Cond, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        """``cond_keys`` -> model-dtype tensors on the device; with CFG the batch ``[negative; positive]``.

        The CFG concatenation is cached for the last conditioning seen (same tensor objects, unchanged
        in place, not requiring grad): a rollout calls :meth:`predict` T times and a training step k times
        with the same conditioning, so it is built once instead of once per step. The cache holds one
        entry (the concatenated embeddings and references to their sources).
        """
        if not self.uses_cfg:
            return {k: cond[k].to(self.device, dtype) for k in self.cond_keys}
        sources = [cond[p + k] for k in self.cond_keys for p in ("negative_", "")]
        cacheable = not any(v.requires_grad or v.is_inference() for v in sources)
        key = (dtype, self.device, tuple((id(v), v._version) for v in sources)) if cacheable else None
        cached = self._embeds_cache
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        embeds = {k: torch.cat([cond["negative_" + k].to(self.device, dtype), cond[k].to(self.device, dtype)])
                  for k in self.cond_keys}
        # keep the sources alive with the entry so their ids cannot be reused by other tensors
        self._embeds_cache = (key, embeds, sources) if key is not None else None
        return embeds

    # ---------------------------------------------------------------- attention backends
    def enable_xformers(self) -> bool:
        """Use xformers memory-efficient attention in the denoiser when xformers is installed and the policy
        runs on CUDA (xformers refuses CPU tensors); returns whether it was enabled. PyTorch SDPA (the
        diffusers default processors) is used otherwise; xformers is imported only here, never at load."""
        import importlib.util

        if self.device.type != "cuda" or importlib.util.find_spec("xformers") is None:
            return False
        self.denoiser().enable_xformers_memory_efficient_attention()
        return True

    # ---------------------------------------------------------------- decoding
    decode_batch_size: Optional[int] = None
    """Decode at most this many latents per VAE call (None: the whole batch at once); bounds the VAE's
    activation memory at large rollout batches."""

    def _vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Rollout latents -> unpacked VAE-space latents ``[B, C, h, w]`` (identity unless packed)."""
        return latents

    def _from_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_vae_latents`: VAE-space latents ``[B, C, h, w]`` -> rollout latents."""
        return latents

    def _vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> the mode of the VAE's latent distribution, float32 (adapters whose
        VAE normalises per channel override it)."""
        vae = self.pipe.vae
        return vae.encode((images * 2 - 1).to(self.device, vae.dtype)).latent_dist.mode().float()

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Rollout latents -> the VAE decoder's output in [-1, 1] (``[B, 3, H, W]``; videos ``[B, F, 3, H, W]``):
        unpacked (:meth:`_vae_latents`), the VAE's ``scaling_factor`` (and ``shift_factor``) undone when it has them.
        Adapters whose VAE normalises per channel override it."""
        vae = self.pipe.vae
        z = self._vae_latents(latents.to(self.device))
        scale, shift = vae.config.get("scaling_factor", None), vae.config.get("shift_factor", None)
        if scale is not None:
            z = z / scale
        if shift is not None:
            z = z + shift
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] at the policy's resolution -> latents ``[B, *latent_shape]`` float32:
        :meth:`_vae_encode`, then shifted and scaled as :meth:`decode` undoes and packed (data-set training,
        :mod:`genalign.datasets`)."""
        if tuple(images.shape[1:]) != (3, self.height, self.width):
            raise ValueError(f"{type(self).__name__}.encode_images expects [B, 3, {self.height}, {self.width}] images, "
                             f"got {tuple(images.shape)}")
        z = self._vae_encode(images)
        vae = self.pipe.vae
        shift, scale = vae.config.get("shift_factor", None), vae.config.get("scaling_factor", None)
        if shift is not None:
            z = z - shift
        if scale is not None:
            z = z * scale
        return self._from_vae_latents(z)

    def decode(self, latents: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
        """Latents ``[B, *latent_shape]`` -> images ``[B, 3, H, W]`` (videos ``[B, F, 3, H, W]``) float32 in [0, 1]:
        :meth:`_vae_decode` mapped from [-1, 1].

        Runs with autograd as called: wrap in ``torch.no_grad()`` unless gradients through the VAE are wanted.
        ``batch_size`` (default :attr:`decode_batch_size`) decodes in chunks of that many latents (same images,
        lower peak memory).
        """
        self._check_latents(latents)
        chunk = batch_size or self.decode_batch_size
        if chunk and latents.shape[0] > chunk:
            return torch.cat([self.decode(part, chunk) for part in latents.split(int(chunk))])
        return (self._vae_decode(latents).to(torch.float32) / 2 + 0.5).clamp(0, 1)


def latent_channel_stats(vae, device, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """A video-style VAE's per-channel ``latents_mean`` and ``1 / latents_std`` (config lists of ``z_dim`` values),
    shaped ``[1, C, 1, 1, 1]`` (Qwen-Image's and Wan's normalisation of the latents)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(device, dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(device, dtype)
    return mean, inv_std

class PackedLatents:
    """Mixin of the adapters whose rollout latents are packed 2x2 patches ``[B, (h/2)*(w/2), 4C]`` (FLUX.1,
    Qwen-Image) and whose classifier-free guidance is the optional true CFG ``true_cfg_scale``: noise is drawn
    unpacked ``[B, C, h, w]`` as the pipelines draw it, then packed. Subclasses set ``pack`` / ``unpack``
    (static functions ``latents -> packed`` and ``(packed, h, w) -> latents``)."""

    pack = None
    unpack = None

    @property
    def cfg_scale(self) -> float:
        return self.true_cfg_scale

    @property
    def latent_channels(self) -> int:
        """VAE latent channels: the transformer's packed input channels / 4."""
        return int(self.denoiser().config.in_channels) // 4

    @property
    def latent_shape(self) -> Tuple[int, int]:
        """Packed ``((h/2)*(w/2), 4C)``."""
        h, w = self.latent_size
        return ((h // 2) * (w // 2), 4 * self.latent_channels)

    def initial_latents(self, batch_size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Noise drawn unpacked ``[B, C, h, w]`` (as the pipeline does) and packed -> ``[B, N, 4C]`` float32."""
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor((batch_size, self.latent_channels, *self.latent_size), generator=generator,
                             device=self.device, dtype=torch.float32)
        return type(self).pack(noise)

    def _vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return type(self).unpack(latents, *self.latent_size)

    def _from_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return type(self).pack(latents)
