"""A hypothesis state machine: random submissions, controls and step outcomes; at every point the
state rebuilt from the event log equals the live projections."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine import commands
from engine.run import claims
from engine.errors import InvalidTransition, NotFound, StaleLease
from engine.run.claims import Policy
from tests.conftest import Installation
from tests.helpers import claim_one, submit

WORKFLOWS = st.sampled_from(["noop1", "noop3", "broken", "flaky"])
ACTIONS = st.sampled_from(["pause", "resume", "cancel", "restart", "delete"])


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="engine-stateful-"))
        self.install = Installation(self.folder)
        # No retry backoff: whether a retried step can be claimed yet must not depend on the wall
        # clock, or hypothesis sees a different rule sequence when it replays an example.
        self.policy = dataclasses.replace(Policy.from_config(self.install.config), backoff_base=0.0)
        self.targets: list[str] = []
        self.claims: list[claims.Claim] = []

    def teardown(self) -> None:
        self.install.store.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    @rule(workflow=WORKFLOWS, hold=st.booleans(), priority=st.integers(0, 3), seed=st.integers(0, 9))
    def submit_session(self, workflow, hold, priority, seed):
        done = submit(self.install, {"workflow": workflow, "hold": hold, "priority": priority, "params": {"seed": seed}})
        self.targets.append(done.target_id)

    @rule(items=st.integers(1, 3), hold=st.booleans())
    def submit_batch(self, items, hold):
        done = submit(self.install, {"kind": "batch", "workflow": "noop1", "hold": hold, "items": [{}] * items})
        self.targets.append(done.target_id)

    @precondition(lambda self: self.targets)
    @rule(index=st.integers(0, 100), action=ACTIONS)
    def control(self, index, action):
        try:
            commands.control(self.install.store, self.targets[index % len(self.targets)], action)
        except (InvalidTransition, NotFound):
            pass

    @rule(runner=st.sampled_from(["runner-a", "runner-b"]))
    def claim(self, runner):
        found = claim_one(self.install.store, runner, self.policy)
        if found is not None:
            self.claims.append(found)

    @precondition(lambda self: self.claims)
    @rule(index=st.integers(0, 100), outcome=st.sampled_from(["complete", "fail", "fail_final", "release"]))
    def finish(self, index, outcome):
        claim = self.claims.pop(index % len(self.claims))
        store = self.install.store
        try:
            if outcome == "complete":
                store.write(lambda tx: claims.complete_in(tx, claim, {"data": {"n": index}}, 0.01))
            elif outcome == "release":
                store.write(lambda tx: claims.release_in(tx, claim, "paused"))
            else:
                store.write(lambda tx: claims.fail_in(tx, claim, "STEP_FAILED", "boom", outcome == "fail", self.policy))
        except StaleLease:
            pass

    @rule()
    def leases_expire(self):
        claims.reap_expired(self.install.store, self.policy, now=time.time() + 3600)

    @invariant()
    def rebuilt_state_equals_live_state(self):
        assert self.install.store.verify() == []


EngineMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
TestEngineStateMachine = EngineMachine.TestCase
