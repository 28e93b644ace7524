"""The reference-data anchor (``data.anchor_file``, genalign/objectives/anchor.py): its gradient is the weighted
flow-matching gradient, it joins the method's optimizer steps (no extra step), its options are checked, and the
shipped digits reference set holds the real training digits with their true labels."""

import json

import pytest
import torch

from genalign.config import ConfigError, load_config

from .test_decoupled import _write_digits
from .test_trainer import prompts_file  # noqa: F401


def _digits_trainer(tmp_path, *overrides):
    from genalign.trainer import Trainer

    cfg = load_config("configs/digits_flow_grpo.yaml", [f"output_dir={tmp_path / 'run'}", "eval.judge=false",
                                              "eval_prompts_file=null", "sampling.groups_per_epoch=2",
                                              "sampling.batch_size=32", "train.batch_size=8", "train.num_minibatches=2",
                                              *overrides])
    return Trainer(cfg)


def _anchor_units(trainer, epoch=0):
    a = trainer.anchor
    return a.prepare(epoch, trainer.dataset_epoch(epoch, a.dataset, trainer.cfg.data.anchor_per_epoch))


def test_anchor_gradient_is_the_weighted_flow_matching_gradient(tmp_path):
    """d loss = coef * d mean_u mean_e (v(x_s) - (eps - x0))^2 over the step's units, eps from each unit's seed."""
    data = _write_digits(tmp_path, pairs=False, n_per_digit=2)
    trainer = _digits_trainer(tmp_path, f"data.anchor_file={data}", "data.anchor_coef=2.5", "data.anchor_per_epoch=6")
    for p in trainer.params:  # LoRA B starts at zero: move it so that every weight has a gradient
        p.data.add_(0.01 * torch.randn_like(p))
    a = trainer.anchor
    u = _anchor_units(trainer)
    k = trainer.cfg.train.timestep_fraction * trainer.cfg.sampling.num_steps
    assert len(u.rows) == 6 * int(k)  # every record at every trained noise level
    ids = a.minibatches(u, 0, 0, 2)[0]
    trainer.optimizer.zero_grad(set_to_none=True)
    stats = trainer.optim.accumulate(a.backwards(u, ids))
    ours = [p.grad.clone() for p in trainer.params]

    n = a.noised(u, ids)
    x0, eps = n.x0, n.noise
    seed = int(u.seeds[ids[0]])
    torch.testing.assert_close(eps[0], torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed)))
    x_s = (1 - n.s.view(-1, 1, 1, 1)) * x0 + n.s.view(-1, 1, 1, 1) * eps
    trainer.optimizer.zero_grad(set_to_none=True)
    v = trainer.policy.predict(x_s, n.timesteps, n.sub.cond)
    mse = (v - (eps - x0)).pow(2).flatten(1).mean(1).mean()
    (2.5 * mse).backward()
    for g, p in zip(ours, trainer.params):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-8)
    assert stats["anchor/mse"].item() == pytest.approx(mse.item(), rel=1e-5)
    assert stats["loss"].item() == pytest.approx(2.5 * mse.item(), rel=1e-5)


def test_anchor_batch_size_changes_the_passes_not_the_gradient(tmp_path):
    """data.anchor_batch_size: the same step's units in fewer, larger backward passes give the same gradient."""
    data = _write_digits(tmp_path, pairs=False, n_per_digit=2)
    grads, passes = {}, {}
    for size in (None, 64):
        extra = [] if size is None else [f"data.anchor_batch_size={size}"]
        trainer = _digits_trainer(tmp_path / str(size), f"data.anchor_file={data}", "data.anchor_per_epoch=12", *extra)
        torch.manual_seed(0)
        for p in trainer.params:  # LoRA B starts at zero: move it so that every weight has a gradient
            p.data.add_(0.01 * torch.randn_like(p))
        a = trainer.anchor
        u = _anchor_units(trainer)
        ids = a.minibatches(u, 0, 0, 2)[0]
        fns = a.backwards(u, ids)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.optim.accumulate(fns)
        grads[size], passes[size] = [p.grad.clone() for p in trainer.params], (len(ids), len(fns))
    n = passes[None][0]
    assert passes[None][1] == -(-n // 8) > 1 and passes[64][1] == -(-n // 64) == 1
    for g, h in zip(grads[None], grads[64]):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7)


def test_anchor_joins_the_methods_optimizer_steps(tmp_path):
    """Same optimizer steps with and without the anchor; the anchor changes the weights and is logged."""
    data = _write_digits(tmp_path, pairs=False, n_per_digit=2)
    runs = {}
    for name, extra in (("plain", []), ("anchor", [f"data.anchor_file={data}", "data.anchor_per_epoch=8"])):
        trainer = _digits_trainer(tmp_path / name, "num_epochs=2", *extra)
        metrics = trainer.train()
        runs[name] = (trainer.global_step, [p.detach().clone() for p in trainer.params], metrics)
    assert runs["plain"][0] == runs["anchor"][0] == 2 * 2
    assert any(not torch.equal(a, b) for a, b in zip(runs["plain"][1], runs["anchor"][1]))
    m = runs["anchor"][2]
    assert m["anchor/mse"] > 0 and m["anchor/units"] == 8 * 9
    assert "anchor/mse" not in runs["plain"][2]


