"""genalign: align diffusion and flow-matching image generators with rewards."""

__version__ = "0.1.0"
