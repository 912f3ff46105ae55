"""Running: one run (``run``), pretraining a source (``pretrain``), comparisons of methods x learning rates x
seeds with hold-out selection (``compare``), executors (in-process, Ray), successive halving as a pure
function of scores (``racing``, raced by :mod:`paramtransfer.selection.auto`).

May import: errors, registry, data, models, methods, optim, train, results, report (a comparison writes
its own table). Never selection, bench or cli.
"""
