"""Property tests of ingest: any bytes, any JSON value, any file name. The parser and the inbox
never raise; every file ends accepted or rejected with a contract code, its bytes kept."""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import EngineError
from engine.ingest.inbox import is_job_name
from engine.ingest.jobs import parse_job, parse_job_bytes
from tests.conftest import Installation

CONTRACT_CODES = {"VALIDATION_ERROR", "UNKNOWN_WORKFLOW", "UNKNOWN_MODEL", "NOT_FOUND", "INVALID_TRANSITION",
                  "DUPLICATE_JOB", "UNSAFE_PATH", "UNSAFE_MODEL_FORMAT"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
KEYS = ["kind", "workflow", "params", "items", "matrix", "batch", "target", "action", "job_id", "priority", "hold",
        "prompt", "steps", "width", "height", "seed", "guidance_scale", "num_images", "loras", "postprocess",
        "controlnet", "init_image", "scheduler", "Workflow", "Params", "numImages"]
job_like = st.dictionaries(st.sampled_from(KEYS), json_values | st.dictionaries(st.sampled_from(KEYS), json_values,
                                                                                 max_size=5), max_size=6)


def parses_or_refuses(call) -> None:
    try:
        call()
    except EngineError as error:
        assert error.code in CONTRACT_CODES, error.code
        assert error.message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_refused_with_a_contract_code(raw):
    parses_or_refuses(lambda: parse_job_bytes(raw))


@settings(max_examples=300, deadline=None)
@given(json_values | job_like)
def test_any_json_value_parses_or_is_refused_with_a_contract_code(value):
    parses_or_refuses(lambda: parse_job(value))
    parses_or_refuses(lambda: parse_job_bytes(json.dumps(value).encode()))


name_bytes = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200) | job_like.map(lambda v: json.dumps(v).encode()), stem=name_bytes)
def test_the_inbox_takes_any_file_under_any_name_and_keeps_its_bytes(tmp_path_factory, content, stem):
    install = Installation(tmp_path_factory.mktemp("fuzz") / "engine")
    try:
        name = os.fsdecode(stem + b".json")
        path = install.config.inbox / name
        path.write_bytes(content)
        os.utime(path, (0, 0))  # finished long ago: no partial-file grace
        outcomes = install.engine.inbox().scan()
        if not is_job_name(name):  # a dotfile, an editor's temporary: left alone
            assert outcomes == [] and path.read_bytes() == content
            return
        assert len(outcomes) == 1, outcomes
        outcome = outcomes[0]
        folder = install.config.inbox / ("accepted" if outcome.accepted else "rejected")
        kept = [p for p in folder.iterdir() if not p.name.endswith(".error.json")]
        assert [p.read_bytes() for p in kept] == [content]
        assert not os.path.lexists(path)
        if not outcome.accepted:
            assert outcome.code in CONTRACT_CODES
            error = json.loads(kept[0].with_name(kept[0].name + ".error.json").read_text())
            assert error["code"] == outcome.code and error["message"]
        kept[0].name.encode("utf-8")  # the name any database and log can hold
    finally:
        install.store.close()
