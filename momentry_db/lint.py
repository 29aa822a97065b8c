"""Risky-DDL lint: squawk over the offline SQL of the pending revisions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError

#: What each rule means for a release, in the words the report uses.
RISKS = {
    "require-concurrent-index-creation": "non-concurrent index on an existing table",
    "require-concurrent-index-deletion": "non-concurrent index drop",
    "adding-required-field": "NOT NULL column without a default",
    "adding-not-nullable-field": "NOT NULL column without a default",
    "adding-field-with-default": "column with a volatile default (table rewrite)",
    "changing-column-type": "column type change",
    "ban-drop-column": "dropped column",
    "ban-drop-table": "dropped table",
    "ban-drop-database": "dropped database",
    "renaming-column": "renamed column",
    "renaming-table": "renamed table",
    "constraint-missing-not-valid": "constraint validated under lock",
    "disallowed-unique-constraint": "unique constraint built under lock",
    "adding-foreign-key-constraint": "foreign key validated under lock",
    "setting-not-nullable-field": "SET NOT NULL scans the table under lock",
}
#: Style advice that says nothing about locks or breakage.
IGNORED = ("prefer-bigint-over-int", "prefer-bigint-over-smallint", "prefer-text-field", "prefer-identity",
           "prefer-timestamptz", "prefer-robust-stmts")


@dataclass(frozen=True)
class Finding:
    """One risky statement."""

    target: str
    rule: str
    risk: str
    line: int
    statement: str
    message: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.target}: {self.risk} [{self.rule}] line {self.line}: {self.statement}"


def squawk_binary() -> str:
    """The squawk executable shipped by squawk-cli, next to this interpreter or on PATH."""
    found = shutil.which("squawk", path=str(Path(sys.executable).parent)) or shutil.which("squawk")
    if not found:
        raise ConfigError("squawk is not installed; pip install squawk-cli")
    return found


def lint_sql(sql: str, target: str) -> list[Finding]:
    """Run squawk over one target's SQL and return its risky findings."""
    lines = sql.splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pending.sql"
        path.write_text(sql)
        proc = subprocess.run([squawk_binary(), "--reporter", "json", f"--exclude={','.join(IGNORED)}",
                               str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode not in (0, 1) or not proc.stdout.strip().startswith("["):
        raise ConfigError(f"squawk failed: {(proc.stderr or proc.stdout).strip().splitlines()[:1]}")
    findings = []
    for item in json.loads(proc.stdout):
        line = int(item.get("line", 0)) + 1  # squawk counts from 0
        statement = lines[line - 1].strip() if 0 < line <= len(lines) else ""
        rule = item.get("rule_name", "?")
        findings.append(Finding(target, rule, RISKS.get(rule, rule.replace("-", " ")), line, statement,
                                item.get("message", "")))
    return findings