@pytest.mark.parametrize("levels", ["schedule", "continuous"])
def test_anchor_noise_levels(tmp_path, levels):
    """'schedule': the trained levels sigmas[j] = 1 - j / 10; 'continuous': a record's 9 units stratified over the
    whole unshifted schedule (unit j in ((8 - j) / 9, (9 - j) / 9]), the timestep 1000 s, drawn from the unit's seed
    (the same in any micro-batch)."""
    data = _write_digits(tmp_path, pairs=False, n_per_digit=2)
    trainer = _digits_trainer(tmp_path, f"data.anchor_file={data}", "data.anchor_per_epoch=6",
                              f"data.anchor_levels={levels}")
    a = trainer.anchor
    u = _anchor_units(trainer)
    ids = torch.arange(len(u.rows))
    n = a.noised(u, ids)
    j = u.steps.float()
    torch.testing.assert_close(n.timesteps, 1000 * n.s)
    if levels == "schedule":
        torch.testing.assert_close(n.s, 1 - j / 10)
        return
    assert bool(((n.s > (8 - j) / 9 - 1e-6) & (n.s <= (9 - j) / 9 + 1e-6)).all())
    assert n.s.min() > 0 and (n.s < 1 / 9 + 1e-6).sum() == 6  # every record once below the schedule's last level
    assert len(set(n.s[u.steps == 4].tolist())) == 6  # a fresh position per unit, not a fixed grid
    torch.testing.assert_close(a.noised(u, ids[5:9]).s, n.s[5:9])


