"""genalign: align diffusion and flow-matching image generators with rewards.

The core (this package) depends on protocols only; the built-in rewards (``genalign.rewards``) and model
adapters (``genalign.pipelines``) are plugins found through entry points (see :mod:`genalign.plugins`).
In a source checkout, install it with ``pip install -e .`` so that those packages and their entry points
are registered.
"""

__version__ = "0.1.0"
