"""The same SessionManager on a Redis server, for services that run on several machines
(extra ``redis``: redis-py with hiredis). docs/redis.md has the design."""

from ._async_manager import AsyncRedisSessionManager
from ._async_session import AsyncRedisSession
from ._errors import RedisDataError, RedisUnavailableError, SessionStoreError
from ._manager import RedisSessionManager
from ._session import RedisSession

__all__ = [
    "AsyncRedisSession",
    "AsyncRedisSessionManager",
    "RedisDataError",
    "RedisSession",
    "RedisSessionManager",
    "RedisUnavailableError",
    "SessionStoreError",
]
