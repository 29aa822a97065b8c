"""Rendering for people (text) and machines (JSON). The only module that writes output."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from .errors import MomentryError
from .plan import Step, TargetOutcome, TargetPlan
from .stores.base import KIND

JSON_VERSION = 2


class Reporter:
    """Receives events while a command runs and renders its result at the end."""

    def __init__(self, *, as_json: bool = False, out: TextIO | None = None,
                 err: TextIO | None = None) -> None:
        self.as_json = as_json
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def scrub_with(self, secrets: list[Any]) -> None:
        """Mask these secrets, and any URL or DSN password, in everything written from now on."""
        self.out = _Scrubbed(self.out, secrets)
        self.err = _Scrubbed(self.err, secrets)

    def __call__(self, event: str, payload: Any) -> None:
        if event == "notice":
            print(payload, file=self.err)
        elif event == "failed":  # one store failed; the run goes on with the next one
            print(f"error: {payload}", file=self.err)
        elif self.as_json:
            return
        elif event in ("upgraded", "downgraded", "stamped"):
            step: Step = payload
            verb = {"downgraded": "downgraded", "stamped": "stamped at"}.get(
                event, "upgraded to" if step.store == "postgres" else "applied")
            print(f"{_where(step)}: {verb} {step.name} {step.description}".rstrip(), file=self.out)
        elif event == "progress":
            self._progress(payload)

    def _progress(self, p: dict[str, Any]) -> None:
        """A progress bar on a terminal; nothing when stderr is a pipe or a file."""
        if not self.err.isatty() or not p.get("total"):
            return
        width = 30
        filled = int(width * p["done"] / p["total"])
        print(f"\r{p['store']} {p['target']}: [{'#' * filled}{' ' * (width - filled)}] {p['done']}/{p['total']}",
              end="\n" if p["done"] >= p["total"] else "", file=self.err, flush=True)

    def result(self, result: Any) -> None:
        if self.as_json:
            self._json({"version": JSON_VERSION, **result.to_json()})
            return
        if result.command == "verify":
            self._verify(result)
            return
        if hasattr(result, "lines"):
            for line in result.lines:
                print(line, file=self.out)
            return
        self._run(result)

    def _run(self, result: Any) -> None:
        """migrate, plan and status: one line (or block) per target, whatever the number of environments.

        status over several environments prints an environment x store matrix instead.
        """
        if result.command == "status" and len(result.envs) > 1:
            self._matrix(result)
            return
        for target in result.targets:
            if not target.ok:
                print(_outcome_line(target), file=self.out)
            elif result.command == "status":
                print(_status_line(target.plan), file=self.out)
            elif result.dry_run:
                print(_plan_line(target.plan, prefix="would apply"), file=self.out)
                if target.sql:
                    print(target.sql, file=self.out, end="" if target.sql.endswith("\n") else "\n")
            else:
                print(_outcome_line(target), file=self.out)
            if result.command == "status" or result.dry_run:
                for note in target.notes:
                    print(f"{_where(target.plan)}: {note}", file=self.out)
        if result.command == "migrate" and not result.dry_run:
            print(_summary(result), file=self.out)

    def _matrix(self, result: Any) -> None:
        """One row per environment, one column per store: where it stands, and what is pending."""
        stores = list(dict.fromkeys(t.store for t in result.targets))
        cells: dict[tuple[str, str], list[str]] = {}
        for t in result.targets:
            cell = ("FAILED" if not t.ok else _revs(t.current, t.store)
                    + (f" (+{len(t.pending)} pending)" if t.pending else ""))
            cells.setdefault((t.env, t.store), []).append(cell)
        rows = [["env", *stores]] + [[env, *(", ".join(cells.get((env, s), ["-"])) for s in stores)]
                                     for env in result.envs]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=self.out)
        behind = [env for env in result.envs if any(t.pending or not t.ok for t in result.targets if t.env == env)]
        print(f"status: {len(result.envs)} environment(s), " + (
            f"{len(behind)} behind: {', '.join(behind)}" if behind else "every one up to date"), file=self.out)

    def _verify(self, result: Any) -> None:
        if hasattr(result, "results"):  # several environments: each one's checks, then which failed
            for one in result.results:
                self._verify(one)
            print(f"verify: {len(result.results)} environment(s), " + (
                f"{len(result.failed)} failed: {', '.join(result.failed)}" if result.failed else "all passed"),
                file=self.out)
            return
        labels = {"pass": "ok  ", "fail": "FAIL", "not checkable here": "n/a "}
        for check in result.checks:
            detail = f": {check.detail}" if check.detail else ""
            print(f"{labels.get(check.status, check.status)} {check.store:<8} {check.name}{detail}", file=self.out)
        counts = {status: sum(1 for c in result.checks if c.status == status) for status in labels}
        print(f"verify {result.env}: {counts['pass']} passed, {counts['fail']} failed, "
              f"{counts['not checkable here']} not checkable here", file=self.out)

    def error(self, exc: MomentryError, message: str) -> None:
        print(f"error: {message}", file=self.err)
        if self.as_json:
            self._json({"version": JSON_VERSION, "ok": False,
                        "error": {"type": type(exc).__name__, "message": message,
                                  "exit_code": exc.exit_code}})

    def _json(self, data: dict[str, Any]) -> None:
        print(json.dumps(data, indent=2, sort_keys=False), file=self.out)


class _Scrubbed:
    """A text stream that masks secrets in what is written to it: the last line of defence."""

    def __init__(self, stream: TextIO, secrets: list[Any]) -> None:
        self._stream, self._secrets = stream, secrets

    def write(self, text: str) -> int:
        from .environments import scrub

        return self._stream.write(scrub(text, self._secrets))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _where(item: TargetPlan | Step) -> str:
    return f"{item.store} {item.env} ({KIND.get(item.store, 'target')} {item.target})"


def _summary(result: Any) -> str:
    counts = result.summary()
    return (f"done: {len(result.envs)} environment(s), {len(result.targets)} target(s): "
            f"{counts['upgraded']} upgraded, {counts['up to date']} up to date, {counts['failed']} failed"
            + (f", {counts['refused']} refused" if counts["refused"] else ""))


def _outcome_line(target: TargetOutcome) -> str:
    line = f"{_where(target.plan)}: {target.outcome}"
    if target.applied:
        line += f" ({', '.join(s.name for s in target.applied)})"
    elif target.outcome == "up to date" and target.current:
        line += f" (at {_revs(target.current, target.store)})"
    return line + (f": {target.error}" if target.error else "")


def _revs(revs: tuple[str, ...], store: str = "postgres") -> str:
    return ", ".join(revs) if revs else ("base" if store == "postgres" else "none")


def _plan_line(target: TargetPlan, *, prefix: str) -> str:
    if not target.pending:
        return f"-- {_where(target)}: nothing to do (at {_revs(target.current, target.store)})"
    names = ", ".join(f"{s.name} ({s.description})" for s in target.pending)
    return f"-- {_where(target)}: {prefix} {names}"


def _status_line(target: TargetPlan) -> str:
    state = "up to date" if not target.pending else (
        f"{len(target.pending)} pending: " + ", ".join(s.name for s in target.pending))
    return (f"{_where(target)}: current {_revs(target.current, target.store)}, "
            f"head {_revs(target.head, target.store)}; {state}")
