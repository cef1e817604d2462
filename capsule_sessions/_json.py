"""The type of the JSON documents the command line and the benchmarks build."""

from __future__ import annotations

from typing import Any, TypeAlias

# A document made to be written by json.dump (--json) and read back by json.load (the
# bench's --plot): its values are read by key, each as what that key is known to hold,
# which is what json's own types give them (Any).
JsonObject: TypeAlias = dict[str, Any]
