"""Distributed training on CPU (2 processes, gloo) computes what one process computes on the same global batch.

How "the same global batch" is obtained (the comparison is exact, not statistical):
each process of an N-process run samples its own slice of the epoch's global prompt list (KRepeatSampler:
rank r takes positions ``[r * n/N, (r + 1) * n/N)``; groups span processes) with rollout seeds that depend on
the rank. The 1-process reference (``tests/dist_worker.py --simulate-world 2``) runs the SAME trainer code for
rank 0's slice with rank 0's seeds and then for rank 1's slice with rank 1's seeds, concatenates the two in rank
order (the order ``Accelerator.gather`` uses), and then computes advantages over the whole batch and one optimizer
step over all 8 samples in a single process (world size 1: no gather, no all-reduce). The 2-process run
(``torchrun --nproc_per_node 2``) gathers rewards, computes advantages from the gathered rewards on every
process, normalises the loss by the all-reduced token count, and accelerate's DDP wrapper synchronises the
gradients (the loss is scaled by the process count, since DDP averages).

Checked: the trajectories (old log-probs, final latents), rewards and advantages are bitwise identical; the
global loss, the summed gradients and the gradient norm agree to float32 round-off, and so do the weights after
one AdamW step (rtol 1e-5); both runs start from identical weights; both ranks end with identical weights;
the evaluation after the step (3 eval images: 2 on rank 0, 1 on rank 1) gives the same mean reward.
Because an Adam step is nearly invariant to the gradient's scale, the gradients and the loss are compared
directly (a per-process instead of global normalisation would show there as a factor of 2).

Both runs use one thread per process (OMP_NUM_THREADS=1, torchrun's default) so kernels are the same.
A second test checks that a reward failing on rank 1 only makes ``accelerate launch`` (with
configs/accelerate/cpu_2proc.yaml) exit non-zero instead of leaving rank 0 waiting in a collective.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .tiny_models import save_pipeline, tiny_sd3

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return save_pipeline(tiny_sd3(with_text_encoders=True), tmp_path_factory.mktemp("sd3"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(model_dir, out_dir, prompts_file, reward="brightness", eval_prompts_file="null"):
    base = {
        "model.id": model_dir, "output_dir": str(out_dir), "num_epochs": 1, "seed": 0,
        "sampling.num_steps": 3, "sampling.groups_per_epoch": 2, "sampling.group_size": 4, "sampling.batch_size": 2,
        "train.batch_size": 2, "train.num_minibatches": 1, "train.clip_range": 0.2, "train.lr": "1e-3",
        "lora.rank": 4, "lora.alpha": 4.0, "prompts_file": prompts_file, "eval_prompts_file": eval_prompts_file,
        "eval.num_per_prompt": 1,
        "reward": f"{WORKER}:{reward}", "model.guidance_scale": 2.0, "train.ema": False,
    }
    return [f"{k}={v}" for k, v in base.items()]


def _run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{cmd[:6]}... did not finish within {TIMEOUT_S} s (hang?)\n{(exc.stderr or '')[-3000:]}")


def _load(path):
    from safetensors.torch import load_file

    with open(str(path) + ".json") as fh:
        return load_file(str(path)), json.load(fh)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\na dog\na red car\n")
    return str(path)


@pytest.mark.parametrize("reward", ["brightness", "flat_for_cat"])
def test_two_processes_match_one_process_on_the_same_global_batch(sd3_dir, tmp_path, prompts_file, reward):
    """'flat_for_cat' without a KL: the cat group's advantages are 0, so its samples run no pass and the processes
    hold different numbers of samples that train (the short one fills its micro-batches)."""
    one_out, two_out = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    extra = ["train.kl_beta=0"] + ([] if reward == "brightness" else ["sampling.groups_per_epoch=3"])
    # 3 eval images: 2 on rank 0, 1 on rank 1
    one = _run([sys.executable, str(WORKER), "--out", str(one_out), "--simulate-world", "2",
                *_overrides(sd3_dir, tmp_path / "run1", prompts_file, reward, prompts_file), *extra], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-4000:]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), "--out", str(two_out),
                *_overrides(sd3_dir, tmp_path / "run2", prompts_file, reward, prompts_file), *extra], cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-4000:]

    a, meta_a = _load(one_out)
    b, meta_b = _load(two_out)
    assert meta_a["world_size"] == 1 and meta_a["simulate_world"] == 2
    assert meta_b["world_size"] == 2 and meta_b["backend"] == "gloo" and "MULTI_CPU" in meta_b["distributed_type"]
    assert meta_b["wrapper"] == "DistributedDataParallel"  # accelerate's DDP, no hand-written all-reduce
    assert meta_b["ranks_agree"], "the two ranks hold different weights after the step"
    assert set(a) == set(b)

    # the test is only meaningful if groups span the two processes (advantages need the gathered rewards)
    ids = b["group_ids"]
    assert set(ids[:4].tolist()) & set(ids[4:].tolist())
    for key in ("group_ids", "log_probs", "final_latents", "rewards", "advantages", "valid"):
        assert torch.equal(a[key], b[key]), key
    assert b["advantages"].abs().sum() > 0
    if reward == "flat_for_cat":  # zero advantages that skip their passes, unevenly over the two processes
        zero = (b["advantages"] == 0).view(2, -1).sum(1)
        assert zero.sum() > 0 and zero[0] != zero[1], zero

    # (with skipped passes the loss, a sum of +-A terms near 0, differs in its last float32 bits)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-8 if reward == "brightness" else 1e-7)
    torch.testing.assert_close(a["grad_norm"], b["grad_norm"], rtol=1e-5, atol=1e-8)
    weights = [k[3:] for k in a if k.startswith("w1.")]
    assert weights and all("lora_" in n for n in weights)
    grads = [k for k in a if k.startswith("grad.")]
    assert grads and any(a[k].abs().sum() > 0 for k in grads)
    for k in grads:  # skipped passes change the micro-batches' make-up, so float32 sums differ in the last bits
        atol = 1e-9 if reward == "brightness" else 1e-4 * float(a[k].abs().max())
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol, msg=lambda m: f"{k}: {m}")
    changed = False
    for n in weights:
        assert torch.equal(a["w0." + n], b["w0." + n]), f"initial weights differ: {n}"
        # (Adam's first step divides by |g| + 1e-8: gradients near 0 amplify those last bits to a few 1e-7)
        atol = 1e-7 if reward == "brightness" else 1e-5
        torch.testing.assert_close(a["w1." + n], b["w1." + n], rtol=1e-5, atol=atol, msg=lambda m: f"{n}: {m}")
        changed |= not torch.equal(b["w0." + n], b["w1." + n])
    assert changed
    # evaluation after the step with eval images split unevenly (2 + 1) over the processes
    torch.testing.assert_close(a["eval_reward"], b["eval_reward"], rtol=1e-5, atol=1e-7)


def test_reward_failing_on_one_rank_fails_the_whole_launch(sd3_dir, tmp_path, prompts_file):
    """Rank 1's reward raises while rank 0 waits in the reward gather: the launcher must end both processes and
    exit non-zero (well within the timeout), and rank 1 keeps its failed batch for inspection."""
    out = tmp_path / "run"
    proc = _run([sys.executable, "-m", "accelerate.commands.launch",
                 "--config_file", str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"),
                 "--main_process_port", str(_free_port()), str(WORKER), "--out", str(tmp_path / "r.safetensors"),
                 *_overrides(sd3_dir, out, prompts_file, reward="raise_on_rank1")], cwd=tmp_path)
    assert proc.returncode != 0
    assert "reward server unreachable from rank 1" in proc.stderr + proc.stdout
    assert not (tmp_path / "r.safetensors").exists()
    kept = sorted(p.name for p in (out / "failed_rewards").iterdir())
    assert kept and all("rank1" in name for name in kept), kept


def test_dynamic_sampling_with_uneven_shares_trains_in_step_on_two_processes(sd3_dir, tmp_path, prompts_file):
    """DAPO refill keeps whole groups, so the processes may keep different numbers of samples (padded with rows
    that train nothing to equal shares for DDP): the launch must neither hang nor diverge."""
    out = tmp_path / "dyn"
    over = _overrides(sd3_dir, tmp_path / "run", prompts_file, reward="flat_for_cat")
    over = [o for o in over if not o.startswith("num_epochs=")] + [
        "num_epochs=3", "train.dynamic_sampling=true", "train.dynamic_sampling_max_rounds=6", "train.num_minibatches=2"]
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                 "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), "--train",
                 "--out", str(out), *over], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.load(open(f"{out}.rank{r}.json")) for r in (0, 1))
    assert r0["weights"] == r1["weights"]
    assert r0["metrics"]["dynamic/groups_kept"] == 2
    kept0, kept1 = ([k for k, _ in r["local_counts"]] for r in (r0, r1))
    assert sum(kept0) + sum(kept1) == 3 * 8
    assert kept0 != kept1  # uneven shares actually happened on this seed...
    assert [n for _, n in r0["local_counts"]] == [n for _, n in r1["local_counts"]]  # ...and were padded to equal
