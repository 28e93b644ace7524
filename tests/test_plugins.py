"""The core depends on protocols only: built-in rewards and model adapters are plugins found through entry
points, exactly as a third-party package's (genalign/plugins.py, genalign/reward_api.py).

Third-party plugins are simulated by a fake installed distribution: a directory on ``sys.path`` holding a
package and its ``*.dist-info`` (``METADATA`` + ``entry_points.txt``), which ``importlib.metadata`` reads
like any installed package's.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import genalign
from genalign import plugins, reward_api

ROOT = Path(__file__).resolve().parents[1]
# repository folder -> the package it installs as (pyproject.toml, [tool.setuptools.package-dir])
PACKAGES = {"genalign": "genalign", "rewards": "genalign.rewards", "pipelines": "genalign.pipelines"}
PLUGIN_PACKAGES = ("genalign.rewards", "genalign.pipelines")


def fake_distribution(root: Path, dist: str, package: str, code: str, entry_points: str) -> Path:
    """Write an installed-looking distribution ``dist`` (package ``package`` with ``code``) under ``root``."""
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text(textwrap.dedent(code))
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"  # the escaped name, as a wheel installs it
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    return root


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """``installed(dist, package, code, entry_points)``: make a fake distribution visible (undone after the test)."""
    count = [0]

    def install(dist: str, package: str, code: str, entry_points: str) -> Path:
        count[0] += 1
        root = fake_distribution(tmp_path / f"site{count[0]}", dist, package, code, entry_points)
        monkeypatch.syspath_prepend(str(root))  # also invalidates the import caches
        monkeypatch.delitem(sys.modules, package, raising=False)
        return root

    yield install
    for name in [m for m in sys.modules if m.startswith("fake_genalign_")]:
        del sys.modules[name]


REWARD_CODE = """
    import torch

    class Brightness:
        def __init__(self, scale=1.0):
            self.scale = scale

        def __call__(self, *, images, prompts, metadata):
            return self.scale * images.mean(dim=(1, 2, 3))

    def make_brightness(scale=1.0):
        return Brightness(scale)
"""


# ------------------------------------------------------------------------------------- (a) rewards
def test_reward_declared_only_by_entry_point_is_found_by_name(installed):
    assert "fake_brightness" not in reward_api.available_rewards()
    with pytest.raises(ValueError, match="unknown reward 'fake_brightness'"):
        reward_api.RewardSet("fake_brightness")
    installed("fake-genalign-reward", "fake_genalign_reward", REWARD_CODE,
              "[genalign.rewards]\nfake_brightness = fake_genalign_reward:make_brightness\n")
    assert "fake_genalign_reward" not in sys.modules  # listing names imports nothing
    assert "fake_brightness" in reward_api.available_rewards()
    assert "fake_genalign_reward" not in sys.modules

    images = torch.stack([torch.full((3, 4, 4), 0.25), torch.full((3, 4, 4), 0.75)])
    rs = reward_api.RewardSet({"fake_brightness": 2.0, "jpeg_compressibility": 0.0},
                              options={"fake_brightness": {"scale": 3.0}})
    total, parts = rs(images, ["a", "b"])
    assert torch.allclose(parts["fake_brightness"], torch.tensor([0.75, 2.25]))
    assert torch.allclose(total, torch.tensor([1.5, 4.5]))
    # the compatibility names in genalign.rewards are the core's
    from genalign.rewards import RewardSet, load_reward

    assert RewardSet is reward_api.RewardSet
    assert load_reward("fake_brightness")(images=images, prompts=["a", "b"], metadata=None).tolist() == [0.25, 0.75]


def test_in_process_registration_wins_over_an_entry_point(installed, monkeypatch):
    installed("fake-genalign-reward2", "fake_genalign_reward2", REWARD_CODE,
              "[genalign.rewards]\nfake_shadowed = fake_genalign_reward2:make_brightness\n")
    monkeypatch.setattr(reward_api, "_REGISTRY", reward_api.Registry("reward"))
    reward_api.register_reward("fake_shadowed")(lambda: (lambda *, images, prompts, metadata: torch.zeros(len(prompts))))
    assert reward_api.load_reward("fake_shadowed")(images=torch.ones(2, 3, 2, 2), prompts=["a", "b"],
                                                   metadata=None).tolist() == [0.0, 0.0]
    assert "fake_genalign_reward2" not in sys.modules


def test_conflicting_entry_points_name_both_distributions(installed):
    installed("fake-genalign-a", "fake_genalign_a", REWARD_CODE, "[genalign.rewards]\nfake_twice = fake_genalign_a:make_brightness\n")
    installed("fake-genalign-b", "fake_genalign_b", REWARD_CODE, "[genalign.rewards]\nfake_twice = fake_genalign_b:make_brightness\n")
    with pytest.raises(plugins.PluginError, match="declared twice.*fake-genalign-"):
        reward_api.load_reward("fake_twice")


def test_broken_entry_point_names_its_target(installed):
    installed("fake-genalign-c", "fake_genalign_c", REWARD_CODE, "[genalign.rewards]\nfake_broken = fake_genalign_c.missing:make\n")
    with pytest.raises(plugins.PluginError, match="fake_broken.*fake_genalign_c.missing:make.*fake-genalign-c"):
        reward_api.load_reward("fake_broken")


# ---------------------------------------------------------------------------------- (b) pipelines
ADAPTER_CODE = """
    class FakePolicy:
        kind = "flow"
        pipeline_classes = ("FakeDiffusionPipeline",)

        def __init__(self, model_id, **options):
            self.model_id, self.options = model_id, options

        @classmethod
        def handles(cls, path_or_id):
            return str(path_or_id) == "fake-model"

        @classmethod
        def from_pretrained(cls, model_id, device=None, **options):
            return cls(model_id, device=device, **options)
