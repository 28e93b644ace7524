"""The one optimizer step (genalign/optim.py): forward routing through a wrapper, NaN/inf refusal, the learning-rate
schedules' closed forms, checkpoint hooks, the shipped accelerate configs, and accumulation invariance of the DRAGON objective (the policy-gradient
objective's is in test_trainer.py, the LLM step's in test_llm.py)."""

import math
import os

import pytest
import torch

from genalign.errors import ConfigError
from genalign.optim import NonFiniteError, OptimizerStep, lr_factor, route_forward, save_state_hooks

from .test_trainer import make_trainer, prompts_file, sd3_dir  # noqa: F401

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "accelerate")


class Counting(torch.nn.Module):
    """A stand-in for DDP / FSDP: calls the wrapped module and counts the calls."""

    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_route_forward_goes_through_the_wrapper_only_with_gradients_unless_sharded():
    inner = torch.nn.Linear(3, 2)
    wrapper = Counting(inner)
    route_forward(inner, wrapper)
    x = torch.randn(4, 3)
    expected = torch.nn.functional.linear(x, inner.weight, inner.bias)
    torch.testing.assert_close(inner(x), expected)  # no recursion: the wrapper reaches the original forward
    assert wrapper.calls == 1
    with torch.no_grad():
        inner(x)
    assert wrapper.calls == 1  # no-grad forwards (rollouts) skip a DDP wrapper
    sharded = Counting(torch.nn.Linear(3, 2))
    route_forward(sharded.module, sharded, always=True)
    with torch.no_grad():
        sharded.module(x)
    assert sharded.calls == 1  # sharded parameters exist only inside the wrapper: always routed


def test_non_finite_gradient_raises_before_the_update_and_names_where():
    model = torch.nn.Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    step = OptimizerStep(None, model, torch.optim.SGD(model.parameters(), lr=0.1), distributed=False,
                         describe_failure=lambda: "the test loss")

    def nan_loss(sync):
        step.backward(model(torch.randn(2, 3)).sum() * float("nan"), sync)
        return {}

    with pytest.raises(NonFiniteError, match="at step 7: the test loss"):
        step.run([nan_loss], where=" at step 7: ")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert step.num_steps == 0

    def ok_loss(sync):
        loss = model(torch.ones(2, 3)).sum()
        step.backward(loss, sync)
        return {"loss": loss.detach()}

    stats, norm = step.run([ok_loss, ok_loss])
    assert step.num_steps == 1 and torch.isfinite(norm) and stats["loss"].ndim == 0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lr_schedules_follow_their_closed_forms():
    def at(schedule, epoch, **kw):
        return lr_factor(schedule, epoch, 10, **kw)

    assert [at("constant", e) for e in (0, 9)] == [1.0, 1.0]
    assert at("cosine", 0) == 1.0 and at("linear", 0) == 1.0
    assert at("cosine", 5) == pytest.approx(0.5) and at("cosine", 5, min_ratio=0.2) == pytest.approx(0.6)
    assert at("cosine", 8) == pytest.approx(0.5 * (1 + math.cos(0.8 * math.pi)))
    assert at("linear", 9) == pytest.approx(0.1) and at("linear", 9, min_ratio=0.5) == pytest.approx(0.55)
    # linear warm-up over 4 epochs, then the schedule over the remaining 6 starting at its peak
    assert [at("cosine", e, warmup_epochs=4) for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert at("cosine", 7, warmup_epochs=4) == pytest.approx(0.5) and at("constant", 1, warmup_epochs=4) == 0.5
    with pytest.raises(ConfigError, match="train.lr_schedule must be one of"):
        lr_factor("step", 0, 10)


def test_prepared_models_stay_out_of_accelerate_state(tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    save_state_hooks(acc)
    model = torch.nn.Linear(3, 2)
    OptimizerStep(acc, model, torch.optim.AdamW(model.parameters()))
    acc.save_state(str(tmp_path / "state"))
    files = os.listdir(tmp_path / "state")
    assert any(f.startswith("optimizer") for f in files)
    assert not any(f.startswith(("model", "pytorch_model")) for f in files), files
    acc.load_state(str(tmp_path / "state"))  # loads without model files


@pytest.mark.parametrize("name,kind", [("ddp.yaml", "MULTI_GPU"), ("cpu_2proc.yaml", "MULTI_GPU"),
                                       ("fsdp.yaml", "FSDP"), ("deepspeed_zero2.yaml", "DEEPSPEED")])
def test_shipped_accelerate_configs_load(name, kind):
    """accelerate parses each shipped config (FSDP and DeepSpeed cannot run on a CPU: accelerate refuses FSDP
    without an accelerator, DeepSpeed needs CUDA; benchmarks/gpu_distributed_check.py runs them on a GPU)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(os.path.join(CONFIGS, name))
    assert str(cfg.distributed_type).endswith(kind)
    if kind == "FSDP":
        import diffusers.models.transformers.transformer_sd3 as sd3

        assert cfg.fsdp_config["fsdp_use_orig_params"] is True  # LoRA: frozen and trainable params in one unit
        assert hasattr(sd3, cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 2 and cfg.deepspeed_config["gradient_accumulation_steps"] == 1


def assert_accumulation_invariant(trainer, units, rows) -> None:
    """One optimizer step's loss and gradients over ``rows`` are the same with one micro-batch or one per row."""
    assert len(rows) >= 2
    results = []
    for micro in (len(rows), 1):
        trainer.cfg.train.batch_size = micro
        trainer.optimizer.zero_grad(set_to_none=True)
        stats = trainer.accumulate(units, rows)
        results.append((stats["loss"], [p.grad.clone() for p in trainer.params]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-8)
    scale = max(float(g.abs().max()) for g in grads_a)
    assert scale > 0
    for a, b in zip(grads_a, grads_b):  # float32 round-off of different batch shapes only (kernels differ by CPU)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale)


def perturb(trainer, scale: float = 0.05) -> None:
    """Move the trainable weights off their initial values (policy != reference / old policy)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.params:
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_dragon_objective_accumulation_does_not_change_loss_or_gradients(sd3_dir, tmp_path, prompts_file):
    from genalign.objectives import EpochBatch

    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, **{"method": "dragon", "dragon.beta": 50.0})
    perturb(trainer)  # policy != reference, so the loss has a gradient
    traj, rewards, parts, group_ids, local = trainer.sample_epoch(0)
    obj = trainer.objective
    units = obj.prepare(0, EpochBatch(traj, rewards, parts, group_ids, local, trainer.plan(0)))
    assert_accumulation_invariant(trainer, units, obj.minibatches(units, 0, 0)[0])
