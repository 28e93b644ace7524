"""Valid values of enumerated config keys, in a leaf module: :mod:`genalign.config` (which validates them)
and the modules implementing them both import it, so neither imports the other for a list of names.

DRAGON (docs/algorithms.md §6): ``dragon.criterion``, ``dragon.pairing``, ``dragon.loss``, ``dragon.set_split``.
Training: ``train.lr_schedule`` (:func:`genalign.optim.lr_factor`).
"""

CRITERIA = ("instance", "set")
PAIRINGS = ("paired", "unpaired")
LOSSES = ("dpo", "kto")
SET_SPLITS = ("loo", "greedy")
LR_SCHEDULES = ("constant", "cosine", "linear")

__all__ = ["CRITERIA", "LOSSES", "LR_SCHEDULES", "PAIRINGS", "SET_SPLITS"]
