"""The same SessionManager on a Redis server, for services that run on several machines
(extra ``redis``: redis-py with hiredis). docs/redis.md has the design."""

from ._errors import RedisDataError, RedisUnavailableError, SessionStoreError
from ._manager import RedisSessionManager
from ._session import RedisSession

__all__ = ["RedisDataError", "RedisSession", "RedisSessionManager", "RedisUnavailableError", "SessionStoreError"]
