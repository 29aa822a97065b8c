"""Redis: keys are isolated by prefix; counted and deleted with SCAN, never KEYS."""

from __future__ import annotations

from typing import Any

TIMEOUT_S = 5
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
