"""Exact resume after crashes: SIGKILL `genalign train` at random moments, resume, compare with an
uninterrupted run.

Each kill lands at a random moment (a random epoch still to come, its sampling or training phase, a
random delay into it); a watcher also kills the process on purpose while a checkpoint is
being written (a `.tmp-checkpoint-*` directory exists). After each kill the run is restarted with
`--resume latest` (or from scratch when no checkpoint was completed yet) until it finishes. The final
trainable weights and every row of metrics.jsonl (timings excluded) must equal the uninterrupted run's
bit for bit (CPU, one thread, fixed seeds).

    python benchmarks/kill_resume.py --kills 10 --out benchmarks/results/kill_resume.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ("time/", "samples_per_s", "elapsed_s")


def _overrides(out_dir: str, epochs: int) -> List[str]:
    return [f"output_dir={out_dir}", f"num_epochs={epochs}", "checkpoint.every=1", "checkpoint.keep_last=2",
            "eval.every=3", "eval.num_per_prompt=4", "sampling.groups_per_epoch=4", "sampling.batch_size=64",
            "train.num_minibatches=2", "train.ema=true", "train.ema_every=1"]


def _command(out_dir: str, epochs: int, resume: bool) -> List[str]:
    cmd = [sys.executable, "-m", "genalign.cli", "train", os.path.join(ROOT, "configs", "digits_flow_grpo.yaml"),
           *_overrides(out_dir, epochs)]
    return cmd + (["--resume", "latest"] if resume else ["--overwrite"])  # restart from scratch: a used directory


def _env() -> Dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1"}


def _has_checkpoint(out_dir: str) -> bool:
    return bool(glob.glob(os.path.join(out_dir, "checkpoints", "checkpoint-*", "COMPLETE")))


def _completed_epochs(out_dir: str) -> int:
    from genalign.checkpoint import latest_checkpoint

    path = latest_checkpoint(os.path.join(out_dir, "checkpoints"))
    if path is None:
        return 0
    with open(os.path.join(path, "trainer_state.json")) as fh:
        return json.load(fh)["epoch"]


def _phase(log_path: str) -> str:
    """The phase the run was in, from the last progress line or checkpoint state."""
    with open(log_path, errors="replace") as fh:
        tail = fh.read()[-400:]
    for phase in ("sampling", "training"):
        if tail.rfind(phase) >= 0 and tail.rfind(phase) >= max(tail.rfind("sampling"), tail.rfind("training")):
            return phase
    return "startup/eval"


def _log_has(log_path: str, marker: str) -> bool:
    with open(log_path, errors="replace") as fh:
        return marker in fh.read()


def _writing_since(out_dir: str, start: float) -> list:
    """Checkpoint temp directories created since ``start`` (leftovers of an earlier killed write are ignored).
    A directory can be renamed to its final name between the listing and the stat: that one is done, skip it."""
    writing = []
    for d in glob.glob(os.path.join(out_dir, "checkpoints", ".tmp-checkpoint-*")):
        try:
            if os.path.getmtime(d) >= start:
                writing.append(d)
        except FileNotFoundError:
            continue
    return writing


def run_once(out_dir: str, epochs: int, resume: bool, kill_at: Optional[tuple], kill_in_checkpoint: bool,
             log_path: str) -> Dict:
    """Start the run; kill it ``delay`` s after the log shows ``marker`` (``kill_at = (marker, delay)``),
    or while a checkpoint is being written."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_command(out_dir, epochs, resume), cwd=ROOT, env=_env(), stdout=log, stderr=log)
        start, seen = time.time(), None
        while proc.poll() is None:
            elapsed = time.time() - start
            writing = _writing_since(out_dir, start)
            if kill_at is not None and seen is None and _log_has(log_path, kill_at[0]):
                seen = time.time()
            due = seen is not None and time.time() - seen >= kill_at[1]
            if (kill_in_checkpoint and writing) or due:
                phase = "checkpoint-write" if writing else _phase(log_path)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return {"killed": True, "after_s": round(elapsed, 2), "phase": phase}
            time.sleep(0.005)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}); see {log_path}")
    return {"killed": False, "after_s": round(time.time() - start, 2)}


def final_state(out_dir: str):
    from safetensors.torch import load_file

    weights = load_file(os.path.join(out_dir, "final", "lora", "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        rows = [{k: v for k, v in json.loads(line).items() if not k.startswith(TIMING_KEYS)} for line in fh]
    return weights, rows


def compare(a_dir: str, b_dir: str) -> Dict:
    import torch

    wa, ra = final_state(a_dir)
    wb, rb = final_state(b_dir)
    same_weights = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    return {"weights_identical": same_weights, "metrics_identical": ra == rb, "metric_rows": len(ra)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--work", default="/tmp/genalign_kill_resume")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "kill_resume.json"))
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    ref_dir, run_dir = os.path.join(args.work, "reference"), os.path.join(args.work, "killed")
    t0 = time.time()
    ref = run_once(ref_dir, args.epochs, False, None, False, os.path.join(args.work + "_ref.log"))
    duration = ref["after_s"]
    events, kills = [], 0
    while True:
        resume = _has_checkpoint(run_dir)
        if kills < args.kills:
            in_ckpt = kills % 4 == 3  # every fourth kill targets a checkpoint being written
            # otherwise: a random epoch still to come, a random phase of it, a random delay into it
            epoch = rng.randint(_completed_epochs(run_dir) + 1, args.epochs)
            phase = rng.choice(["sampling", "training"])  # sampling (rollout + reward) lasts ~0.3 s here
            after = None if in_ckpt else (f"epoch {epoch} {phase}", rng.uniform(0, 0.1 if phase == "sampling" else 0.6))
            ev = run_once(run_dir, args.epochs, resume, after, in_ckpt, os.path.join(args.work + f"_{len(events)}.log"))
        else:
            ev = run_once(run_dir, args.epochs, resume, None, False, os.path.join(args.work + f"_{len(events)}.log"))
        ev["resumed"] = resume
        events.append(ev)
        print(json.dumps(ev), flush=True)
        if not ev["killed"]:
            break
        kills += 1
    result = {"kills": kills, "events": events, "phases": sorted({e["phase"] for e in events if e["killed"]}),
              **compare(ref_dir, run_dir), "uninterrupted_run_s": duration, "total_s": round(time.time() - t0, 1),
              "settings": _overrides("<dir>", args.epochs)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "events"}, indent=1))
    return 0 if result["weights_identical"] and result["metrics_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
