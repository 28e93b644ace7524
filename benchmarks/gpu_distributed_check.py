"""Distributed check for a GPU machine: DDP, FSDP and DeepSpeed ZeRO-2 through genalign's one optimizer step.

For each accelerate config (configs/accelerate/ddp.yaml, fsdp.yaml, deepspeed_zero2.yaml) the script launches
``tests/dist_worker.py`` (one epoch's sampling, advantages and ONE optimizer step of the real Trainer on a tiny
SD3 pipeline) with ``--num_processes P`` (P = number of visible GPUs, at most 2), and a one-process reference that
simulates P processes (``--simulate-world P``: the same global batch). It records whether the launch succeeded,
the wall time, and the largest differences of the global loss, the gradient norm and the weights after the step
between the two (they agree to float32 round-off when the distributed path is exact). With one GPU every config
runs with one process (the wrapper, the routing of the denoiser's forward through it and the checkpoint hooks
are still exercised; the gradient synchronisation is not).

    python benchmarks/gpu_distributed_check.py [--configs ddp fsdp deepspeed_zero2] [--out benchmarks/results/gpu_distributed.json]

Needs CUDA (and ``pip install deepspeed`` for the DeepSpeed config; it is reported as skipped otherwise). CPU
machines cannot run it: accelerate refuses FSDP without an accelerator, and DeepSpeed needs CUDA.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(model_dir: str, out_dir: str, prompts: str):
    items = {"model.id": model_dir, "output_dir": out_dir, "num_epochs": 1, "seed": 0, "sampling.num_steps": 3,
             "sampling.groups_per_epoch": 2, "sampling.group_size": 4, "sampling.batch_size": 2,
             "train.batch_size": 2, "train.num_minibatches": 1, "train.clip_range": 0.2, "train.lr": "1e-3",
             "lora.rank": 4, "lora.alpha": 4.0, "prompts_file": prompts, "eval_prompts_file": "null",
             "reward": f"{WORKER}:brightness", "model.guidance_scale": 2.0, "train.ema": "false"}
    return [f"{k}={v}" for k, v in items.items()]


def _compare(a_path: str, b_path: str) -> dict:
    from safetensors.torch import load_file

    a, b = load_file(a_path), load_file(b_path)
    diff = {}
    for key in ("loss", "grad_norm"):
        diff[key] = float((a[key] - b[key]).abs().max())
    weights = [k for k in a if k.startswith("w1.")]
    diff["weights_max_abs"] = max(float((a[k] - b[k]).abs().max()) for k in weights) if weights else None
    return diff


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["ddp", "fsdp", "deepspeed_zero2"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_distributed.json"))
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_distributed_check: needs CUDA (accelerate refuses FSDP without an accelerator)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import save_pipeline, tiny_sd3

    procs = max(1, min(torch.cuda.device_count(), 2))
    work = tempfile.mkdtemp(prefix="genalign-gpu-check-")
    model = save_pipeline(tiny_sd3(with_text_encoders=True), os.path.join(work, "sd3"))
    prompts = os.path.join(work, "prompts.txt")
    Path(prompts).write_text("a cat\na dog\na red car\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    ref = os.path.join(work, "ref.safetensors")
    t0 = time.time()
    one = subprocess.run([sys.executable, str(WORKER), "--out", ref, "--simulate-world", str(procs),
                          *_overrides(model, os.path.join(work, "ref"), prompts)], env=env, capture_output=True, text=True)
    results = {"gpus": torch.cuda.device_count(), "device": torch.cuda.get_device_name(0), "processes": procs,
               "torch": torch.__version__, "reference": {"ok": one.returncode == 0, "wall_s": time.time() - t0,
                                                         "stderr_tail": one.stderr[-2000:] if one.returncode else ""},
               "configs": {}}
    for name in args.configs:
        if name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
            results["configs"][name] = {"skipped": "deepspeed is not installed"}
            continue
        out = os.path.join(work, f"{name}.safetensors")
        t0 = time.time()
        run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                              str(ROOT / "configs" / "accelerate" / f"{name}.yaml"), "--num_processes", str(procs),
                              "--main_process_port", str(_port()), str(WORKER), "--out", out,
                              *_overrides(model, os.path.join(work, name), prompts)],
                             env=env, capture_output=True, text=True)
        entry = {"ok": run.returncode == 0, "wall_s": time.time() - t0}
        if run.returncode == 0 and one.returncode == 0:
            entry["max_diff_vs_reference"] = _compare(ref, out)
            with open(out + ".json") as fh:
                entry["worker"] = json.load(fh)
        else:
            entry["stderr_tail"] = run.stderr[-3000:]
        results["configs"][name] = entry
        print(name, json.dumps(entry)[:400])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"wrote {args.out}")
    return 0 if all(c.get("ok", True) for c in results["configs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
