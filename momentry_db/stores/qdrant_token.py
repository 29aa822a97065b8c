"""Qdrant JWT tokens limited to one environment's collections (Qdrant 1.9+ with ``jwt_rbac`` on).

The token is signed (HS256) with the server's API key and carries Qdrant's RBAC claim:
``{"access": [{"collection": NAME, "access": "rw"}, ...], "exp": ...}``. Qdrant matches a
collection claim by the exact name a request uses, before it resolves an alias, so the token names
the environment's aliases (``momentry_dev_rule1``), the names clients use. The physical collections
behind them (``<alias>__<fingerprint>``) are left out: they change with each immutable spec change,
which only momentry-db makes (with the API key), so the token keeps working across an alias swap and
never reaches a collection the alias has left.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from ..environments import Environment
from ..errors import ConfigError

ALGORITHM = "HS256"
ACCESS = "rw"
_DURATION = re.compile(r"([0-9]+)([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_SECONDS = 10 * 365 * 86400


def parse_duration(text: str) -> int:
    """Seconds in a duration such as 90s, 30m, 12h, 7d or 2w (at least one second, at most ten years)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"--expires-in {text!r} is not a duration: use a number with s, m, h, d or w (such as 30d)")
    seconds = int(match.group(1)) * _UNIT[match.group(2)]
    if not 1 <= seconds <= MAX_SECONDS:
        raise ConfigError(f"--expires-in {text!r} must be between 1s and 3650d")
    return seconds


def claims(collections: Sequence[str], expires_in: int | None = None, now: float | None = None) -> dict[str, Any]:
    """The token's claims: read-write on each collection (by exact name), and the expiry if any."""
    names = list(dict.fromkeys(collections))  # Qdrant refuses a token naming a collection twice
    if not names:
        raise ConfigError("no Qdrant collection is declared (qdrant_specs/), so a token would grant nothing")
    body: dict[str, Any] = {"access": [{"collection": name, "access": ACCESS} for name in names]}
    if expires_in is not None:
        body["exp"] = int(now if now is not None else time.time()) + expires_in
    return body


def collections(env: Environment, specs: Sequence[Any]) -> list[str]:
    """The environment's collections, by the names clients use: one alias per declared spec."""
    return [env.qdrant_collection_for(spec.name) for spec in specs]


def token(env: Environment, specs: Sequence[Any], *, expires_in: int | None = None,
          now: float | None = None) -> tuple[str, dict[str, Any]]:
    """A JWT granting read-write on the environment's collections only, signed with QDRANT_API_KEY."""
    import jwt

    if env.qdrant_api_key is None:
        raise ConfigError(f"QDRANT_API_KEY is not set for {env.name}; a token is signed with the server's API key")
    body = claims(collections(env, specs), expires_in, now)
    return jwt.encode(body, env.qdrant_api_key.reveal(), algorithm=ALGORITHM), body
