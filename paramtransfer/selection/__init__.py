"""Source selection, the method: which trained model should a target transfer from?

``lps``: Learnable Parameter Similarity (filter alignment, the second-order network and baselines).
``modelset``: building and loading model sets, training the second-order network on one.
``scores``: fast transferability scores computed from a source model's features or predictions on the
target data (LogME, LEEP, NCE, H-score, shrinkage H-score, TransRate; LogME for regression targets).
``rank``: rank candidate sources for a target by LPS and the scores (``--verify`` fine-tunes them).
``auto`` (+ ``autoconfig``, ``candidates``): ``paramtransfer auto``, rank candidate sources by a fast
score, race source x method x learning rate by successive halving, train the winner.

May import: everything below it (errors, registry, data, models, methods, train, results, report,
experiments). The paper's evaluations of the method (Tables 1-2, Fig. 3) are benchmarks:
:mod:`paramtransfer.bench.modelset`, :mod:`paramtransfer.bench.lps`.
"""
