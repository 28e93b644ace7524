"""Reward protocol, validation, multi-rewards and every built-in reward through its real loading code.

Built-in reward models are tiny random models built offline, saved to a temporary directory and loaded
by path (no downloads). Semantic checks are the cheap ones a random model still satisfies.
"""

import json
import warnings
from pathlib import Path

import pytest
import torch

from genalign.policy import ModelNotAvailableError
from genalign.rewards import RewardError, RewardSet, load_reward, register_reward, score_reward, validate_scores
from tests.tiny_models import tiny_clip_tokenizer

TOY = Path(__file__).parent / "data" / "toy_rewards.py"
PROMPTS = ["a red cube", "a blue ball", "two cats", "a tree"]
TINY_OPEN_CLIP = "genalign-test-tiny-clip"


def images(n=4, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- validation
class Fixed:
    """A reward returning fixed scores (and recording its calls)."""

    def __init__(self, scores, **attrs):
        self.scores, self.calls = scores, []
        self.__dict__.update(attrs)

    def __call__(self, images, prompts, metadata):
        self.calls.append(len(prompts))
        return self.scores(images, prompts) if callable(self.scores) else self.scores


@pytest.mark.parametrize("scores,match", [
    (torch.zeros(3), r"'bad' returned scores of shape \(3,\) for 4 samples"),
    (torch.zeros(4, 2), r"shape \(4, 2\)"),
    (torch.tensor([0.0, float("nan"), 1.0, float("inf")]), r"NaN/inf for samples \[#1 'a blue ball', #3 'a tree'\]"),
    (["a", "b", "c", "d"], "not numeric"),
    (torch.ones(4, dtype=torch.bool), "non-numeric scores of dtype torch.bool"),
    (object(), "returned object, which is not numeric"),
    ({}, "returned an empty dict"),
    ({"score": torch.zeros(4), "extra": torch.zeros(2)}, r"'bad.extra' returned scores of shape \(2,\)"),
])
def test_invalid_scores_raise_reward_error_naming_reward(scores, match):
    with pytest.raises(RewardError, match=match) as info:
        score_reward("bad", Fixed(scores), images(), PROMPTS)
    assert info.value.reward.startswith("bad")


def test_nan_error_lists_indices_and_exception_is_wrapped():
    with pytest.raises(RewardError) as info:
        validate_scores("r", [1.0, float("nan"), 2.0, float("nan")], PROMPTS)
    assert info.value.indices == [1, 3]

    def boom(images, prompts, metadata):
        raise ValueError("model exploded")

    with pytest.raises(RewardError, match="'boom' raised ValueError: model exploded") as info:
        RewardSet(boom)(images(), PROMPTS)
    assert info.value.reward == "boom" and isinstance(info.value.__cause__, ValueError)


def test_accepted_score_forms_become_float32_cpu():
    import numpy as np

    for scores in ([1, 2, 3, 4], np.arange(4), torch.arange(4), torch.ones(4, 1, dtype=torch.float64),
                   torch.ones(4, requires_grad=True) * 2):
        out = validate_scores("r", scores, PROMPTS)
        assert out.shape == (4,) and out.dtype == torch.float32 and out.device.type == "cpu" and not out.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_scores_on_another_device_are_moved_to_cpu():
    total, parts = RewardSet(Fixed(torch.arange(4.0, device="cuda")))(images(), PROMPTS)
    assert total.device.type == "cpu" and parts["Fixed"].device.type == "cpu"


def test_batch_size_hint_chunks_and_reports_global_indices():
    reward = Fixed(lambda im, p: im.mean(dim=(1, 2, 3)), batch_size=3)
    total, _ = RewardSet(reward)(images(7), PROMPTS + PROMPTS[:3])
    assert reward.calls == [3, 3, 1] and torch.allclose(total, images(7).mean(dim=(1, 2, 3)))

    def nan_at_5(im, p):
        return torch.tensor([float("nan") if p[i] == "two cats" and len(p) == 3 and i == 2 else 0.0
                             for i in range(len(p))])

    with pytest.raises(RewardError, match=r"#5 'two cats'") as info:
        score_reward("chunky", Fixed(nan_at_5, batch_size=3), images(7), ["x"] * 5 + ["two cats", "x"])
    assert info.value.indices == [5]

    def fail_second(im, p):
        if fail_second.n:
            raise RuntimeError("down")
        fail_second.n += 1
        return torch.zeros(len(p))

    fail_second.n = 0
    with pytest.raises(RewardError, match=r"raised RuntimeError on samples 3..5: down"):
        score_reward("chunky", Fixed(fail_second, batch_size=3), images(7), PROMPTS + PROMPTS[:3])
    keys = iter([{"a": torch.zeros(3)}, {"b": torch.zeros(1)}])
    with pytest.raises(RewardError, match="different sub-scores"):
        score_reward("chunky", Fixed(lambda im, p: next(keys), batch_size=3), images(4), PROMPTS)


def test_set_level_reward_gets_whole_batch_and_device_hint_moves_images():
    seen = []

    def contributions(im, p):
        seen.append(im.device)
        return im.mean(dim=(1, 2, 3)) - im.mean()

    reward = Fixed(contributions, set_level=True, batch_size=2, device="cpu")
    out = score_reward("set", reward, images(), PROMPTS)[""]
    assert reward.calls == [4] and seen == [torch.device("cpu")] and abs(out.sum().item()) < 1e-5


def test_multi_reward_weights_options_and_components():
    spec = {"jpeg_compressibility": 1.0, f"{TOY}:named_parts": 0.5, f"{TOY}:brightness": -2.0}
    rs = RewardSet(spec, {"jpeg_compressibility": {"normalize": True}})
    x = images()
    total, parts = rs(x, PROMPTS)
    assert set(parts) == {"jpeg_compressibility", f"{TOY}:named_parts", f"{TOY}:named_parts.score",
                          f"{TOY}:named_parts.contrast", f"{TOY}:brightness"}
    expected = parts["jpeg_compressibility"] + 0.5 * x.mean(dim=(1, 2, 3)) - 2.0 * x.mean(dim=(1, 2, 3))
    assert torch.allclose(total, expected, atol=1e-6)
    assert -0.2 < parts["jpeg_compressibility"].mean() < 0  # kB / 500
    with pytest.raises(ValueError, match="finite number"):
        RewardSet({"jpeg_compressibility": float("nan")})
    with pytest.raises(ValueError, match="empty"):
        RewardSet({})
    with pytest.raises(ValueError, match="unknown reward 'nope'.*pickscore"):
        RewardSet("nope")


def test_script_options_and_unused_options_warning(tmp_path):
    script = tmp_path / "opt_reward.py"
    script.write_text("import torch\n"
                      "def scaled(images, prompts, metadata, factor=1.0):\n"
                      "    return factor * torch.ones(len(prompts))\n"
                      "class Offset:\n"
                      "    def __init__(self, offset=0.0):\n"
                      "        self.offset = offset\n"
                      "    def __call__(self, images, prompts, metadata):\n"
                      "        return torch.full((len(prompts),), self.offset)\n")
    spec = {f"{script}:scaled": 1.0, f"{script}:Offset": 1.0}
    total, _ = RewardSet(spec, {f"{script}:scaled": {"factor": 3.0}, f"{script}:Offset": {"offset": 0.5}})(
        images(), PROMPTS)
    assert torch.allclose(total, torch.full((4,), 3.5))
    with pytest.warns(UserWarning, match="pickscore"):
        RewardSet(f"{script}:scaled", {"pickscore": {"normalize": True}})


_DEVICES_SEEN = []


@register_reward("test_device_probe")
def _device_probe(device=None):
    _DEVICES_SEEN.append(device)
    return lambda images, prompts, metadata: torch.zeros(len(prompts))


def test_reward_set_device_default_reaches_factories():
    RewardSet("test_device_probe", device="cpu")
    RewardSet("test_device_probe", {"test_device_probe": {"device": "meta"}}, device="cpu")
    RewardSet({"test_device_probe": 1.0, "jpeg_compressibility": 1.0}, device="cpu")  # jpeg takes no device
    assert _DEVICES_SEEN == ["cpu", "meta", "cpu"]


# ------------------------------------------------------------------------------------------------ jpeg
def test_jpeg_noise_is_less_compressible_than_flat():
    x = torch.cat([torch.full((1, 3, 64, 64), 0.5), torch.rand(1, 3, 64, 64)])
    comp = load_reward("jpeg_compressibility")(images=x, prompts=["a", "b"], metadata=None)
    incomp = load_reward("jpeg_incompressibility", normalize=True)(images=x, prompts=["a", "b"], metadata=None)
    assert comp[0] > comp[1] and comp[1] < 0 and incomp[1] > incomp[0] > 0
    assert torch.allclose(incomp * 500, -comp)


# ------------------------------------------------------------------------------------ tiny model builders
@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    """Tiny transformers CLIP (projection 768, so the aesthetic MLP fits) + tokenizer + 32 px processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=768,
    )
    path = tmp_path_factory.mktemp("hf_clip")
    CLIPModel(config).save_pretrained(path)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tiny_clip_tokenizer())
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def open_clip_weights(tmp_path_factory):
    """A tiny open_clip architecture registered under TINY_OPEN_CLIP; its weights as .safetensors and as .pt."""
    import open_clip
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("open_clip")
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (path / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(path / f"{TINY_OPEN_CLIP}.json")
    torch.manual_seed(0)
    state = {k: v.clone().contiguous() for k, v in open_clip.create_model(TINY_OPEN_CLIP).state_dict().items()}
    save_file(state, str(path / "tiny.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path / "hps_like.pt")
    return path


def test_clip_score_from_local_safetensors(open_clip_weights):
    weights = str(open_clip_weights / "tiny.safetensors")
    reward = load_reward("clip_score", model_name=TINY_OPEN_CLIP, pretrained=weights, device="cpu")
    scores = score_reward("clip_score", reward, images(), PROMPTS)[""]
    assert scores.shape == (4,) and torch.isfinite(scores).all() and ((scores >= 0) & (scores <= 2.5)).all()
    assert torch.allclose(scores, 2.5 * reward.cosine(images(), PROMPTS).clamp(min=0))
    assert reward.cosine(images(), PROMPTS).abs().max() <= 1 + 1e-5


def test_hpsv2_from_torch_checkpoint_with_state_dict_wrapper(open_clip_weights):
    reward = load_reward("hpsv2", checkpoint=str(open_clip_weights / "hps_like.pt"), model_name=TINY_OPEN_CLIP,
                         device="cpu", batch_size=3)
    clip = load_reward("clip_score", model_name=TINY_OPEN_CLIP, pretrained=str(open_clip_weights / "tiny.safetensors"),
                       device="cpu")
    total, _ = RewardSet(reward)(images(), PROMPTS)
    assert torch.allclose(total, clip.cosine(images(), PROMPTS), atol=1e-5)  # same weights, read both ways


def test_pickscore_and_aesthetic_from_local_dirs(hf_clip_dir, tmp_path):
    pick = load_reward("pickscore", model=hf_clip_dir, processor=hf_clip_dir, device="cpu")
    raw = score_reward("pickscore", pick, images(size=48), PROMPTS)[""]
    scale = pick.model.logit_scale.exp().item()
    assert raw.shape == (4,) and (raw.abs() <= scale + 1e-4).all()  # logit_scale * cos, cos in [-1, 1]
    normalized = load_reward("pickscore", model=hf_clip_dir, processor=hf_clip_dir, normalize=True, device="cpu")
    assert torch.allclose(normalized(images=images(size=48), prompts=PROMPTS, metadata=None) * 26, raw, atol=1e-4)

    from genalign.rewards.aesthetic import AestheticMLP

    torch.manual_seed(1)
    torch.save(AestheticMLP().state_dict(), tmp_path / "mlp.pth")
    aesthetic = load_reward("aesthetic", clip_model=hf_clip_dir, mlp=str(tmp_path / "mlp.pth"), device="cpu")
    scores = score_reward("aesthetic", aesthetic, images(), PROMPTS)[""]
    assert scores.shape == (4,) and torch.isfinite(scores).all()


def test_preprocessing_is_differentiable(hf_clip_dir):
    pick = load_reward("pickscore", model=hf_clip_dir, processor=hf_clip_dir, device="cpu")
    x = images(2, size=40).requires_grad_(True)
    pick(images=x, prompts=PROMPTS[:2], metadata=None).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in pick.model.parameters())


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dino")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                             patch_size=14, image_size=28)).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return str(path)


def test_dino_similarity_identical_image_scores_highest(dino_dir, tmp_path):
    from PIL import Image

    refs = (images(2, size=28, seed=1) * 255).round() / 255  # what PNG files hold
    (tmp_path / "refs").mkdir()
    for i, ref in enumerate(refs):
        Image.fromarray((ref * 255).round().byte().permute(1, 2, 0).numpy()).save(tmp_path / "refs" / f"{i}.png")
    candidates = torch.stack([refs[0], images(1, size=28, seed=2)[0]])
    for references in (str(tmp_path / "refs"), refs):
        reward = load_reward("dino_similarity", references=references, model=dino_dir, device="cpu")
        scores = score_reward("dino_similarity", reward, candidates, ["x", "y"])[""]
        assert scores[0] > scores[1] and abs(scores[0].item() - 1) < 1e-4
    mean = load_reward("dino_similarity", references=refs, model=dino_dir, reduce="mean", device="cpu")
    assert mean(images=candidates, prompts=["x", "y"], metadata=None)[0] < 1 - 1e-4
    with pytest.raises(ValueError, match="needs references"):
        load_reward("dino_similarity", model=dino_dir)


# ----------------------------------------------------------------------------- offline and optional extras
@pytest.mark.parametrize("name,options,what", [
    ("pickscore", {}, "yuvalkirstain/PickScore_v1"),
    ("aesthetic", {}, "openai/clip-vit-large-patch14"),
    ("dino_similarity", {"references": torch.zeros(1, 3, 8, 8)}, "facebook/dinov2-base"),
    ("clip_score", {}, "timm/vit_base_patch32_clip_224.openai"),
    ("hpsv2", {}, "hf download xswu/HPSv2 HPS_v2.1_compressed.pt"),
])
def test_offline_uncached_ids_say_what_to_fetch(monkeypatch, name, options, what):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="hf download") as info:
        load_reward(name, device="cpu", **options)
    assert what in str(info.value)


def test_aesthetic_mlp_path_missing_is_clear(hf_clip_dir, tmp_path):
    with pytest.raises(ModelNotAvailableError, match="aesthetic MLP weights file .* does not exist"):
        load_reward("aesthetic", clip_model=hf_clip_dir, mlp=str(tmp_path / "missing.pth"))


def test_imagereward_needs_its_package():
    try:
        import ImageReward  # noqa: F401
        pytest.skip("image-reward is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"pip install 'genalign\[imagereward\]'"):
        load_reward("imagereward")


def test_ocr_text_matching_and_engine():
    from genalign.rewards.ocr import edit_distance, target_text, text_match

    assert edit_distance("kitten", "sitting") == 3
    assert target_text('a sign that says "Hello World"') == "Hello World"
    assert target_text("no quotes", {"text": "abc"}) == "abc"
    assert text_match("hello  world", "Hello World") == 1.0 and text_match("", "abcd") == 0.0
    assert text_match("abXd", "abcd") == 0.75
    with pytest.raises(ValueError, match="in quotes"):
        target_text("no quotes at all")
    try:
        import rapidocr_onnxruntime  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"genalign\[ocr\]"):
            load_reward("ocr")
        return
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.new("RGB", (96, 48), "white")
    ImageDraw.Draw(canvas).text((6, 12), "HI", fill="black", font=ImageFont.load_default(size=22))
    drawn = torch.tensor(list(canvas.getdata()), dtype=torch.float32).view(48, 96, 3).permute(2, 0, 1)[None] / 255
    x = torch.cat([drawn, torch.ones(1, 3, 48, 96)])
    scores = load_reward("ocr")(images=x, prompts=['a sign "HI"', 'a sign "HI"'], metadata=None)
    assert scores.tolist() == [1.0, 0.0]


def test_available_rewards_lists_builtins():
    from genalign.rewards import available_rewards

    assert {"pickscore", "hpsv2", "aesthetic", "clip_score", "imagereward", "dino_similarity", "jpeg_compressibility",
            "jpeg_incompressibility", "digit_correct", "ocr", "remote"} <= set(available_rewards())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="needs a url"):
            load_reward("remote")
