"""A program that uses capsule_sessions.redis as a user writes it, for ``mypy --strict``
(``make lint``): each ``assert_type`` pins what a call returns. It needs a Redis server
to run (``python tests/typing/redis_program.py redis://127.0.0.1:6379/0``), so the test
suite only type-checks it; tests/test_redis_*.py run the same calls.
"""

from __future__ import annotations

import asyncio
import sys

from typing_extensions import assert_type

from capsule_sessions import ChatMessage, ConversationSnapshot, SessionState
from capsule_sessions.redis import (
    AsyncRedisSession,
    AsyncRedisSessionManager,
    RedisDataError,
    RedisSession,
    RedisSessionManager,
    RedisUnavailableError,
    SessionStoreError,
)


def sync_node(url: str) -> None:
    with RedisSessionManager(url, 8, idle_timeout=60.0, namespace="typing", cleanup_interval=None) as manager:
        session = assert_type(manager.create("s"), RedisSession)
        assert_type(manager.get("s"), RedisSession)
        assert_type(manager.list(), list[RedisSession])
        assert_type(manager.count(), int)
        assert_type(manager.evict_idle(), list[RedisSession])
        assert_type(session.state, SessionState)
        assert_type(session.last_active_at, float)
        assert_type(session.mark_pipeline_running(), int)
        assert_type(session.wait_pipeline_done(0.1), bool)
        assert_type(session.try_start_voice_startup_greeting(), bool)
        session.add_message(ChatMessage("user", "hi"))
        assert_type(session.history_snapshot(), list[ChatMessage])
        assert_type(session.conversation_snapshot(), ConversationSnapshot)
        assert_type(session.to_dict(), dict[str, str | int | list[dict[str, str | int]]])
        manager.touch("s")
        manager.delete("s")
        assert "s" not in manager and len(manager) == 0


async def asyncio_node(url: str) -> None:
    async with AsyncRedisSessionManager(url, 8, namespace="typing", cleanup_interval=None) as manager:
        session = assert_type(await manager.create("s"), AsyncRedisSession)
        assert_type(await manager.get("s"), AsyncRedisSession)
        assert_type(await manager.list(), list[AsyncRedisSession])
        assert_type(await manager.count(), int)
        assert_type(await manager.contains("s"), bool)
        assert_type(await session.state, SessionState)
        assert_type(await session.mark_turn_started(), int)
        assert_type(await session.wait_pipeline_done(None), bool)
        await manager.delete("s")


def main(url: str) -> None:
    try:
        sync_node(url)
        asyncio.run(asyncio_node(url))
    except (RedisUnavailableError, RedisDataError) as exc:
        assert isinstance(exc, SessionStoreError)
        print(f"the session store failed: {exc}", file=sys.stderr)
        raise


if __name__ == "__main__":
    main(sys.argv[1])
