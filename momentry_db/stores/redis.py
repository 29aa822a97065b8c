"""Redis: keys are isolated by prefix; counted and deleted with SCAN, never KEYS."""

from __future__ import annotations

from typing import Any

TIMEOUT_S = 5
PREFLIGHT_TIMEOUT_S = 2
BATCH = 1000


def client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S * 2)


def match_pattern(prefix: str) -> str:
    """A SCAN MATCH pattern for every key under ``prefix``, with glob characters escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"


def count_keys(url: str, prefix: str) -> int:
    """Count the keys under a prefix."""
    c = client(url)
    try:
        return sum(1 for _ in c.scan_iter(match=match_pattern(prefix), count=BATCH))
    finally:
        c.close()


def delete_keys(url: str, prefix: str) -> int:
    """Delete every key under a prefix with SCAN + UNLINK, in batches; return how many."""
    c = client(url)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in c.scan_iter(match=match_pattern(prefix), count=BATCH):
            batch.append(key)
            if len(batch) >= BATCH:
                deleted += c.unlink(*batch)
                batch.clear()
        if batch:
            deleted += c.unlink(*batch)
        return int(deleted)
    finally:
        c.close()


def preflight(url: str, prefix: str, where: str, secrets: list[str]) -> None:
    """Check, within a short timeout, that the server answers and lets this login scan the prefix."""
    import redis

    from ..environments import scrub
    from ..errors import RefusedError, UnreachableError

    c = redis.Redis.from_url(url, socket_connect_timeout=PREFLIGHT_TIMEOUT_S, socket_timeout=PREFLIGHT_TIMEOUT_S)
    try:
        c.ping()
        c.scan(0, match=match_pattern(prefix), count=1)
    except (redis.AuthenticationError, redis.ResponseError) as exc:
        raise RefusedError(f"redis: {where} refused the request ({scrub(str(exc), secrets)}); "
                           "check the login in REDIS_URL and its ACL") from None
    except redis.RedisError as exc:
        raise UnreachableError(f"redis: cannot reach {where} within {PREFLIGHT_TIMEOUT_S}s: "
                               f"{scrub(str(exc), secrets) or type(exc).__name__}") from None
    finally:
        c.close()
