"""Which mutants scripts/mutation scores: the pure logic of the modules it mutates.

environments, settings and tables count whole. Of the store and verify modules only the
functions whose logic needs no PostgreSQL count: the verify checks that judge names and
directories, the Qdrant spec parsing and diff, and the Mongo lock. Run as a script after
``mutmut run``: prints killed/total over that scope and lists the survivors.
"""

from __future__ import annotations

import re
import subprocess
import sys

WHOLE = ("momentry_db.environments.", "momentry_db.settings.", "momentry_db.tables.")
FUNCTIONS = {
    "momentry_db.verify": {"VerifyResult", "Check", "_structure_diff", "_distinct", "check_redis",
                           "check_directories", "_overlap"},
    "momentry_db.stores.qdrant": {"CollectionSpec", "parse_spec", "check_spec_names", "physical_name",
                                  "_mutable_actions", "_recreate_action", "_vectors", "_fill_state",
                                  "CollectionPlan"},
    "momentry_db.stores.mongo": {"_owner", "_pid_gone", "_dead_holder", "describe_holder", "Lease",
                                 "migration_lock", "release", "lock_holder"},
}
# mutmut names a mutant module.x_function__mutmut_N, or module.xǁClassǁmethod__mutmut_N
_NAME = re.compile(r"^(?P<module>[\w.]+?)\.(?:x_(?P<function>\w+?)|xǁ(?P<cls>\w+)ǁ\w+?)__mutmut_\d+$")


def in_scope(mutant: str) -> bool:
    if mutant.startswith(WHOLE):
        return True
    m = _NAME.match(mutant)
    if not m:
        return False
    return (m["function"] or m["cls"]) in FUNCTIONS.get(m["module"], set())


def patterns() -> list[str]:
    """Mutant name patterns for ``mutmut run``: only the scoped mutants are run."""
    found = [prefix + "*" for prefix in WHOLE]
    for module, names in FUNCTIONS.items():
        for name in sorted(names):
            found += [f"{module}.x_{name}__mutmut_*", f"{module}.xǁ{name}ǁ*"]
    return found


def main() -> int:
    if sys.argv[1:] == ["--patterns"]:
        print("\n".join(patterns()))
        return 0
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], capture_output=True,
                         text=True, check=True).stdout
    status: dict[str, str] = {}
    for line in out.splitlines():
        name, _, state = line.strip().partition(": ")
        if name and state:
            status[name] = state.strip()
    scoped = {n: s for n, s in status.items() if in_scope(n)}
    killed = sum(s in ("killed", "timeout") for s in scoped.values())
    counted = [n for n, s in scoped.items() if s not in ("skipped", "not checked")]
    survivors = sorted(n for n, s in scoped.items() if s in ("survived", "no tests"))
    for name in survivors:
        print(f"{scoped[name]:>9}  {name}")
    share = 100 * killed / len(counted) if counted else 0.0
    print(f"mutation score (pure logic): {killed}/{len(counted)} killed = {share:.1f}%  "
          f"(of {len(status)} mutants in the mutated files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