def test_anchor_units_per_record(tmp_path):
    """data.anchor_units 3: three units per record, unit j in ((2 - j) / 3, (3 - j) / 3] of the unshifted schedule."""
    data = _write_digits(tmp_path, pairs=False, n_per_digit=2)
    trainer = _digits_trainer(tmp_path, f"data.anchor_file={data}", "data.anchor_per_epoch=6", "data.anchor_units=3")
    u = _anchor_units(trainer)
    assert len(u.rows) == 18 and sorted(u.steps.tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    assert sorted(u.rows.tolist()) == sorted(list(range(6)) * 3)
    n = trainer.anchor.noised(u, torch.arange(len(u.rows)))
    j = u.steps.float()
    assert bool(((n.s > (2 - j) / 3 - 1e-6) & (n.s <= (3 - j) / 3 + 1e-6)).all())
    assert trainer.anchor.stats(u) == {"anchor/units": 18.0}


def test_anchor_shift_moves_the_continuous_levels_towards_high_noise(tmp_path):
    """data.anchor_shift 3: the same stratified draws, each mapped through 3 s / (1 + 2 s) (timesteps follow)."""
    data = _write_digits(tmp_path, pairs=False, n_per_digit=2)
    opts = [f"data.anchor_file={data}", "data.anchor_per_epoch=6", "data.anchor_units=3"]
    plain = _digits_trainer(tmp_path / "plain", *opts)
    shifted = _digits_trainer(tmp_path / "shifted", *opts, "data.anchor_shift=3")
    a, b = (t.anchor.noised(_anchor_units(t), torch.arange(18)) for t in (plain, shifted))
    torch.testing.assert_close(b.s, 3 * a.s / (1 + 2 * a.s))
    assert bool((b.s >= a.s).all()) and float(b.s.median()) > float(a.s.median())


def test_anchor_options_are_checked(tmp_path):
    base = ["eval.judge=false"]
    with pytest.raises(ConfigError, match="data.anchor_file must be a .jsonl"):
        load_config("configs/digits_flow_grpo.yaml", base + ["data.anchor_file=x.txt"]).validate()
    with pytest.raises(ConfigError, match="data.anchor_coef must be > 0"):
        load_config("configs/digits_flow_grpo.yaml", base + ["data.anchor_file=x.jsonl", "data.anchor_coef=0"]).validate()
    with pytest.raises(ConfigError, match="data.anchor_per_epoch must be an int >= 1"):
        load_config("configs/digits_flow_grpo.yaml", base + ["data.anchor_file=x.jsonl", "data.anchor_per_epoch=0"]).validate()
    with pytest.raises(ConfigError, match="data.anchor_batch_size must be an int >= 1 or null"):
        load_config("configs/digits_flow_grpo.yaml", base + ["data.anchor_file=x.jsonl", "data.anchor_batch_size=0"]).validate()
    with pytest.raises(ConfigError, match="data.anchor_levels must be 'continuous' or 'schedule'"):
        load_config("configs/digits_flow_grpo.yaml", base + ["data.anchor_file=x.jsonl", "data.anchor_levels=uniform"]).validate()
    with pytest.raises(ConfigError, match="data.anchor_units must be an int >= 1"):
        load_config("configs/digits_flow_grpo.yaml", base + ["data.anchor_file=x.jsonl", "data.anchor_units=0"]).validate()
    with pytest.raises(ConfigError, match=r"data.anchor_units \(3\) needs data.anchor_levels: continuous"):
        load_config("configs/digits_flow_grpo.yaml", base + ["data.anchor_file=x.jsonl", "data.anchor_units=3",
                                                             "data.anchor_levels=schedule"]).validate()
    with pytest.raises(ConfigError, match="data.anchor_shift must be > 0"):
        load_config("configs/digits_flow_grpo.yaml", base + ["data.anchor_file=x.jsonl", "data.anchor_shift=0"]).validate()
    with pytest.raises(ConfigError, match=r"data.anchor_shift \(3\) needs data.anchor_levels: continuous"):
        load_config("configs/digits_flow_grpo.yaml", base + ["data.anchor_file=x.jsonl", "data.anchor_shift=3",
                                                             "data.anchor_levels=schedule"]).validate()
    # any method may carry an anchor: no "option of another method" refusal
    load_config("configs/digits_flow_grpo.yaml", base + ["data.anchor_file=x.jsonl"]).validate()
    load_config("configs/digits_flow_grpo.yaml", base + ["method=diffusion_nft", "data.anchor_file=x.jsonl"]).validate()
    with pytest.raises(ConfigError, match="data.anchor_file .*missing.jsonl' does not exist"):
        _digits_trainer(tmp_path, f"data.anchor_file={tmp_path / 'missing.jsonl'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "one"}\n')
    with pytest.raises(ConfigError, match="data.anchor_file .*bad.jsonl' line 1: needs an image path in 'image'"):
        _digits_trainer(tmp_path, f"data.anchor_file={bad}")


def test_anchor_refuses_ddpm_models(tmp_path, prompts_file):  # noqa: F811
    from .test_trainer import make_trainer
    from .tiny_models import save_pipeline, tiny_sd

    data = _write_digits(tmp_path, pairs=False, n_per_digit=1)
    path = save_pipeline(tiny_sd(with_text_encoders=True), tmp_path / "sd")
    with pytest.raises(ConfigError, match="data.anchor_file trains on the flow-matching loss, which needs a "
                                          "flow-matching model; DDPMPolicy .*\\(remove data.anchor_file\\)"):
        make_trainer(path, tmp_path / "run", prompts_file, **{"sampling.step_kind": "ddim", "sampling.noise_level": 1.0,
                                                              "data.anchor_file": str(data)})


def test_shipped_reference_set_is_the_train_split_with_true_labels():
    from genalign.datasets import read_image_records
    from genalign.pipelines.digits import DigitsPolicy, load_split, prompt_digit
    from genalign.pipelines.digits_pretrain import EVAL_TEMPLATES, TRAIN_TEMPLATES, fill
    from genalign.prompts import resolve_prompts_path

    x_tr, y_tr, _, _ = load_split()
    records = read_image_records("digits:reference_train.jsonl", "image", "data.anchor_file")
    assert len(records) == len(y_tr)
    raw = [json.loads(line) for line in open(resolve_prompts_path("digits:reference_train.jsonl"))]
    train_prompts = {fill(t, d) for t in TRAIN_TEMPLATES for d in range(10)}
    eval_prompts = {fill(t, d) for t in EVAL_TEMPLATES for d in range(10)}
    assert [r["digit"] for r in raw] == y_tr.tolist()
    assert all(prompt_digit(r["prompt"]) == r["digit"] and r["prompt"] in train_prompts for r in raw)
    assert not {r["prompt"] for r in raw} & eval_prompts
    from genalign.datasets import load_image

    policy = DigitsPolicy.from_pretrained("digits")
    pixels = torch.stack([load_image(r["images"][0], 8, 8) for r in records[:50]])
    torch.testing.assert_close(policy.encode_images(pixels), x_tr[:50], atol=1.001 / 255, rtol=0)  # uint8 PNGs


def test_shipped_two_caption_set_is_each_reference_image_under_two_training_phrasings():
    """The default's anchor file: the reference set's images and labels, each under its own phrasing and the next
    training template's; no evaluation phrasing, so the judge's prompts stay unseen."""
    from genalign.pipelines.digits_pretrain import TRAIN_TEMPLATES, fill
    from genalign.prompts import resolve_prompts_path

    one = [json.loads(line) for line in open(resolve_prompts_path("digits:reference_train.jsonl"))]
    two = [json.loads(line) for line in open(resolve_prompts_path("digits:reference_train_two_captions.jsonl"))]
    assert len(two) == 2 * len(one)
    for i, r in enumerate(one):
        a, b = two[2 * i], two[2 * i + 1]
        assert a == r and b["image"] == r["image"] and b["digit"] == r["digit"]
        assert b["prompt"] == fill(TRAIN_TEMPLATES[(i + 1) % len(TRAIN_TEMPLATES)], r["digit"]) != a["prompt"]
