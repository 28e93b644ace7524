"""Group-level rewards (``group_level = True``): called once per prompt group with exactly that group's images,
in training (the trainer's group ids) and in evaluation (one group per prompt)."""

from pathlib import Path

import pytest
import torch

from genalign.reward_api import RewardError, RewardSet

from .test_trainer import make_trainer, prompts_file, sd3_dir  # noqa: F401

TOY = Path(__file__).parent / "data" / "toy_rewards.py"


def test_reward_set_splits_a_batch_by_group_and_scatters_scores_back():
    rs = RewardSet(f"{TOY}:RankInGroup")
    fn = rs.components[0][1]
    images = torch.stack([torch.full((3, 2, 2), v) for v in (0.9, 0.1, 0.5, 0.3, 0.7)])
    total, _ = rs(images, list("abcde"), [{"group": g} for g in (1, 2, 1, 2, 1)])
    assert total.tolist() == [1.0, 0.0, 0.0, 1.0, 0.5]  # group 1: 0.9 > 0.7 > 0.5; group 2: 0.3 > 0.1
    assert sorted(c[0] for c in fn.calls) == [[1, 1, 1], [2, 2]]
    with pytest.raises(RewardError, match="group-level .* missing for sample\\(s\\) \\[1\\]"):
        rs(images[:2], ["a", "b"], [{"group": 0}, {}])


def test_trainer_and_evaluator_give_whole_groups(sd3_dir, tmp_path, prompts_file):  # noqa: F811
    trainer = make_trainer(sd3_dir, tmp_path / "run", prompts_file, reward="RankInGroup",
                           **{"eval_prompts_file": prompts_file, "eval.num_per_prompt": 3, "eval.every": 1,
                              "sampling.batch_size": 2})
    fn = trainer.reward_fn.components[0][1]
    trainer.train()
    group_size = trainer.cfg.sampling.group_size
    train_calls = [c for c in fn.calls if len(c[0]) == group_size]
    eval_calls = [c for c in fn.calls if len(c[0]) == 3]
    assert len(train_calls) == trainer.cfg.sampling.groups_per_epoch  # one call per group despite batches of 2
    assert len(eval_calls) == 2 * 3  # before and after training: 3 prompts, one call each
    for groups, prompts in fn.calls:
        assert len(set(groups)) == 1 and len(set(prompts)) == 1
