"""DRAGON distributional rewards: Frechet distance and Vendi numerics, set -> per-sample conversion,
encoders, reference sets (errors, cache) and the registered rewards.

The Diffusion-DPO / -KTO losses are checked against hand-computed values in
tests/test_losses.py::test_diffusion_dpo_and_kto_hand_computed."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from genalign.rewards import RewardSet
from genalign.rewards.distributional import (DinoEncoder, DigitsEncoder, feature_stats, frechet_distance,
                                             greedy_split, leave_one_out, load_references, reference_features,
                                             vendi_score)


def tiny_dino_dir(directory) -> str:
    """A tiny random DINOv2 saved with save_pretrained (hidden 32, 2 layers, 28 px -> 4 patch tokens)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       patch_size=14, image_size=28)
    Dinov2Model(cfg).save_pretrained(str(directory))
    prep = {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}, "do_center_crop": True,
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    (Path(directory) / "preprocessor_config.json").write_text(json.dumps(prep))
    return str(directory)


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return tiny_dino_dir(tmp_path_factory.mktemp("dino"))


def digit_images(n: int = 40, offset: int = 0) -> torch.Tensor:
    from genalign.pipelines.digits_pretrain import load_split

    x = load_split()[2][offset:offset + n]
    return ((x + 1) / 2).expand(-1, 3, -1, -1)


def test_frechet_distance_matches_scipy_reference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 6)), rng.normal(loc=0.5, scale=1.5, size=(40, 6)) @ rng.normal(size=(6, 6))
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    got = frechet_distance(*feature_stats(torch.tensor(a)), *feature_stats(torch.tensor(b)))
    assert got.item() == pytest.approx(expected, rel=1e-8)
    # singular covariances (fewer samples than dimensions) stay finite and ~0 for identical sets
    few = torch.randn(4, 10)
    assert abs(frechet_distance(*feature_stats(few), *feature_stats(few)).item()) < 1e-6


def test_vendi_identical_is_one_and_orthogonal_is_n():
    assert vendi_score(torch.ones(5, 3)).item() == pytest.approx(1.0, abs=1e-6)
    assert vendi_score(torch.eye(6) * 3).item() == pytest.approx(6.0, abs=1e-6)


def test_leave_one_out_and_greedy_split_on_a_toy_set_reward():
    # set reward: -(distance of the set's mean to 0); x = 0 improves, outliers hurt
    values = torch.tensor([[0.0], [0.1], [5.0], [-0.2], [3.0], [0.05]])
    score = lambda f: -float(f.mean(0).abs().sum())
    loo = leave_one_out(score, values)
    assert loo.argmin().item() == 2 and loo[2] < 0 < loo[0]
    pos = greedy_split(score, values, num_pos=3)
    assert pos.sum().item() == 3 and not pos[2] and not pos[4]
    # greedy swaps from a bad start until no swap improves r(D+)
    start = torch.tensor([False, False, True, False, True, True])
    pos = greedy_split(score, values, init=start)
    assert pos.sum().item() == 3 and score(values[pos]) > score(values[start])
    assert not pos[2] and not pos[4]


def test_digits_encoder_shapes_and_exemplar_and_set_rewards(tmp_path):
    real, fake = digit_images(60), torch.rand(12, 3, 8, 8)
    enc = DigitsEncoder()
    assert enc.encode(real[:3]).shape == (3, 128) and enc.tokens(real[:3]).shape == (3, 16, 64)
    opts = {"encoder": "digits", "references": real, "cache_dir": str(tmp_path / "cache")}
    rewards = RewardSet({"exemplar_similarity": 1.0, "frechet_set": 1.0, "vendi": 1.0, "frechet_instance": 1.0},
                        {"exemplar_similarity": {**opts, "mode": "knn", "k": 3}, "frechet_set": opts,
                         "vendi": {"encoder": "digits"}, "frechet_instance": opts})
    batch = torch.cat([digit_images(6, offset=100), fake[:6]])
    total, parts = rewards(batch, ["x"] * 12)
    assert total.shape == (12,)
    assert parts["exemplar_similarity"][:6].mean() > parts["exemplar_similarity"][6:].mean()  # real digits closer
    assert parts["frechet_set"][:6].mean() > parts["frechet_set"][6:].mean()  # removing noise lowers the FD
    assert parts["frechet_instance"][:6].mean() > parts["frechet_instance"][6:].mean()
    assert parts["frechet_set.fd"].unique().numel() == 1 and parts["vendi.vendi"][0] >= 1
    assert len(list((tmp_path / "cache").iterdir())) == 2  # embeddings + tokens, keyed by content
    feats = reference_features(enc, real, cache_dir=str(tmp_path / "cache"))  # a cache hit
    assert torch.allclose(feats, enc.encode(real))


def test_dino_encoder_from_path_patch_and_crop_sets(dino_dir, tmp_path):
    enc = DinoEncoder(dino_dir)
    images = torch.rand(3, 3, 28, 28)
    cls, patches = enc.cls_and_patches(images)
    assert cls.shape == (3, 32) and patches.shape[0] == 3 and patches.shape[2] == 32
    from genalign.rewards.distributional import InstanceFrechet

    crops = InstanceFrechet(references=torch.rand(4, 3, 28, 28), source="crops", grid=2,
                            encoder="dino", encoder_options={"model": dino_dir})
    assert crops(images).shape == (3,) and torch.isfinite(crops(images)).all()


def test_bad_reference_sets_are_clear_errors(dino_dir, tmp_path):
    enc = DigitsEncoder()
    with pytest.raises(ValueError, match="empty"):
        load_references([], enc)
    with pytest.raises(ValueError, match=r"\[M, 3, H, W\]"):
        load_references(torch.rand(4, 5, 8, 8), enc)
    with pytest.raises(ValueError, match="texts but encoder DigitsEncoder embeds only images"):
        load_references(["a photo of a cat", "a dog"], enc)
    with pytest.raises(ValueError, match="does not exist"):
        load_references(str(tmp_path / "missing"), enc)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_references(str(tmp_path / "empty"), enc)
    with pytest.raises(ValueError, match="at least 2"):
        RewardSet("frechet_set", {"frechet_set": {"encoder": "digits", "references": torch.rand(1, 3, 8, 8)}})
    with pytest.raises(ValueError, match="unknown encoder"):
        RewardSet("vendi", {"vendi": {"encoder": "nope"}})
