"""How rollout and training-step time and peak memory scale with group size, sampling steps, trained steps
and resolution (tiny SD3 benchmark model, CFG on, SDE step with log-probs; full fine-tuning).

    OMP_NUM_THREADS=1 python benchmarks/scaling.py [--device cpu|cuda] [--repeats 3]

Writes ``benchmarks/results/scaling.json``: per sweep the points (median seconds, peak extra bytes), a
linear fit ``y = slope * x + intercept`` and the log-log exponent (``numpy.polyfit``), and the check that
the training step's peak memory grows with the number of sampling steps T by no more than the stored
per-step tensors it copies (the micro-batch's latents and means, 2 x B x latent elements x 4 bytes per step).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _common as C  # noqa: E402
import overhead as O  # noqa: E402


ROW_KEYS = {"batch": "batch", "steps": "sampling_steps", "k": "trained_steps", "latent_size": "latent_size"}


def fit(xs, ys):
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    slope, intercept = np.polyfit(xs, ys, 1)
    out = {"slope": float(slope), "intercept": float(intercept)}
    if np.all(xs > 0) and np.all(ys > 0):
        out["loglog_exponent"] = float(np.polyfit(np.log(xs), np.log(ys), 1)[0])
    return out


def measure(device, batch, steps, k, latent_size, repeats, what=("rollout", "train")):
    """Median seconds and peak extra bytes of one rollout and/or one training step (the policy-gradient objective's backwards)."""
    row = {"batch": batch, "sampling_steps": steps, "trained_steps": k, "latent_size": latent_size}
    if "rollout" in what:
        pipe, policy = O.build(device, latent_size)
        ga, _ = O.rollout_fns(pipe, policy, batch, steps)
        times = C.interleaved({"rollout": ga}, device, repeats, clock=C.headline_clock(device))["rollout"]
        row["rollout_s"] = C.median(times)
        row["rollout_peak_bytes"] = C.peak_memory(ga, device)
    if "train" in what:
        pipe, policy = O.build(device, latent_size)
        tr = O.trainer_stub(policy, batch, steps, k)
        ga, _, traj = O.train_fns(tr, batch, steps, k)
        if repeats:
            times = C.interleaved({"train": ga}, device, repeats, clock=C.headline_clock(device))["train"]
            row["train_step_s"] = C.median(times)
        ga()  # gradients allocated once, then set to None inside ga: the peak counts them again every time
        row["train_peak_bytes"] = C.peak_memory(ga, device)
        per_sample = int(np.prod(traj.latents.shape[2:]))
        row["stored_step_tensors_bytes"] = 4 * batch * per_sample * ((steps + 1) + steps)  # latents + means
    print(row, flush=True)
    return row


def sweep(name, key, values, base, device, repeats, what, ys):
    points = [measure(device, **dict(base, **{key: v}), repeats=repeats, what=what) for v in values]
    col = ROW_KEYS[key]
    fits = {y: fit([p[col] for p in points], [p[y] for p in points]) for y in ys if all(y in p for p in points)}
    return {"varied": col, "values": list(values), "fixed": {ROW_KEYS[k]: v for k, v in base.items() if k != key},
            "points": points, "fits": fits}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="scaling.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    C.setup_threads(device.type)
    base = dict(batch=4, steps=10, k=4, latent_size=32)
    r = args.repeats
    result = {"command": "OMP_NUM_THREADS=1 python benchmarks/scaling.py --device " + device.type,
              "machine": C.machine(device), "model": dict(C.MODEL, text_tokens=C.TEXT_LEN),
              "clock": C.headline_clock(device) + " (cpu: process CPU seconds, single thread; wall on CUDA)",
              "notes": "peak bytes: extra memory above the state at the call (see overhead.json for the method); "
                       "train peak includes the gradients (allocated during backward) and the micro-batch copy "
                       "of the trajectory; cfg doubles the model batch"}
    both = ("rollout_s", "rollout_peak_bytes", "train_step_s", "train_peak_bytes")
    result["group_size"] = sweep("group_size", "batch", [2, 4, 8], base, device, r, ("rollout", "train"), both)
    result["sampling_steps"] = sweep("sampling_steps", "steps", [4, 8, 16], dict(base, k=2), device, r,
                                     ("rollout", "train"), both + ("stored_step_tensors_bytes",))
    result["trained_steps"] = sweep("trained_steps", "k", [1, 2, 4, 8], base, device, r, ("train",),
                                    ("train_step_s", "train_peak_bytes"))
    result["resolution"] = sweep("resolution", "latent_size", [16, 24, 32, 48], dict(base, steps=4, k=2), device, r,
                                 ("rollout", "train"), both)
    for p in result["resolution"]["points"]:
        p["pixels"] = (p["latent_size"] * C.VAE_FACTOR) ** 2
        p["image_tokens"] = (p["latent_size"] // C.MODEL["patch_size"]) ** 2

    # training memory vs sampling steps: growth must be explained by the stored tensors it copies
    pts = result["sampling_steps"]["points"]
    mem_slope = result["sampling_steps"]["fits"]["train_peak_bytes"]["slope"]
    stored_slope = result["sampling_steps"]["fits"]["stored_step_tensors_bytes"]["slope"]
    growth = pts[-1]["train_peak_bytes"] - pts[0]["train_peak_bytes"]
    stored_growth = pts[-1]["stored_step_tensors_bytes"] - pts[0]["stored_step_tensors_bytes"]
    result["train_memory_vs_sampling_steps"] = {
        "peak_growth_bytes": growth, "stored_tensors_growth_bytes": stored_growth,
        "peak_slope_bytes_per_step": mem_slope, "stored_slope_bytes_per_step": stored_slope,
        "ok": bool(growth <= 1.25 * stored_growth + 2**20),
        "rule": "peak growth from the smallest to the largest T <= 1.25 x the growth of the stored latents+means "
                "of the micro-batch + 1 MiB"}
    print("train memory vs T:", result["train_memory_vs_sampling_steps"])
    print("wrote", C.write_json(args.out, result))


if __name__ == "__main__":
    main()
