"""One method vocabulary: ``method:`` names a typed spec (genalign.method_specs) that gives the objective, the
defaults, the method-specific validation and the epoch plan; the digits config of every method loads."""

import dataclasses
import glob
import os

import pytest
import torch

from genalign import methods
from genalign.config import Config, ConfigError, load_config
from genalign.method_specs import METHODS, MethodSpec, get_method, register_method
from genalign.prompts import KRepeatSampler, read_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits_flow_grpo.yaml")
ALL = ["adv_grpo", "awm", "dgpo", "diffusion_dpo", "diffusion_nft", "dragon", "flow_grpo", "flow_grpo_fast", "grpo_guard",
       "mixgrpo", "sft", "tempflow_grpo"]
FORWARD_PROCESS = {"awm", "dgpo", "diffusion_dpo", "diffusion_nft", "sft"}  # clean samples, any sampler
ADV = ["reward=adversarial", "reward_options.adversarial.references=runs/digits_references"]
FULL_SDE = {"flow_grpo", "grpo_guard", "dragon", "adv_grpo"}


def digits_config(method: str, *overrides: str) -> Config:
    """configs/digits_flow_grpo.yaml under ``method`` (adv_grpo: with its reward and references)."""
    return load_config(DIGITS, [f"method={method}", *(ADV if method == "adv_grpo" else []), *overrides])


def base_levels(cfg: Config) -> torch.Tensor:
    levels = torch.full((cfg.sampling.num_steps,), float(cfg.sampling.noise_level))
    if cfg.sampling.last_step_deterministic:
        levels[-1] = 0.0
    return levels


def check_plan(cfg: Config, epoch: int, world: int = 2) -> methods.EpochPlan:
    """The plan of ``epoch`` is rectangular, identical on every rank, and trains stochastic trainable steps."""
    n_prompts = len(read_prompts(cfg.prompts_file))
    plans = []
    for rank in range(world):
        _, group_ids, _ = KRepeatSampler(n_prompts, cfg.sampling.groups_per_epoch, cfg.sampling.group_size, cfg.seed,
                                         world, rank).epoch(epoch)
        plan = methods.plan_epoch(cfg, epoch, group_ids, base_levels(cfg))
        direct = cfg.method_spec().plan(cfg, epoch, group_ids, base_levels(cfg))  # plan_epoch only delegates
        assert torch.equal(plan.levels, direct.levels) and torch.equal(plan.train_steps, direct.train_steps)
        plans.append(plan)
    plan = plans[0]
    N, T = cfg.samples_per_epoch, cfg.sampling.num_steps
    assert plan.levels.shape == (N, T) and plan.train_steps.ndim == 2 and plan.train_steps.shape[0] == N
    assert plan.train_steps.shape[1] >= 1 and plan.train_steps.dtype == torch.long and plan.model_calls > 0
    for other in plans[1:]:
        assert torch.equal(other.levels, plan.levels) and torch.equal(other.train_steps, plan.train_steps)
    if cfg.method in FORWARD_PROCESS:  # forward-process training: any sampler, the first levels trained
        assert torch.equal(plan.levels, base_levels(cfg).expand(N, T))
        assert (plan.train_steps == methods.nft_steps(cfg)).all()
        return plan
    assert set(plan.train_steps.flatten().tolist()) <= set(cfg.trainable_steps())
    assert (plan.levels.gather(1, plan.train_steps) > 0).all()  # every trained step is stochastic
    if cfg.method in FULL_SDE:
        assert torch.equal(plan.levels, base_levels(cfg).expand(N, T))
        assert (plan.train_steps == torch.tensor(cfg.trainable_steps())).all()
    else:  # windows / branches: stochastic exactly where trained
        trained = torch.zeros(N, T, dtype=torch.bool).scatter_(1, plan.train_steps, True)
        assert torch.equal(plan.levels > 0, trained)
    return plan


@pytest.mark.parametrize("name", ALL)
def test_every_method_validates_and_plans_on_the_digits_config(name):
    assert sorted(METHODS) == ALL
    cfg = digits_config(name)
    cfg.validate()
    spec = cfg.method_spec()
    assert isinstance(spec, MethodSpec) and dataclasses.is_dataclass(spec) and spec.name == name == cfg.method
    assert spec.objective == {"dragon": "dragon", "diffusion_dpo": "dragon", "diffusion_nft": "nft", "awm": "awm",
                              "dgpo": "dgpo", "sft": "sft"}.get(name, "policy_gradient")
    for epoch in (0, 1, 7):
        plan = check_plan(cfg, epoch)
    if name == "tempflow_grpo":
        assert plan.branch_step is not None and plan.train_steps.shape[1] == 1
        assert plan.model_calls < cfg.samples_per_epoch * cfg.sampling.num_steps  # main ODE shared by branches
    if name in ("flow_grpo_fast", "mixgrpo"):
        assert plan.train_steps.shape[1] == {"flow_grpo_fast": 2, "mixgrpo": 4}[name]


