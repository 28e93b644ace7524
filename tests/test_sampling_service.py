"""The one sampling service (genalign.sampling) and the shared Evaluator (genalign.evaluator).

* Per-image seeds: image i's noise (initial, and every SDE step's) comes from ``seeds[i]`` alone, so the
  batch size and a split over processes (``shard``) change nothing but the round-off of batched kernels;
  with batches of one image the results are bitwise identical.
* The Evaluator's ``eval/*`` metrics are identical for one process and for two simulated processes (threads
  with an all-reduce through a barrier) holding 2 + 1 images.
* ``genalign eval`` (flags, or a run's ``--config``) on a saved LoRA gives the metrics of ``Evaluator.run`` on
  the same weights.
* A tiny training run's last ``eval/*`` equals ``genalign eval --config RUN/config.json --lora RUN/final/lora``
  (needs the trainer to evaluate through the Evaluator).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from genalign.cli import main
from genalign.evaluator import Evaluator
from genalign.lora import add_lora, save_lora
from genalign.pipelines import load_policy
from genalign.rewards import RewardSet
from genalign.sampling import expand_jobs, sample_images, seeded_latents, shard

PROMPTS = ["the digit 3", "a handwritten seven", "the number nine"]
STEPS = 4
BRIGHTNESS = f"{Path(__file__).parent / 'data' / 'toy_rewards.py'}:brightness"  # a script reward, named by its spec


@pytest.fixture(scope="module")
def policy():
    return load_policy("digits")


def _randomize_lora(policy) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.denoiser().named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """``(digits policy with a random non-zero LoRA, that LoRA saved like a run's final/lora)``."""
    policy = load_policy("digits")
    add_lora(policy.denoiser(), rank=4, alpha=8, target_modules=policy.lora_target_modules)
    _randomize_lora(policy)
    out = str(tmp_path_factory.mktemp("run") / "final" / "lora")
    save_lora(policy, out, "digits")
    return policy, out


def _rewards():
    return RewardSet({"digit_correct": 1.0, BRIGHTNESS: 0.5})


@pytest.mark.parametrize("noise_level", [0.0, 0.8])
def test_per_image_seeds_ignore_batch_size_and_process_split(policy, noise_level):
    prompts, seeds = expand_jobs(PROMPTS, 3, 11)  # 9 images, seeds 11..19
    assert seeds == list(range(11, 20))
    opts = {"noise_level": noise_level}
    full = sample_images(policy, prompts, seeds, STEPS, batch_size=9, **opts)
    for bs in (4, 2):
        torch.testing.assert_close(sample_images(policy, prompts, seeds, STEPS, batch_size=bs, **opts), full,
                                   rtol=0, atol=1e-5)
    # two processes: rank r draws the images i % 2 == r with the seeds of their global indices
    split = torch.zeros_like(full)
    for rank in range(2):
        mine = shard(len(prompts), rank, 2)
        assert mine == list(range(rank, 9, 2))
        split[mine] = sample_images(policy, [prompts[i] for i in mine], [seeds[i] for i in mine], STEPS,
                                    batch_size=3, **opts)
    torch.testing.assert_close(split, full, rtol=0, atol=1e-5)
    # with one image per batch the kernels see the same inputs: bitwise identical
    one = sample_images(policy, prompts, seeds, STEPS, batch_size=1, **opts)
    mine = shard(len(prompts), 1, 2)
    assert torch.equal(sample_images(policy, [prompts[i] for i in mine], [seeds[i] for i in mine], STEPS,
                                     batch_size=1, **opts), one[mine])
    # the noise itself is drawn per image
    assert torch.equal(seeded_latents(policy, seeds[3:7]), seeded_latents(policy, seeds)[3:7])
    # seeds matter, and the SDE noise is actually applied
    assert (sample_images(policy, prompts[:3], [0, 1, 2], STEPS, **opts) - full[:3]).abs().max() > 0.1
    if noise_level:
        assert (sample_images(policy, prompts, seeds, STEPS, batch_size=9) - full).abs().max() > 0.1


class _ThreadCollective:
    """``world`` ranks in threads; ``reduce(t, 'sum')`` waits for every rank and returns the sum."""

    def __init__(self, world: int):
        self.world, self.barrier, self.inputs = world, threading.Barrier(world), {}

    def accelerator(self, rank: int):
        collective = self

        class Fake:
            process_index, num_processes, device = rank, collective.world, torch.device("cpu")

            def reduce(self, tensor, reduction):
                assert reduction == "sum"
                collective.inputs[rank] = tensor.clone()
                collective.barrier.wait()
                out = torch.stack([collective.inputs[r] for r in range(collective.world)]).sum(0)
                collective.barrier.wait()
                return out

        return Fake()


def _run_world(make_evaluator, policy, world: int):
    if world == 1:
        return [make_evaluator(None).run(policy)]
    collective, results, errors = _ThreadCollective(world), [None] * world, []

    def work(rank):
        try:
            results[rank] = make_evaluator(collective.accelerator(rank)).run(policy)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
            collective.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("batch_size", [1, 4])
def test_evaluator_metrics_identical_for_one_and_two_processes(tuned, batch_size):
    policy, _ = tuned
    rewards = _rewards()

    def make(acc):  # 3 prompts x 1 image: 2 images on rank 0, 1 on rank 1
        return Evaluator(PROMPTS, 1, 1234, STEPS, batch_size, rewards, acc)

    (one,) = _run_world(make, policy, 1)
    two = _run_world(make, policy, 2)
    metrics, images, prompts = one
    assert set(metrics) == {"eval/reward", "eval/digit_correct", "eval/digit_correct.score",
                            "eval/digit_correct.accuracy", "eval/digit_correct.probability", f"eval/{BRIGHTNESS}"}
    assert prompts == PROMPTS and images.shape == (3, 3, 8, 8)
    assert [r[2] for r in two] == [[PROMPTS[0], PROMPTS[2]], [PROMPTS[1]]]
    torch.testing.assert_close(torch.cat([two[0][1], two[1][1]]), images[[0, 2, 1]], rtol=0, atol=1e-5)
    for rank_metrics, _, _ in two:
        if batch_size == 1:  # the same single-image batches: bitwise identical
            assert rank_metrics == metrics
        else:  # other batches: the last float bits of the images differ, the classifier amplifies them a little
            assert rank_metrics.keys() == metrics.keys()
            for k in metrics:
                assert rank_metrics[k] == pytest.approx(metrics[k], rel=1e-5, abs=1e-6)
    # the metrics are the means over all images of the weighted total and of each part
    total, parts = rewards(images, PROMPTS, None)
    assert metrics["eval/reward"] == pytest.approx(total.double().mean().item(), rel=1e-6)
    assert metrics[f"eval/{BRIGHTNESS}"] == pytest.approx(parts[BRIGHTNESS].double().mean().item(), rel=1e-6)


def test_cli_eval_reproduces_evaluator_on_saved_lora(tuned, tmp_path):
    policy, lora_dir = tuned
    expected, _, _ = Evaluator(PROMPTS[:2], 2, 5, STEPS, 3, RewardSet({"digit_correct": 1.0})).run(policy)
    out = tmp_path / "flags"
    assert main(["eval", "--model", "digits", "--lora", lora_dir, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--rewards", "digit_correct", "--num-per-prompt", "2", "--seed", "5", "--steps", str(STEPS),
                 "--batch-size", "3", "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["metrics"] == expected
    assert result["rewards"]["digit_correct"]["mean"] == pytest.approx(expected["eval/digit_correct"], rel=1e-12)

    # a run's config supplies prompts, reward (weights and options), images per prompt, seed, steps, batch size
    from genalign.config import load_config, to_dict

    prompts_file = tmp_path / "eval_prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    reward = {"digit_correct": 1.0, BRIGHTNESS: 0.5}
    cfg = load_config(None, [f"eval_prompts_file={prompts_file}", "eval.num_per_prompt=2", "eval.seed=77",
                             f"eval.num_steps={STEPS}", "sampling.num_steps=10", "sampling.batch_size=4"])
    cfg.reward = reward
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    expected, _, _ = Evaluator(PROMPTS, 2, 77, STEPS, 4, RewardSet(reward)).run(policy)
    out = tmp_path / "config"
    assert main(["eval", "--config", str(run / "config.json"), "--lora", lora_dir, "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert (result["seed"], result["num_per_prompt"], result["num_steps"], result["num_samples"]) == (77, 2, STEPS, 6)
    assert result["reward_weights"] == reward and result["prompts"] == PROMPTS
    assert result["metrics"] == expected
    # a flag wins over the config
    out = tmp_path / "override"
    assert main(["eval", "--config", str(run), "--lora", lora_dir, "--seed", "78", "--out", str(out)]) == 0
    assert json.loads((out / "eval.json").read_text())["metrics"] != expected


@pytest.mark.parametrize("ema,ema_every", [("false", 8), ("true", 8), ("true", 1)])
def test_training_eval_is_reproduced_by_genalign_eval(tmp_path, ema, ema_every):
    """The last evaluation used final/lora_ema when it exists (an EMA updated at least once and eval.use_ema),
    else final/lora (the trained weights): one optimizer step with ema_every 8 never updates the EMA. The run
    directory given to --lora resolves to those weights."""
    from genalign.config import load_config
    from genalign.trainer import Trainer

    from .test_trainer import tiny_overrides
    from .tiny_models import save_pipeline, tiny_sd3

    sd3_dir = save_pipeline(tiny_sd3(with_text_encoders=True), tmp_path / "sd3")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a cat\na dog\na red car\n")
    run = tmp_path / "run"
    overrides = tiny_overrides(sd3_dir, run, str(prompts_file), **{
        "eval_prompts_file": str(prompts_file), "eval.num_per_prompt": 2, "eval.seed": 9, "train.ema": ema,
        "train.ema_every": ema_every})
    Trainer(load_config(None, overrides)).train()
    assert (run / "final" / "lora_ema").is_dir() == (ema == "true" and ema_every == 1)
    lora = run / "final" / ("lora_ema" if (run / "final" / "lora_ema").is_dir() else "lora")
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    logged = {k: v for k, v in rows[-1].items() if k.startswith("eval/")}
    assert "eval/reward" in logged
    out = tmp_path / "eval"
    from genalign.lora import find_lora_dir

    assert find_lora_dir(str(run)) == str(lora)  # the run directory names the weights its evaluation used
    assert main(["eval", "--config", str(run / "config.json"), "--lora", str(run), "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["metrics"] == logged


@pytest.mark.slow
def test_cli_eval_on_two_processes_equals_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m genalign.cli eval`` (gloo, 2 + 1 images) writes the metrics and
    statistics of the one-process command up to float32 round-off (single-image batches: the same images)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["-m", "genalign.cli", "eval", "--model", "digits", "--prompt", "one", "--prompt", "two", "--prompt",
            "three", "--rewards", "digit_correct", "--num-per-prompt", "1", "--seed", "3", "--steps", str(STEPS),
            "--batch-size", "1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for name, cmd in (("one", [sys.executable, *args]), ("two", [*torchrun, *args])):
        done = subprocess.run(cmd + ["--out", str(tmp_path / name)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        results[name] = json.loads((tmp_path / name / "eval.json").read_text())
    # the same images; the means are reduced in another order across processes (float32 round-off, CPU-dependent:
    # one machine's per-image probabilities differed by 1.2e-6 relative; another seed's image moves them by far more)
    assert results["two"]["metrics"] == pytest.approx(results["one"]["metrics"], rel=1e-5)
    def leaves(x):  # the numbers and strings of a nested result, in order
        if isinstance(x, dict):
            return [v for k in sorted(x) for v in [k, *leaves(x[k])]]
        if isinstance(x, list):
            return [v for item in x for v in leaves(item)]
        return [x]

    two, one = leaves(results["two"]["rewards"]), leaves(results["one"]["rewards"])
    assert [v for v in two if isinstance(v, str)] == [v for v in one if isinstance(v, str)]
    assert [v for v in two if not isinstance(v, str)] == pytest.approx([v for v in one if not isinstance(v, str)],
                                                                       rel=1e-5)
