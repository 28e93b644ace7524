"""A diffusion Flow-GRPO step and an LLM GRPO step call the very same loss function."""

import torch

from genalign import losses
from genalign.pipelines.llm import grpo_step

from .test_llm import PROMPTS, _fresh, policy  # noqa: F401  (fixture)
from .test_trainer import make_trainer, prompts_file, sd3_dir  # noqa: F401  (fixtures)


def test_trainer_and_llm_step_share_policy_loss(monkeypatch, policy, sd3_dir, prompts_file, tmp_path):  # noqa: F811
    calls = []
    real = losses.policy_loss

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "policy_loss", spy)
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file)
    trainer.train()
    diffusion_calls = len(calls)
    micro_batches = trainer.cfg.samples_per_epoch // trainer.cfg.train.batch_size
    assert diffusion_calls == micro_batches * len(trainer.trainable_steps())  # one call per micro-batch and step

    pol = _fresh(policy)
    batch = pol.generate(PROMPTS, max_new_tokens=4, num_return_sequences=2, seed=0)
    rewards = torch.arange(4, dtype=torch.float32)
    grpo_step(pol, torch.optim.SGD(pol.model.parameters(), lr=0.1), batch, rewards, batch["group_ids"], {})
    assert len(calls) > diffusion_calls
