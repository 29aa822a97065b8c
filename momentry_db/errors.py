"""One error base, caught once in the CLI; each subclass carries its exit code."""

from __future__ import annotations

#: Exit codes, documented in the README.
EXIT_OK = 0
EXIT_FAILURE = 1  # a failure inside a store, or a failed check
EXIT_USAGE = 2  # bad input, bad configuration, unreachable server, or refused


class MomentryError(Exception):
    """Base of every error the tool reports; the message says how to fix it."""

    exit_code = EXIT_FAILURE


class ConfigError(MomentryError):
    """Bad input: unknown environment, malformed name, missing file, bad URL."""

    exit_code = EXIT_USAGE


class UnreachableError(MomentryError):
    """A server could not be reached within the connect timeout."""

    exit_code = EXIT_USAGE


class RefusedError(MomentryError):
    """A command was refused for safety (for example, destructive work on prod)."""

    exit_code = EXIT_USAGE


class StoreError(MomentryError):
    """A step failed inside a store; names the store, the target and the step."""

    exit_code = EXIT_FAILURE

    def __init__(self, store: str, target: str, step: str, reason: str) -> None:
        self.store, self.target, self.step, self.reason = store, target, step, reason
        super().__init__(f"{store} {target}: {step} failed: {reason}")


class StoreUnreachableError(MomentryError):
    """MongoDB or Qdrant could not be reached within the timeout (a failure in that store)."""

    exit_code = EXIT_FAILURE


class LockTimeoutError(MomentryError):
    """Another run held the target's migration lock for longer than the wait allowed."""

    exit_code = EXIT_FAILURE
