"""The README's SQL examples run, read-only, against a real installation with real sessions."""

from __future__ import annotations

import re
import subprocess
import sys

from engine.store.console import run_sql
from tests.conftest import ROOT
from tests.helpers import run_until_idle, submit

EXAMPLES = re.findall(r"```sql\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_shows_sql_examples():
    assert len(EXAMPLES) >= 4


def test_every_readme_query_runs_and_answers(install):
    submit(install, {"workflow": "noop3"})
    submit(install, {"workflow": "broken"})
    submit(install, {"kind": "batch", "workflow": "noop1", "items": [{}, {}]})
    run_until_idle(install)
    answers = [run_sql(install.config, query.strip().rstrip(";")) for query in EXAMPLES]
    counts = dict(answers[0][1])
    assert counts == {"completed": 3, "failed": 1}
    assert answers[2][1][0][1] == "STEP_FAILED"
    assert answers[3][1][0][1:] == ("completed", 2, 0, 2)
    assert ("session.created", 4) in answers[4][1]


def test_the_first_example_works_through_the_cli_as_documented(install):
    submit(install, {"workflow": "noop1"})
    run_until_idle(install)
    done = subprocess.run([sys.executable, "-m", "engine", "sql", EXAMPLES[0].strip(), "--json"], env=install.env(),
                          capture_output=True, text=True, cwd=install.folder)
    assert done.returncode == 0, done.stderr
    assert '"completed"' in done.stdout
