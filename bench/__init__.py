"""capsule_sessions benchmarks: BENCH.md's workloads, defined once.

``workloads`` (the single-threaded W1..W7 cases), ``threaded`` (W8, W9), ``memory``
(allocation and page faults) and ``naive`` (the reference port) are shared by the
pytest-benchmark suite (``test_bench.py``) and ``capsule-sessions bench``, which loads this
package from the source checkout (it is not installed with the wheel).
"""
