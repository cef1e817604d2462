"""The pytest-benchmark suite over ``capsule_sessions.bench``'s workloads (checkout only)."""
