"""The same SessionManager on a Redis server, for services that run on several machines
(extra ``redis``: redis-py with hiredis). docs/redis.md has the design."""

from ._errors import RedisDataError, RedisUnavailableError

__all__ = ["RedisDataError", "RedisUnavailableError"]
