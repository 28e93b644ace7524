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

from genalign.policy import Cond, cfg_combine, resolve_device, resolve_pretrained

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
        arguments go to the diffusers ``from_pretrained``. ``drop_t5`` (SD3: ``model.drop_t5``) does not load
        the T5 encoder; ``offload_text_encoders`` / ``cache_prompt_embeds``: see the class attributes.
        Raises :class:`genalign.policy.ModelNotAvailableError` with a download hint when offline and uncached.
        """
        if drop_t5:
            for name, value in cls._drop_t5_components().items():
                kw.setdefault(name, value)
        path = resolve_pretrained(model_id_or_path)
        if dtype is not None:
            kw["torch_dtype"] = dtype
        pipe = cls._load_pipeline(path, **kw)
        # the options are set before __init__ runs, so that subclasses whose __init__ does not take them
        # (e.g. DDPMPolicy) still leave the text encoders on the CPU when moving the pipeline to the device
        policy = cls.__new__(cls)
        policy.offload_text_encoders, policy.cache_prompt_embeds = bool(offload_text_encoders), bool(cache_prompt_embeds)
        policy.__init__(pipe, guidance_scale=guidance_scale, device=resolve_device(device), height=height, width=width)
        return policy

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

    @torch.no_grad()
    def encode(self, prompts: List[str]) -> Cond:
        """Encode prompts -> batch-first conditioning (with the empty negative prompt when CFG is on)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        embeds = self._positive_embeds(list(prompts))
        if self.uses_cfg:
            embeds.update(self._negative_embeds())  # batch 1, repeated to the batch by cond_from_embeds
        return self.cond_from_embeds(**embeds)

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
            out = cfg_combine(out, self.cfg_scale)
        return self._postprocess(out, latents, t[:batch])

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

    def decode(self, latents: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
        """Latents ``[B, *latent_shape]`` -> images ``[B, 3, H, W]`` float32 in [0, 1].

        Undoes the VAE ``scaling_factor`` (and ``shift_factor`` when set). Runs with autograd as called:
        wrap in ``torch.no_grad()`` unless gradients through the VAE are wanted. ``batch_size`` (default
        :attr:`decode_batch_size`) decodes in chunks of that many latents (same images, lower peak memory).
        """
        self._check_latents(latents)
        chunk = batch_size or self.decode_batch_size
        if chunk and latents.shape[0] > chunk:
            return torch.cat([self.decode(part, chunk) for part in latents.split(int(chunk))])
        vae = self.pipe.vae
        z = self._vae_latents(latents) / vae.config.scaling_factor
        shift = vae.config.get("shift_factor", None)
        if shift is not None:
            z = z + shift
        image = vae.decode(z.to(self.device, vae.dtype), return_dict=False)[0]
        return (image.to(torch.float32) / 2 + 0.5).clamp(0, 1)

