"""Valid values of enumerated config keys, in a leaf module: :mod:`genalign.config` (which validates them)
and the modules implementing them both import it, so neither imports the other for a list of names.

DRAGON (docs/algorithms.md §6): ``dragon.criterion``, ``dragon.pairing``, ``dragon.loss``, ``dragon.set_split``.
"""

CRITERIA = ("instance", "set")
PAIRINGS = ("paired", "unpaired")
LOSSES = ("dpo", "kto")
SET_SPLITS = ("loo", "greedy")

__all__ = ["CRITERIA", "LOSSES", "PAIRINGS", "SET_SPLITS"]
