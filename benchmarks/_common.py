"""Shared pieces of the benchmark scripts: a tiny-but-not-trivial SD3 model, interleaved timing, peak memory.

Not a test helper: nothing here is imported by the package or the test suite.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, Optional, Sequence

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiet profiler start/stop lines

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))  # repo root: tests.tiny_models

# the benchmark model: SD3Transformer2DModel 4 layers, hidden 4 x 32 = 128, patch 2, 16 latent channels
MODEL = dict(num_layers=4, attention_head_dim=32, num_attention_heads=4, in_channels=16, patch_size=2,
             caption_projection_dim=128, joint_attention_dim=128, pooled_projection_dim=128)
TEXT_LEN = 32  # prompt-embedding tokens
VAE_FACTOR = 8


def setup_threads(device: str) -> None:
    """One intra-op thread on CPU (the build machines are shared: one thread times most stably)."""
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def tiny_sd3_pipeline(latent_size: int = 32, seed: int = 0, num_layers: Optional[int] = None):
    """StableDiffusion3Pipeline without text encoders around the benchmark transformer (latent_size x latent_size)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from tests.tiny_models import tiny_vae

    torch.manual_seed(seed)
    cfg = dict(MODEL, num_layers=num_layers or MODEL["num_layers"])
    transformer = SD3Transformer2DModel(sample_size=latent_size, out_channels=cfg["in_channels"], **cfg)
    vae = tiny_vae(latent_channels=cfg["in_channels"], shift_factor=0.0609, scaling_factor=1.5035)
    return StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)


def random_embeds(batch: int, device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Positive and negative prompt / pooled embeddings of the benchmark model's sizes."""
    g = torch.Generator().manual_seed(seed)
    d, p = MODEL["joint_attention_dim"], MODEL["pooled_projection_dim"]
    out = {"prompt_embeds": torch.randn(batch, TEXT_LEN, d, generator=g),
           "pooled_prompt_embeds": torch.randn(batch, p, generator=g),
           "negative_prompt_embeds": torch.randn(1, TEXT_LEN, d, generator=g).expand(batch, -1, -1).contiguous(),
           "negative_pooled_prompt_embeds": torch.randn(1, p, generator=g).expand(batch, -1).contiguous()}
    return {k: v.to(device) for k, v in out.items()}


def mean_std(values) -> dict:
    """``{"mean", "std" (population), "values"}`` over seeds; None entries (e.g. a target never reached) are left
    out of the mean and std, which are None when no value is known."""
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "std": None, "values": list(values)}
    mean = sum(known) / len(known)
    return {"mean": mean, "std": (sum((v - mean) ** 2 for v in known) / len(known)) ** 0.5, "values": list(values)}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device) -> Dict[str, float]:
    """Wall-clock and process CPU seconds of one call (CUDA work synchronised before and after)."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}


def interleaved(fns: Dict[str, Callable], device, repeats: int, warmup: int = 1, clock: str = "wall"):
    """Time every function ``repeats`` times in rotation (A B B A ..., the order alternating each round so
    neither always runs first) after ``warmup`` untimed rounds; returns the raw seconds per name of ``clock``
    ('wall', 'cpu' (process CPU time) or 'both': ``{"wall": {...}, "cpu": {...}}``)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {c: {n: [] for n in names} for c in ("wall", "cpu")}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            t = timed(fns[n], device)
            for c in ("wall", "cpu"):
                times[c][n].append(t[c])
    return times if clock == "both" else times[clock]


def headline_clock(device) -> str:
    """The clock the ratios are taken on: process CPU time on CPU (single-threaded, so it is the work done and
    does not count time the shared machine gives to other processes), wall time on CUDA."""
    return "cpu" if torch.device(device).type == "cpu" else "wall"


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of the per-round ratios a_i / b_i (rounds are adjacent in time, so load changes cancel)."""
    return median([x / y for x, y in zip(a, b)])


# ---------------------------------------------------------------------- memory

def peak_memory(fn: Callable, device) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the torch profiler's
    allocation records (``profile_memory=True``): every CPU allocation and free of the caching-free CPU
    allocator with its size and time; the peak of their running sum is the peak extra memory of ``fn``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            cur += e.nbytes()
            peak = max(peak, cur)
    return int(peak)


def saved_tensor_bytes(fn: Callable) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs its forward (distinct storages);
    inside gradient-checkpointed blocks the checkpoint's own hooks take over, so those are not counted."""
    seen = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return int(sum(seen.values()))


def machine(device) -> Dict[str, object]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "device": str(device)}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def write_json(name: str, data: Dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    return path