def test_every_objective_name_is_a_registered_objective():
    objectives = pytest.importorskip("genalign.objectives")
    getattr(objectives, "_load_builtins", lambda: None)()  # the built-in objectives register on import
    for name in METHODS:
        assert get_method(name).objective in objectives.OBJECTIVES, name


def test_default_method_is_flow_grpo():
    cfg = load_config(None)
    assert cfg.method == "flow_grpo" and type(cfg.method_spec()).__name__ == "FlowGRPO"
    assert Config().method_spec().objective == "policy_gradient"


def test_every_digits_config_loads_and_validates():
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "digits_*.yaml")))
    found = {os.path.basename(p)[len("digits_"):-len(".yaml")] for p in paths}
    assert found == set(ALL)  # one runnable config per method on the small model
    for path in paths:
        cfg = load_config(path)
        cfg.validate()
        name = os.path.basename(path)[len("digits_"):-len(".yaml")]
        assert cfg.method == name and cfg.model.id == "digits"
        assert cfg.output_dir == f"runs/digits_{name}"
        check_plan(cfg, 0)
    default = load_config(os.path.join(ROOT, "configs", "digits.yaml"))  # the default run: the wide model
    default.validate()
    assert default.method == "flow_grpo" and default.model.id == "digits_wide" and default.output_dir == "runs/digits"
    check_plan(default, 0)


def test_train_mode_is_refused(tmp_path):
    for value in ("dragon", "grpo"):
        with pytest.raises(ConfigError, match="train.mode was replaced by method: dragon"):
            load_config(None, [f"train.mode={value}"])
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  mode: dragon\n")
    with pytest.raises(ConfigError, match="train.mode was replaced by method: dragon"):
        load_config(str(path))
    assert "mode" not in {f.name for f in dataclasses.fields(Config().train)}


def test_unknown_method_lists_the_valid_ones():
    for bad in (["method=nope"], ["method=null"], ["method=train.mode"]):
        with pytest.raises(ConfigError, match="method") as info:
            load_config(None, bad)
        assert all(name in str(info.value) for name in ALL)
    cfg = Config()
    cfg.method = "dragonn"
    with pytest.raises(ConfigError, match="choose one of"):
        cfg.validate()


def test_explicit_keys_override_method_defaults():
    cfg = load_config(None, ["method=grpo_guard", "train.step_weighting=none"])
    assert cfg.train.ratio_norm and cfg.train.step_weighting == "none"
    cfg = load_config(None, ["method=flow_grpo_fast", "sampling.window.size=3"])
    assert cfg.sampling.window == {"kind": "fast", "size": 3}  # merged with the method's window
    cfg = load_config(DIGITS, ["method=tempflow_grpo", "sampling.branching.steps=all", "sampling.branching.seeds=1",
                               "sampling.branching.branches=2"])
    assert cfg.sampling.branching == {"seeds": 1, "branches": 2, "steps": "all"} and cfg.train.step_weighting == "noise_aware"
    cfg.validate()  # 1 seed x 2 branches x 8 trainable steps = 16 = group_size
    cfg = load_config(DIGITS, ["method=mixgrpo"])
    assert cfg.window_spec() == {"kind": "mixgrpo", "size": 4, "shift_every": 25, "stride": 1, "schedule": "wrap"}
    cfg.sampling.window["size"] = 1  # the method's defaults are copied, never shared
    assert load_config(DIGITS, ["method=mixgrpo"]).sampling.window["size"] == 4
    assert get_method("mixgrpo").defaults["sampling"]["window"]["size"] == 4
    # adv_grpo's reward default applies only when neither the YAML nor the overrides give a reward
    assert load_config(None, ["method=adv_grpo"]).reward == "adversarial"
    assert load_config(None, ["method=adv_grpo", "reward={adversarial: 1.0, digit_correct: 0.5}"]).reward == {
        "adversarial": 1.0, "digit_correct": 0.5}
    assert load_config(DIGITS, ["method=adv_grpo"]).reward == "digit_correct"  # explicit: refused by validate
    assert load_config(None, ["method=dragon"]).method_spec().objective == "dragon"


