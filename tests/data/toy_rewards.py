"""Reward scripts used by the tests (loaded with 'tests/data/toy_rewards.py:NAME')."""

import torch


def brightness(images, prompts, metadata):
    """Mean pixel value: easy to raise, so a few steps show learning."""
    return images.mean(dim=(1, 2, 3))


def nan_for_second(images, prompts, metadata):
    scores = images.mean(dim=(1, 2, 3)).clone()
    scores[1] = float("nan")
    return scores


def too_short(images, prompts, metadata):
    return torch.zeros(len(prompts) - 1)


def raises(images, prompts, metadata):
    raise RuntimeError("reward server unreachable")


def named_parts(images, prompts, metadata):
    return {"score": images.mean(dim=(1, 2, 3)), "contrast": images.std(dim=(1, 2, 3))}


def flat_for_cat(images, prompts, metadata):
    """Constant for 'a cat' (a zero-variance group: no GRPO signal), brightness otherwise."""
    scores = images.mean(dim=(1, 2, 3))
    return torch.stack([torch.zeros(()) if p == "a cat" else s for p, s in zip(prompts, scores)])


def constant(images, prompts, metadata):
    return torch.ones(len(prompts))


def metadata_target(images, prompts, metadata):
    """Brightness towards each prompt's metadata 'target' (a .jsonl prompt file's field); raises without it."""
    targets = torch.tensor([float(m["target"]) for m in metadata])
    return -(images.mean(dim=(1, 2, 3)) - targets).abs()


class RankInGroup:
    """A group-level reward: each image's brightness rank within its prompt group, scaled to [0, 1]. Records the
    groups it was called with."""

    group_level = True

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts, metadata):
        self.calls.append(([m["group"] for m in metadata], list(prompts)))
        ranks = images.mean(dim=(1, 2, 3)).argsort().argsort().float()
        return ranks / max(len(prompts) - 1, 1)
