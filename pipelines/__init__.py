"""Model adapters (installed as ``genalign.pipelines``): one per model family, all implementing
:class:`genalign.policy.Policy`. A plugin of the core: each is declared as a ``genalign.pipelines`` entry
point in pyproject.toml, exactly as a third-party adapter would be (see :mod:`genalign.plugins`).

- ``digits``: the shipped tiny text-to-digit flow model (the embedded default).
- ``sd3``: Stable Diffusion 3 / 3.5; ``flux``: Flux.1; ``ddpm``: SD1.x / SDXL (DDIM eta steps).
- ``llm``: causal language models (token-level objectives share the loss module).

Each adapter declares what it loads: the diffusers ``model_index.json`` ``_class_name`` values in
``pipeline_classes``, or a ``handles(path_or_id)`` classmethod (digits). :func:`load_policy` and
:func:`policy_class` are the core's, re-exported here for compatibility.
"""

from genalign.plugins import load_policy, policy_class  # noqa: F401

__all__ = ["load_policy", "policy_class"]
