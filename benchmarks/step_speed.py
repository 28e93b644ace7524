"""Speed, memory traffic and agreement of one Flow-GRPO SDE step: genalign's ``sde.flow_sde_step`` against
Flow-GRPO's reference ``sde_step_with_logprob`` (arXiv 2505.05470) on identical tensors.

    python benchmarks/step_speed.py --flow-grpo /path/to/flow_grpo [--repeats 9] [--calls 10] [--compare-ref REF]

``--flow-grpo`` is a checkout of https://github.com/yifan123/flow_grpo; its
``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`` is imported from there (nothing of it is copied into
this repository). Its step takes a diffusers ``FlowMatchEulerDiscreteScheduler`` as ``self`` (built here with
shift 3.0 and ``set_timesteps(10)``) and the timesteps; genalign's step gets the same sigmas as ``[B]``
tensors, the way ``genalign.rollout`` calls it (per-sample schedule values, ``validate=False``).
``--compare-ref REF`` also times genalign's step as of git revision REF (``git show REF:genalign/sde.py``,
loaded as a separate module), e.g. the version before an optimisation.

Modes, each timed as ``--calls`` consecutive steps per measurement:

* ``sampling``: draw ``prev_sample`` (same seeded generator on both sides) and score it.
* ``scoring``: score a given ``prev_sample`` (the training-time recomputation), no autograd.
* ``scoring_grad``: the same with the velocity requiring grad, forward + ``log_prob.sum().backward()``.

Settings: B=16 latents of 16x64x64, float32, CPU, ``torch.set_num_threads(1)``, interleaved rounds
(A B, B A, ...) after one warm-up; a ratio is the median of per-round ratios on process CPU time (wall time
recorded too). ``speed_ratio = t(flow_grpo) / t(genalign)``: above 1 genalign is faster.

glibc malloc: 4 MiB temporaries are above glibc's initial mmap threshold, so each would be a fresh
``mmap`` (page faults on first touch) until the dynamic threshold adapts, and with a fixed threshold the
freed top of the heap is trimmed back to the kernel (128 KiB default trim threshold) and faulted in again
on the next step. Either way page faults, not the arithmetic, dominate and the ratios swing. The script
therefore runs with ``MALLOC_MMAP_THRESHOLD_=1073741824`` and ``MALLOC_TRIM_THRESHOLD_=1073741824``
(re-executing itself with them if they are missing) and records the minor page faults per step.

Memory traffic per step is counted from the executed ATen ops (a ``TorchDispatchMode`` sees every op the
step runs, after autograd and before the kernel): for each op that computes (views excluded), the
full-size (B x 16 x 64 x 64) tensor arguments it reads and the full-size tensors it writes. The torch
profiler's CPU allocation records (``profile_memory=True``) give the bytes allocated per step.

Writes ``benchmarks/results/step_speed.json``.
"""

from __future__ import annotations

