"""The planted-bug list (tests/mutations.py) stays plantable: a refactor that moves the code an
entry points at, or renames a test it names, fails here at once, instead of showing up as
'NOT PLANTED' in the next full mutation run (two entries went stale that way on 2026-11-30)."""
from __future__ import annotations

import re

from conftest import ROOT
from mutations import MUTATIONS


def stale_entries(mutations) -> list:
    """One line per problem: an id used twice, a text that does not occur exactly once in its
    file (or is not changed by the entry), a named test file or test function that does not exist."""
    ids = [m.id for m in mutations]
    problems = [f"{i}: id used {ids.count(i)} times" for i in sorted(set(ids)) if ids.count(i) > 1]
    for m in mutations:
        n = (ROOT / m.file).read_text().count(m.old) if (ROOT / m.file).is_file() else 0
        if n != 1 or m.new == m.old:
            unchanged = " (and is unchanged)" if m.new == m.old else ""
            problems.append(f"{m.id}: its text occurs {n} times in {m.file}{unchanged}")
        for target in m.tests:
            path, _, name = target.partition("::")
            if not (ROOT / path).is_file():
                problems.append(f"{m.id}: no test file {path}")
            elif name and not re.search(rf"^def {re.escape(name.split('[')[0])}\(", (ROOT / path).read_text(), re.M):
                problems.append(f"{m.id}: no test {name} in {path}")
    return problems


def test_every_entry_plants_once_and_names_existing_tests():
    assert stale_entries(MUTATIONS) == []
    # and a stale entry is reported, naming it
    first = MUTATIONS[0]
    moved = type(first)(first.id, first.bug, first.file, first.old + "#moved", first.new, first.tests + ("tests/x.py",))
    assert stale_entries([moved, first]) == [f"{first.id}: id used 2 times", f"{first.id}: its text occurs 0 times in "
                                             f"{first.file}", f"{first.id}: no test file tests/x.py"]