"""


def test_pipeline_adapter_declared_only_by_entry_point_is_found(installed, tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "model_index.json").write_text(json.dumps({"_class_name": "FakeDiffusionPipeline"}))
    with pytest.raises(ValueError, match="'FakeDiffusionPipeline'.*not supported"):
        plugins.policy_class(str(saved))
    installed("fake-genalign-adapter", "fake_genalign_adapter", ADAPTER_CODE,
              "[genalign.pipelines]\nfake = fake_genalign_adapter:FakePolicy\n")
    assert "fake" in plugins.available_pipelines()

    from genalign.pipelines import load_policy  # the compatibility re-export

    by_handles = load_policy("fake-model", device="cpu", guidance_scale=2.0)
    assert type(by_handles).__name__ == "FakePolicy"
    assert by_handles.options == {"device": "cpu", "guidance_scale": 2.0}
    by_index = plugins.load_policy(str(saved))  # model_index.json _class_name -> pipeline_classes
    assert type(by_index) is type(by_handles) and by_index.model_id == str(saved)
    assert plugins.policy_class("anything", adapter="fake") is type(by_handles)
    # the built-ins still resolve through their own entry points
    assert plugins.policy_class("digits").__name__ == "DigitsPolicy"


def test_builtin_adapters_declare_what_they_load():
    from genalign.pipelines.ddpm import DDPMPolicy
    from genalign.pipelines.digits import DigitsPolicy
    from genalign.pipelines.flux import FluxPolicy
    from genalign.pipelines.sd3 import SD3Policy

    assert SD3Policy.pipeline_classes == ("StableDiffusion3Pipeline",)
    assert FluxPolicy.pipeline_classes == ("FluxPipeline",)
    assert set(DDPMPolicy.pipeline_classes) == {"StableDiffusionPipeline", "StableDiffusionXLPipeline"}
    assert DigitsPolicy.handles("digits") and not DigitsPolicy.handles("some-org/model")


def test_command_declared_by_entry_point(installed):
    installed("fake-genalign-cmd", "fake_genalign_cmd", "def main(argv):\n    return len(argv)\n",
              "[genalign.commands]\nfake-count = fake_genalign_cmd:main\n")
    assert plugins.load_command("fake-count")(["a", "b"]) == 2
    with pytest.raises(ValueError, match="unknown command 'nope'"):
        plugins.load_command("nope")


# ----------------------------------------------------------------------- built-ins = entry points
def _declared_entry_points():
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["entry-points"]


def test_builtins_are_declared_and_installed_as_entry_points():
    """Every built-in reward factory is declared in pyproject.toml, and the installed metadata is current
    (if not: ``pip install -e . --no-deps``)."""
    declared = _declared_entry_points()
    for group in (plugins.REWARDS_GROUP, plugins.PIPELINES_GROUP, plugins.COMMANDS_GROUP):
        installed = {name: ep.value for name, ep in plugins.entry_points(group).items()}
        assert declared[group] == {k: v for k, v in installed.items() if k in declared[group]}, \
            f"stale metadata for {group}: run pip install -e . --no-deps"
    tree = ast.parse((ROOT / "rewards" / "builtins.py").read_text())
    factories = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    assert {f"genalign.rewards.builtins:{f}" for f in factories} == set(declared[plugins.REWARDS_GROUP].values())
    assert {"digit_correct", "pickscore", "frechet_set", "adversarial", "remote"} <= set(reward_api.available_rewards())
    assert set(declared[plugins.PIPELINES_GROUP]) == {"digits", "sd3", "flux", "ddpm", "llm", "qwen_image", "z_image",
                                                      "flux2", "wan", "flux_kontext"}


@pytest.mark.parametrize("group", ["genalign.rewards", "genalign.pipelines", "genalign.commands"])
def test_every_builtin_entry_point_loads(group):
    for name in _declared_entry_points()[group]:
        assert callable(plugins.load_entry_point(group, name)), name


# --------------------------------------------------------------------------------- (c) import graph
def _module_files():
    """``{module name: file}`` of genalign/, rewards/ and pipelines/ (subpackages included)."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _imported(module: str, path: Path, modules) -> set:
    """Modules of ``modules`` that ``module`` imports anywhere (top level, functions, ``import_module("...")``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names += [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append(node.args[0].value)
    found = set()
    for name in names:
        while name not in modules and "." in name:
            name = name.rpartition(".")[0]
        if name in modules and name != module:
            found.add(name)
    return found


def import_graph():
    modules = _module_files()
    return {m: _imported(m, p, modules) for m, p in modules.items()}


def strongly_connected(graph):
    """Tarjan's strongly connected components with more than one module (each one holds a cycle)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_graph_finds_imports_inside_functions():
    graph = import_graph()
    assert "genalign.reward_api" in graph["genalign.evaluate"]  # imported inside a function
    assert "genalign.plugins" in graph["genalign.reward_api"]
    assert "genalign.reward_api" in graph["genalign.rewards.remote"]


def test_no_import_cycle_between_modules():
    graph = import_graph()
    cycles = strongly_connected(graph)
    detail = {" <-> ".join(c): {m: sorted(graph[m] & set(c)) for m in c} for c in cycles}
    assert not cycles, f"import cycles: {detail}"


# ------------------------------------------------------------------------ (d) core -> plugins
def test_no_core_module_imports_a_plugin_module():
    offenders = {m: sorted(i for i in imports if i.startswith(PLUGIN_PACKAGES))
                 for m, imports in import_graph().items() if not m.startswith(PLUGIN_PACKAGES)}
    offenders = {m: i for m, i in offenders.items() if i}
    assert not offenders, f"core modules importing plugin modules (use genalign.reward_api / genalign.plugins): {offenders}"


# ------------------------------------------------------------------------------ (e) one package path
def test_genalign_has_one_package_path():
    assert len(genalign.__path__) == 1
    assert Path(genalign.__path__[0]).resolve() == (ROOT / "genalign").resolve()
    assert importlib.metadata.version("genalign") == genalign.__version__
