"""Benchmark harnesses: ``paramtransfer bench`` and the reports next to the papers.

``suites``: suites, settings and the registry of setting kinds; ``runner``: runs NAME's settings and
records them; one module per kind, registered by name (``compare``, ``lps``); ``modelset``: the LPS
evaluations on a model set (Tables 1-2, Fig. 3); ``speed`` + ``speedsuite``: ``bench speed`` (step-time
ratios, trainer overhead, peak memory, EfficientNet-Lite0 fits); ``paper``: the papers' numbers and
claims (``paper.yaml``) and the verdict rule; ``report``: the benchmark report (``report.md``).

May import every library layer (errors ... experiments, selection, report); only the command line
imports bench.
"""