@pytest.mark.parametrize("overrides,key", [
    (["method=flow_grpo_fast", "sampling.window=null"], "sampling.window"),
    (["method=flow_grpo_fast", "sampling.window.kind=mixgrpo"], "sampling.window.kind"),
    (["method=flow_grpo_fast", "sampling.window.max_start=9"], "sampling.window.max_start"),
    (["method=mixgrpo", "sampling.window.stride=-1"], "sampling.window.stride"),
    (["method=mixgrpo", "sampling.window.shift_every=0"], "sampling.window.shift_every"),
    (["method=tempflow_grpo", "sampling.group_size=12"], "sampling.group_size"),
    (["method=tempflow_grpo", "sampling.branching=null"], "sampling.branching"),
    (["method=tempflow_grpo", "sampling.branching.branches=1"], "sampling.branching.branches"),
    (["method=tempflow_grpo", "train.dynamic_sampling=true"], "train.dynamic_sampling"),
    (["method=dragon", "dragon.pairing=unpaired"], "dragon.pairing"),
    (["method=dragon", "dragon.beta=0"], "dragon.beta"),
    (["method=dragon", "dragon.kto_reference=offset"], "dragon.kto_reference"),
    (["method=dragon", "train.dynamic_sampling=true"], "train.dynamic_sampling"),
    (["method=adv_grpo", "reward=digit_correct"], "reward"),
    (["method=adv_grpo", "reward=adversarial"], "reward_options.adversarial.references"),
    (["method=adv_grpo", *ADV, "adversarial.rule=sometimes"], "adversarial.rule"),
    (["method=adv_grpo", *ADV, "adversarial.num_samples=0"], "adversarial.num_samples"),
    (["method=adv_grpo", *ADV, "adversarial.steps=-1"], "adversarial.steps"),
    # the options and rewards of one method are refused under the others, naming the key and the owner
    (["sampling.window={kind: fast}"], "sampling.window is an option of method flow_grpo_fast"),
    (["sampling.window={kind: mixgrpo}"], "sampling.window is an option of method mixgrpo"),
    (["method=grpo_guard", "sampling.branching={seeds: 2, branches: 4, steps: 2}"], "sampling.branching"),
    (["method=tempflow_grpo", "sampling.window={kind: fast}"], "set method: flow_grpo_fast"),
    (["dragon.loss=kto"], "dragon.loss is set, but dragon.* are the options of method dragon / diffusion_dpo"),
    (["method=adv_grpo", *ADV, "dragon.beta=10"], "dragon.beta"),
    (["adversarial.steps=3"], "adversarial.steps is set, but adversarial.* are the options of method adv_grpo"),
    (["reward=adversarial"], "set method: adv_grpo"),
    (["method=dragon", "reward={adversarial: 1.0, digit_correct: 1.0}"], "set method: adv_grpo"),
])
def test_method_validation_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("*", r"\*")):
        load_config(DIGITS, overrides).validate()


def test_a_new_method_is_one_class_and_one_registration():
    @register_method
    @dataclasses.dataclass(frozen=True)
    class LastStepOnly(MethodSpec):
        """Trains only the last trainable step (a test method)."""

        name: str = "_last_step_only"
        defaults: dict = dataclasses.field(default_factory=lambda: {"train": {"kl_beta": 0.05}})

        def validate(self, cfg):
            if cfg.sampling.num_steps < 2:
                raise ConfigError("sampling.num_steps must be >= 2 for method _last_step_only")

        def plan(self, cfg, epoch, group_ids, base_levels):
            last = cfg.trainable_steps()[-1]
            steps = torch.full((len(group_ids), 1), last, dtype=torch.long)
            levels = torch.zeros(len(group_ids), cfg.sampling.num_steps).scatter_(1, steps, cfg.sampling.noise_level)
            return methods.EpochPlan(levels, steps, len(group_ids) * cfg.sampling.num_steps)

    try:
        cfg = load_config(DIGITS, ["method=_last_step_only"])
        cfg.validate()
        assert cfg.train.kl_beta == 0.3  # the YAML's explicit value wins over the method's default
        assert load_config(None, ["method=_last_step_only"]).train.kl_beta == 0.05
        plan = check_plan(cfg, 0)
        assert (plan.train_steps == cfg.trainable_steps()[-1]).all()
        with pytest.raises(ConfigError, match="sampling.num_steps"):
            load_config(DIGITS, ["method=_last_step_only", "sampling.num_steps=1",
                                 "sampling.last_step_deterministic=false"]).validate()
        with pytest.raises(ValueError, match="already registered"):
            register_method(LastStepOnly)
    finally:
        METHODS._items.pop("_last_step_only", None)
    assert "_last_step_only" not in METHODS
