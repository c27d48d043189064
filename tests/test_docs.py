"""The SQL examples of docs/sql.md run, read-only, against a real installation with real sessions."""

from __future__ import annotations

import re
import subprocess
import sys

from engine.store.console import run_sql
from tests.conftest import ROOT
from tests.helpers import run_until_idle, submit

EXAMPLES = re.findall(r"```sql\n(.*?)```", (ROOT / "docs" / "sql.md").read_text(), re.S)


def test_the_sql_page_shows_sql_examples():
    assert len(EXAMPLES) >= 4


def test_every_documented_query_runs_and_answers(install):
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


def test_the_generated_references_are_what_the_code_says():
    """docs/reference/ is generated from the code (`python -m engine.doors.reference`): a command,
    an option or a config key changed without regenerating them fails here."""
    from engine.doors.reference import references

    for name, text in references().items():
        assert (ROOT / "docs" / name).read_text() == text, f"docs/{name} is stale: python -m engine.doors.reference"


def test_the_readme_is_short_and_every_link_in_the_docs_leads_somewhere():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    linked = set()
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which is not there"
            linked.add(path)
    unreachable = [p.relative_to(ROOT) for p in pages[1:] if p.resolve() not in linked]
    assert unreachable == [], f"no page links to {unreachable}"


def test_the_readme_first_job_is_a_job_the_engine_takes(install, tiny_model):
    """The job file the README walks a newcomer through is valid, as the inbox would check it, once
    a model is registered as the README says."""
    job = re.search(r"<<'EOF'\n(.*?)\nEOF", (ROOT / "README.md").read_text(), re.S).group(1)
    (install.folder / "first.json").write_text(job)
    for command in (["models", "add", str(tiny_model), "--id", "tiny"], ["validate", "first.json"]):
        done = subprocess.run([sys.executable, "-m", "engine", *command], env=install.env(),
                              capture_output=True, text=True, cwd=install.folder)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "first.json: ok" in done.stdout
