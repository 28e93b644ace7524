"""Prompt sets as .jsonl records: metadata reaches every reward call (training and evaluation), bad lines are
named, per-prompt conditioning (negative prompt, condition image) is kept for the model and refused by adapters that
cannot take it."""

import json
from pathlib import Path

import pytest

from genalign.prompts import read_prompt_records, read_prompts

from .test_trainer import make_trainer, sd3_dir  # noqa: F401

REWARDS = Path(__file__).parent / "data" / "toy_rewards.py"


def write(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return str(path)


def test_jsonl_records_keep_fields_as_metadata(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": " a cat ", "target": 0.2, "metadata": {"tag": "x"}}, "",
                                        {"prompt": "a dog", "target": 0.8}])
    assert read_prompt_records(path) == [{"prompt": "a cat", "metadata": {"target": 0.2, "tag": "x"}},
                                         {"prompt": "a dog", "metadata": {"target": 0.8}}]
    assert read_prompts(path) == ["a cat", "a dog"]
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n a dog \n")
    assert read_prompt_records(str(txt)) == [{"prompt": "a cat", "metadata": {}}, {"prompt": "a dog", "metadata": {}}]


@pytest.mark.parametrize("line, match", [
    ("{not json", "line 2: not JSON"),
    ({"text": "a cat"}, "line 2: each line must be an object with a non-empty string \"prompt\""),
    ({"prompt": "a cat", "negative_prompt": ["blurry"]}, "line 2: \"negative_prompt\" must be a string"),
    ({"prompt": "a cat", "metadata": [1]}, "line 2: \"metadata\" must be an object"),
])
def test_bad_jsonl_lines_are_named(tmp_path, line, match):
    path = write(tmp_path / "p.jsonl", [{"prompt": "ok"}, line])
    with pytest.raises(ValueError, match=match):
        read_prompt_records(path)


def test_conditioning_fields_are_kept_for_the_model_not_the_rewards(tmp_path):
    (tmp_path / "cond.png").write_bytes(b"")  # existence is checked at load; the pixels when encoded
    path = write(tmp_path / "p.jsonl", [{"prompt": "a cat", "negative_prompt": "blurry", "target": 0.2},
                                        {"prompt": "make it blue", "image": "cond.png"}])
    image = str(tmp_path / "cond.png")
    assert read_prompt_records(path) == [
        {"prompt": "a cat", "metadata": {"target": 0.2}, "conditioning": {"negative_prompt": "blurry"}},
        {"prompt": "make it blue", "metadata": {"condition_image": image}, "conditioning": {"images": [image]}}]


def test_condition_images_are_refused_by_an_adapter_that_cannot_take_them(sd3_dir, tmp_path):  # noqa: F811
    from genalign.config import ConfigError

    (tmp_path / "cond.png").write_bytes(b"")
    path = write(tmp_path / "p.jsonl", [{"prompt": "a cat"}, {"prompt": "make it blue", "image": "cond.png"}])
    with pytest.raises(ConfigError, match=r"prompts_file .*p\.jsonl.*: SD3Policy does not take condition images, but "
                                          r"prompt 1 \('make it blue'\) has 1"):
        make_trainer(sd3_dir, tmp_path / "run", path)


def test_training_and_evaluation_pass_prompt_metadata_to_the_reward(sd3_dir, tmp_path):  # noqa: F811
    path = write(tmp_path / "p.jsonl", [{"prompt": "a cat", "target": 0.2}, {"prompt": "a dog", "target": 0.8}])
    trainer = make_trainer(sd3_dir, tmp_path / "run", path, reward="metadata_target",
                           **{"eval_prompts_file": path, "eval.num_per_prompt": 2, "eval.every": 1})
    seen = []
    name, fn, weight = trainer.reward_fn.components[0]

    def spy(images, prompts, metadata):
        seen.append((list(prompts), [m["target"] for m in metadata]))
        return fn(images=images, prompts=prompts, metadata=metadata)

    trainer.reward_fn.components[0] = (name, spy, weight)
    trainer.train()
    assert seen and all(t == {"a cat": 0.2, "a dog": 0.8}[q] for prompts, targets in seen
                        for q, t in zip(prompts, targets))
    assert any(len(p) == 4 for p, _ in seen)  # the evaluation's 2 prompts x 2 images


def test_eval_split_holds_out_part_of_one_prompt_set(tmp_path):
    """eval_split: a seeded fraction of prompts_file becomes the evaluation prompts (disjoint from training), the same
    in the trainer, in `genalign eval --config` and in the dry run."""
    from genalign.config import ConfigError, load_config
    from genalign.prompts import read_prompts, run_prompt_records
    from genalign.trainer import Trainer

    cfg = load_config("configs/digits_flow_grpo.yaml", [f"output_dir={tmp_path / 'run'}", "eval_split=0.25",
                                              "eval_prompts_file=null"])
    cfg.validate()
    train, held = run_prompt_records(cfg)
    everything = read_prompts(cfg.prompts_file)
    assert len(held) == round(0.25 * len(everything)) and len(train) + len(held) == len(everything)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert [r["prompt"] for r in held] == [p for p in everything if p in {r["prompt"] for r in held}]  # file order
    trainer = Trainer(cfg)
    assert trainer.prompts == [r["prompt"] for r in train] and trainer.eval_prompts == [r["prompt"] for r in held]
    other = load_config("configs/digits_flow_grpo.yaml", ["eval_split=0.25", "eval_prompts_file=null", "seed=1"])
    assert run_prompt_records(other)[1] != held  # drawn by the seed
    with pytest.raises(ConfigError, match="eval_prompts_file = 'digits:prompts_eval.txt' would be a second source"):
        load_config("configs/digits_flow_grpo.yaml", ["eval_split=0.25"]).validate()
    with pytest.raises(ConfigError, match="eval_split must be a fraction in \\(0, 1\\)"):
        load_config("configs/digits_flow_grpo.yaml", ["eval_split=1.5", "eval_prompts_file=null"]).validate()
