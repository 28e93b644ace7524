"""genalign: align diffusion and flow-matching image generators with rewards."""

import os as _os

__version__ = "0.1.0"


def _use_source_checkout() -> None:
    """Run from a source checkout (``python -m genalign.cli`` in the repository root, where ``genalign/``
    shadows an installed copy): map ``genalign.pipelines`` / ``genalign.rewards`` / ``genalign.assets`` to
    the checkout's top-level ``pipelines/``, ``rewards/`` and ``assets/``, as the installed package does."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    if (not _os.path.isdir(_os.path.join(here, "pipelines"))
            and _os.path.isfile(_os.path.join(root, "pipelines", "__init__.py"))
            and _os.path.isfile(_os.path.join(root, "pyproject.toml"))):
        __path__.append(root)  # noqa: F821 - the package's own search path


_use_source_checkout()
