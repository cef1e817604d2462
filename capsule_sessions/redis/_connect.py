"""Clients made from a URL, with bounded timeouts: every call either answers or raises
within them (docs/redis.md, "Faults").

The URL is passed to redis-py as it is, so ``rediss://`` (TLS), ``user:password@``
(ACL) and query options (``?socket_timeout=0.5``) reach redis-py unchanged; options the
URL leaves out get this module's defaults rather than redis-py's (which retry a
failed connection three times with a backoff of up to ten seconds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import masked

if TYPE_CHECKING:
    import redis
    import redis.asyncio

# Seconds to connect, and to wait for any one reply (both overridable in the URL).
DEFAULT_TIMEOUT = 5.0
# One retry, after 10-100 ms, when a connection fails (a server restarted since the
# pooled connection was made): never on a timeout, where the server may have run the
# command and a second run would apply it twice.
RETRIES = 1
# A connection's read buffer (redis-py's socket_read_size, 64 KiB by default): a reply
# of a 64 KiB frame is a little more than that, so it took three reads of the socket
# (each a poll and a recv) where one does, and larger frames one read per 64 KiB.
READ_BUFFER_BYTES = 256 * 1024
_SCHEMES = ("redis://", "rediss://", "unix://")


def check_url(url: object) -> str:
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, got {type(url).__name__}")
    if not url.startswith(_SCHEMES):
        raise ValueError(f"url must start with redis://, rediss:// or unix://, got {masked(url)!r}")
    _check_database(url)
    return str.__str__(url)


def _check_database(url: str) -> None:
    """redis-py reads a database that is not a number (``redis://host/1a``) as none, and
    connects to database 0: another deployment's, perhaps. Refused here instead."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    named = parse_qs(parts.query).get("db", [])
    if parts.scheme in ("redis", "rediss") and parts.path.strip("/"):
        named.append(parts.path.strip("/"))
    for db in named:
        if not (db.isascii() and db.isdigit()):
            raise ValueError(f"url {masked(url)!r} names the database {db!r}: a database is a number "
                             "(redis://host:port/0)")


def _options(errors: tuple[type[Exception], ...], retry_class: Any, backoff: Any) -> dict[str, Any]:
    return {
        "socket_timeout": DEFAULT_TIMEOUT,
        "socket_connect_timeout": DEFAULT_TIMEOUT,
        "socket_read_size": READ_BUFFER_BYTES,
        "retry": retry_class(backoff, RETRIES, supported_errors=errors),
        # Raw bytes back: frames are bytes, and every text is decoded (and checked) here.
        "decode_responses": False,
    }


def connect(url: str) -> redis.Redis:
    """A thread-safe client (a connection pool) for ``url``."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    options = _options((redis.exceptions.ConnectionError,), Retry, ExponentialBackoff(cap=0.1, base=0.01))
    try:
        return redis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise ValueError(f"url {masked(url)!r} is not a valid Redis URL: {exc}") from None


def cluster_enabled(hello: Any) -> bool:
    """Whether a ``HELLO`` reply (a map, or a flat list of pairs) is a Redis Cluster
    node's. HELLO is a connection command, which a least-privilege ACL user may run
    (INFO is not)."""
    if isinstance(hello, list):
        hello = dict(zip(hello[::2], hello[1::2], strict=False))
    return isinstance(hello, dict) and hello.get(b"mode", hello.get("mode")) in (b"cluster", "cluster")


def _cluster_options() -> dict[str, Any]:
    # The cluster client follows MOVED and ASK itself, and retries a command after a
    # connection error only once it has refreshed its map of the slots.
    return {"socket_timeout": DEFAULT_TIMEOUT, "socket_connect_timeout": DEFAULT_TIMEOUT,
            "socket_read_size": READ_BUFFER_BYTES, "decode_responses": False}


def connect_cluster(url: str) -> Any:
    """A thread-safe Redis Cluster client, found from the node ``url`` names."""
    from redis.cluster import RedisCluster

    if url.startswith("unix://"):
        raise ValueError(f"url {masked(url)!r} names a Redis Cluster node by a unix socket: the cluster's "
                         "nodes are reached by host and port")
    return RedisCluster.from_url(url, **_cluster_options())


def connect_cluster_async(url: str) -> Any:
    """The asyncio Redis Cluster client for ``url``."""
    from redis.asyncio.cluster import RedisCluster

    if url.startswith("unix://"):
        raise ValueError(f"url {masked(url)!r} names a Redis Cluster node by a unix socket: the cluster's "
                         "nodes are reached by host and port")
    return RedisCluster.from_url(url, **_cluster_options())


def node_url(url: str, host: str, port: int) -> str:
    """``url`` with another node's address: the same scheme, credentials, database and
    options (how the asyncio twin reaches one node of a Redis Cluster directly)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=f"{credentials}@{address}" if credentials else address))


def connect_async(url: str) -> redis.asyncio.Redis:
    """The asyncio client for ``url`` (its connections belong to the running event loop)."""
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    options = _options((redis.exceptions.ConnectionError,), Retry, ExponentialBackoff(cap=0.1, base=0.01))
    try:
        return redis.asyncio.Redis.from_url(url, **options)
    except ValueError as exc:
        raise ValueError(f"url {masked(url)!r} is not a valid Redis URL: {exc}") from None