import os
import sys

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
if __name__ == "__main__" and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
    # glibc reads these at start-up only: re-execute with them set (before torch allocates anything)
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], {**os.environ, **MALLOC_ENV})

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from typing import Callable, Dict  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402  (first: it quiets the profiler's log before torch loads)
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOW_GRPO_FILE = os.path.join("flow_grpo", "diffusers_patch", "sd3_sde_with_logprob.py")


def load_module(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_flow_grpo(checkout: str):
    path = os.path.join(checkout, FLOW_GRPO_FILE)
    if not os.path.isfile(path):
        raise SystemExit(f"--flow-grpo: {path} not found (pass a checkout of github.com/yifan123/flow_grpo)")
    return load_module("flow_grpo_sd3_sde_with_logprob", path).sde_step_with_logprob


def load_genalign_ref(ref: str):
    """genalign's ``sde`` module as of git revision ``ref`` (imports only torch, so it loads standalone)."""
    src = subprocess.run(["git", "-C", REPO, "show", f"{ref}:genalign/sde.py"], check=True, capture_output=True,
                         text=True).stdout
    rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", ref], check=True, capture_output=True,
                         text=True).stdout.strip()
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(src)
    try:
        return load_module(f"genalign_sde_{rev}", fh.name), rev
    finally:
        os.unlink(fh.name)


# ---------------------------------------------------------------------- inputs and step closures

def make_inputs(batch: int, channels: int, size: int, steps: int, step_index: int, noise_level: float, seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    shape = (batch, channels, size, size)
    x = torch.randn(shape, generator=g)
    v = torch.randn(shape, generator=g)
    j = torch.full((batch,), step_index)
    return {"sched": sched, "x": x, "v": v, "timesteps": sched.timesteps[j], "sigma": sched.sigmas[j],
            "sigma_next": sched.sigmas[j + 1], "noise_level": torch.full((batch,), noise_level),
            "noise_level_float": noise_level, "seed": seed}


def step_fns(kind: str, fn, inp, mode: str, prev_sample=None) -> Callable:
    """One step of implementation ``kind`` ('flow_grpo' or 'genalign') in ``mode``, returning
    ``(prev_sample, log_prob, mean, std)`` with std the transition std ``[B]``."""
    gen = torch.Generator()
    x, sched = inp["x"], inp["sched"]

    def call(v, prev):
        gen.manual_seed(inp["seed"])
        if kind == "flow_grpo":
            p, lp, mean, std_t = fn(sched, v, inp["timesteps"], x, noise_level=inp["noise_level_float"],
                                    prev_sample=prev, generator=gen)
            dt = (inp["sigma_next"] - inp["sigma"]).view(-1, 1, 1, 1)
            return p, lp, mean, (std_t * torch.sqrt(-dt)).flatten()
        out = fn(v, x, inp["sigma"], inp["sigma_next"], inp["noise_level"], prev_sample=prev, generator=gen,
                 validate=False)
        return out.prev_sample, out.log_prob, out.mean, out.std

    if mode == "sampling":
        return lambda: call(inp["v"], None)
    if mode == "scoring":
        return lambda: call(inp["v"], prev_sample)
    if mode == "scoring_grad":
        def fwd_bwd():
            v = inp["v"].detach().requires_grad_(True)
            res = call(v, prev_sample)
            res[1].sum().backward()
            return res
        return fwd_bwd
    raise ValueError(mode)


def repeat(fn: Callable, n: int) -> Callable:
    def run():
        for _ in range(n):
            fn()
    return run


# ---------------------------------------------------------------------- memory traffic

class TrafficCounter(TorchDispatchMode):
    """Counts, over the ATen ops that compute (views and metadata ops excluded), the full-size tensors read
    (tensor arguments with ``numel == full``; ``out=`` arguments excluded) and written (outputs with
    ``numel == full``, in-place results included)."""

    def __init__(self, full: int):
        super().__init__()
        self.full = full
        self.reads = self.writes = self.full_kernels = self.ops = 0
        self.by_op: Dict[str, list] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rets = func._schema.returns
        if rets and all(r.alias_info is not None and not r.alias_info.is_write for r in rets):
            return out  # a view: no data moved
        flat_in = [a for a in torch.utils._pytree.tree_leaves((args, {k: v for k, v in kwargs.items() if k != "out"}))
                   if isinstance(a, torch.Tensor)]
        flat_out = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        r = sum(t.numel() == self.full for t in flat_in)
        w = sum(t.numel() == self.full for t in flat_out)
        self.ops += 1
        if r or w:
            self.full_kernels += 1
            self.reads += r
            self.writes += w
            rec = self.by_op.setdefault(str(func.overloadpacket.__name__), [0, 0, 0])
            rec[0] += 1
            rec[1] += r
            rec[2] += w
        return out


def traffic(fn: Callable, full: int, itemsize: int) -> Dict[str, object]:
    with TrafficCounter(full) as tc:
        fn()
    res = {"full_size_reads": tc.reads, "full_size_writes": tc.writes,
           "full_size_passes": tc.reads + tc.writes, "full_size_kernels": tc.full_kernels, "aten_ops": tc.ops,
           "bytes_moved": (tc.reads + tc.writes) * full * itemsize,
           "by_op": {k: {"calls": v[0], "reads": v[1], "writes": v[2]} for k, v in sorted(tc.by_op.items())}}
    res.update(allocations(fn))
    return res


def allocations(fn: Callable) -> Dict[str, int]:
    """Bytes and count of CPU allocations of one call and its peak extra memory (profiler allocation records)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = total = count = 0
    for e in events:
        if e.device_type() != torch.autograd.DeviceType.CPU:
            continue
        cur += e.nbytes()
        peak = max(peak, cur)
        if e.nbytes() > 0:
            total += e.nbytes()
            count += 1
    return {"allocated_bytes": int(total), "allocations": count, "peak_extra_bytes": int(peak)}


# ---------------------------------------------------------------------- agreement

def max_diffs(a, b) -> Dict[str, float]:
    names = ("prev_sample", "log_prob", "mean", "std")
    out = {f"{n}_max_abs": float((x.detach().double() - y.detach().double()).abs().max())
           for n, x, y in zip(names, a, b)}
    lp_a, lp_b = a[1].detach().double(), b[1].detach().double()
    out["log_prob_max_rel"] = float(((lp_a - lp_b).abs() / lp_b.abs().clamp_min(1e-30)).max())
    return out


def grad_diff(kind_fns, inp, prev) -> Dict[str, float]:
    grads = {}
    for kind, fn in kind_fns.items():
        v = inp["v"].detach().requires_grad_(True)
        res = step_fns(kind, fn, {**inp, "v": v}, "scoring", prev)()
        res[1].sum().backward()
        grads[kind] = v.grad.double()
    g_a, g_b = grads["genalign"], grads["flow_grpo"]
    return {"grad_v_max_abs": float((g_a - g_b).abs().max()), "grad_v_max_abs_ref": float(g_b.abs().max())}


# ---------------------------------------------------------------------- main

def counting_faults(fn: Callable, faults: Dict[str, int], name: str) -> Callable:
    """``fn`` adding the minor page faults it causes to ``faults[name]``."""
    def run():
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flow-grpo", required=True, help="path to a checkout of github.com/yifan123/flow_grpo")
    ap.add_argument("--repeats", type=int, default=9, help="interleaved timing rounds")
    ap.add_argument("--calls", type=int, default=10, help="steps per timed measurement")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="scheduler set_timesteps")
    ap.add_argument("--step-index", type=int, default=3, help="which step of the schedule all samples take")
    ap.add_argument("--noise-level", type=float, default=0.7)
    ap.add_argument("--compare-ref", default=None, help="also time genalign's sde.py at this git revision")
    ap.add_argument("--modes", nargs="*", default=["sampling", "scoring", "scoring_grad"],
                    choices=["sampling", "scoring", "scoring_grad"])
    ap.add_argument("--out", default="step_speed.json")
    args = ap.parse_args(argv)
    missing = [k for k, v in MALLOC_ENV.items() if os.environ.get(k) != v]
    if missing:
        raise SystemExit(f"run as a script (it re-executes itself) or set {missing}")

    torch.set_num_threads(1)
    from genalign import sde

    impls = {"genalign": sde.flow_sde_step, "flow_grpo": load_flow_grpo(args.flow_grpo)}
    ref_rev = None
    if args.compare_ref:
        ref_mod, ref_rev = load_genalign_ref(args.compare_ref)
        impls[f"genalign@{ref_rev}"] = ref_mod.flow_sde_step
    inp = make_inputs(args.batch, args.channels, args.size, args.steps, args.step_index, args.noise_level, seed=0)
    full = inp["x"].numel()
    itemsize = inp["x"].element_size()
    kind = {name: ("flow_grpo" if name == "flow_grpo" else "genalign") for name in impls}

    # the scored sample: flow_grpo's own draw (so scoring checks genalign on a sample it did not produce)
    prev = step_fns("flow_grpo", impls["flow_grpo"], inp, "sampling")()[0].detach()

    result = {"command": "python benchmarks/step_speed.py --flow-grpo PATH"
                         + (f" --compare-ref {args.compare_ref}" if args.compare_ref else ""),
              "machine": C.machine("cpu"),
              "settings": {"batch": args.batch, "latent_shape": [args.channels, args.size, args.size],
                           "dtype": "float32", "device": "cpu", "torch_threads": torch.get_num_threads(),
                           "scheduler": "FlowMatchEulerDiscreteScheduler(shift=3.0), set_timesteps(%d)" % args.steps,
                           "step_index": args.step_index, "sigma": float(inp["sigma"][0]),
                           "sigma_next": float(inp["sigma_next"][0]), "noise_level": args.noise_level,
                           "repeats": args.repeats, "calls_per_measurement": args.calls,
                           "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
                           "genalign_call": "sde.flow_sde_step(v, x, sigma[B], sigma_next[B], noise_level[B], "
                                            "prev_sample=..., generator=..., validate=False)",
                           "flow_grpo_call": "sde_step_with_logprob(scheduler, v, timesteps[B], x, noise_level=..., "
                                             "prev_sample=..., generator=...)",
                           "timing": "interleaved rounds (A B, B A, ...) after 1 warm-up; ratio = median of "
                                     "per-round ratios; headline clock: process CPU time (single thread); wall "
                                     "also recorded",
                           "compare_ref": ref_rev},
              "torch": torch.__version__}

    # agreement with flow_grpo on identical inputs (same generator seed for the noise)
    agree = {}
    for mode in ("sampling", "scoring"):
        outs = {k: step_fns(kind[k], fn, inp, mode, prev)() for k, fn in impls.items()}
        agree[mode] = {k: max_diffs(outs[k], outs["flow_grpo"]) for k in impls if k != "flow_grpo"}
    agree["scoring_grad"] = grad_diff({"genalign": impls["genalign"], "flow_grpo": impls["flow_grpo"]}, inp, prev)
    result["max_diff_vs_flow_grpo"] = agree
    print("agreement:", agree, flush=True)

    # memory traffic per step
    result["traffic_per_step"] = {mode: {k: traffic(step_fns(kind[k], fn, inp, mode, prev), full, itemsize)
                                         for k, fn in impls.items()} for mode in args.modes}
    result["traffic_per_step"]["full_size_tensor_bytes"] = full * itemsize
    result["traffic_method"] = (
        "ATen ops recorded by a TorchDispatchMode during one step (after autograd, before the kernels; views "
        "excluded): full_size_reads = tensor arguments with B*C*H*W elements, full_size_writes = such outputs "
        "(in-place results included, randn counts as a write); bytes_moved = (reads + writes) * tensor bytes "
        "(an upper bound on DRAM traffic: a kernel reading the same tensor twice counts twice). allocated_bytes / "
        "allocations / peak_extra_bytes: torch profiler CPU allocation records (profile_memory=True) of one step.")
    result["traffic_summary"] = {mode: {k: {"reads": v["full_size_reads"], "writes": v["full_size_writes"],
                                            "full_size_kernels": v["full_size_kernels"],
                                            "MiB_moved": v["bytes_moved"] / 2**20,
                                            "MiB_allocated": v["allocated_bytes"] / 2**20}
                                        for k, v in result["traffic_per_step"][mode].items()}
                                 for mode in args.modes}
    for mode in args.modes:
        t = result["traffic_per_step"][mode]
        print(mode, "traffic (reads, writes, kernels, allocated MiB):",
              {k: (v["full_size_reads"], v["full_size_writes"], v["full_size_kernels"],
                   round(v["allocated_bytes"] / 2**20, 1)) for k, v in t.items()}, flush=True)

    # timing
    clock = C.headline_clock("cpu")
    timing = {}
    for mode in args.modes:
        faults = {k: 0 for k in impls}
        fns = {k: counting_faults(repeat(step_fns(kind[k], fn, inp, mode, prev), args.calls), faults, k)
               for k, fn in impls.items()}
        times = C.interleaved(fns, "cpu", args.repeats, warmup=1, clock="both")
        per_step = {c: {k: [s / args.calls for s in v] for k, v in t.items()} for c, t in times.items()}
        entry = {"seconds_per_step": per_step,
                 "median_ms_per_step": {c: {k: 1e3 * C.median(v) for k, v in t.items()} for c, t in per_step.items()},
                 "minor_page_faults_per_step": {k: n / ((args.repeats + 1) * args.calls) for k, n in faults.items()}}
        for c, t in per_step.items():
            for k in impls:
                if k != "genalign":
                    key = f"speed_ratio_{c}" + ("" if k == "flow_grpo" else f"_vs_{k}")
                    entry[key] = C.paired_ratio(t[k], t["genalign"])
        entry["speed_ratio"] = entry[f"speed_ratio_{clock}"]
        timing[mode] = entry
        print(mode, {k: v for k, v in entry.items() if k != "seconds_per_step"}, flush=True)
    result["timing"] = timing
    result["speed_ratio"] = {mode: timing[mode]["speed_ratio"] for mode in args.modes}
    result["speed_ratio_definition"] = "t(flow_grpo) / t(genalign) per step, median of per-round ratios, CPU clock"
    print("wrote", C.write_json(args.out, result))
    return result


if __name__ == "__main__":
    main()
