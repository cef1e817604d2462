"""capsule_sessions benchmarks: the workloads of docs/bench.md, defined once.

``workloads`` (the single-threaded W1..W7 and W13 cases), ``threaded`` (W8, W9), ``memory``
(allocation and page faults), ``naive`` (the reference port), ``harness`` (timing),
``targets`` (the verdicts), ``runner``, ``report`` and ``plot`` ship with the package,
so ``capsule-sessions bench`` runs from an installed wheel; the pytest-benchmark suite
in the checkout's top-level ``bench/`` imports the same definitions from here.
Importing ``capsule_sessions`` does not import this package.
"""
