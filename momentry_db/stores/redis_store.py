"""Redis behind the store interface: the parts that apply to keys under a prefix (verify and reset),
on top of stores/redis.py. Redis has no migrations, so runs over declared steps leave it out."""

from __future__ import annotations

from typing import Any

from ..environments import Environment
from .base import Context, Drop

STORE = "redis"


class RedisStore:
    """Redis: one key prefix per environment; checked by verify, emptied by a full reset."""

    name = STORE
    migrates = False

    def load(self, ctx: Context) -> Any:
        return None  # nothing declared

    def drop(self, ctx: Context, env: Environment, declared: Any, closing: Any) -> Drop | None:
        from . import redis

        url = env.redis_url
        if url is None:
            return None
        return Drop(STORE, f"{env.name} (prefix {env.redis_prefix})", f"keys {env.redis_prefix}*",
                    lambda: redis.preflight(url.reveal(), env.redis_prefix, url.masked, env.secrets()),
                    lambda: redis.delete_keys(url.reveal(), env.redis_prefix),
                    said=lambda count: f"deleted {count} keys under {env.redis_prefix}")

    def verify(self, ctx: Context, result: Any, env: Environment, others: list[Environment],
               declared: Any) -> None:
        from .. import verify as checks

        checks.check_redis(result, env, others)
