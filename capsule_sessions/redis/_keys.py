"""Key names: every key of a session carries the session id as its hash tag, so Redis
Cluster keeps a session's keys on one shard (one script can change them all) and
spreads sessions over shards; the namespace keeps deployments apart on one server.

    <namespace>:{<session id>}:<what>      a session's keys
    <namespace>:{\\r}:registry              the cluster-wide set of live sessions
    <namespace>:{\\r}:incs                  on Redis Cluster: each registered id's incarnation

The registry's keys share the tag ``\\r``, which no escaped session id can be (see
``_tag``), so they are one slot of their own: one script can change both.
"""

from __future__ import annotations

import re

_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_namespace(namespace: object) -> str:
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
    if not _NAMESPACE.fullmatch(namespace):
        raise ValueError(f"namespace must be 1-64 characters of A-Z a-z 0-9 _ . -, got {namespace!r}")
    return str.__str__(namespace)


def _tag(session_id: str) -> str:
    # Braces would end the hash tag early; they are escaped so every id has a tag of its own.
    # An empty tag ("{}") is no tag to Redis (it would hash each whole key, and spread the
    # session over slots): the empty id gets "\e", which no escaped id can be (there a
    # backslash is always followed by another, "(" or ")"); nor "\r", the registry's tag.
    if not session_id:
        return "\\e"
    return session_id.replace("\\", "\\\\").replace("{", "\\(").replace("}", "\\)")


class SessionKeys:
    """The keys of one session."""

    __slots__ = ("namespace", "session_id", "prefix")

    def __init__(self, namespace: str, session_id: str) -> None:
        self.namespace = namespace
        self.session_id = session_id
        self.prefix = f"{namespace}:{{{_tag(session_id)}}}:"

    def key(self, what: str) -> str:
        return self.prefix + what


REGISTRY_TAG = "\\r"


def registry_key(namespace: str) -> str:
    return f"{namespace}:{{{REGISTRY_TAG}}}:registry"


def incs_key(namespace: str) -> str:
    return f"{namespace}:{{{REGISTRY_TAG}}}:incs"
