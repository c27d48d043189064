"""State machines of sessions, steps, batches and batch items, declared as data with `transitions`.

No Machine here holds the state of any entity: the current state is read from the store, and a
machine only answers whether a trigger is allowed from it and where it leads. Each allowed
transition is recorded as exactly one event, named `<stream>.<EVENTS[trigger]>`.
"""

from __future__ import annotations

from transitions import Machine

from engine.errors import InvalidTransition

TERMINAL = ("completed", "failed", "cancelled")  # a session or batch that has ended (and may be restarted)

# trigger -> the past-tense verb of the event that records it
EVENTS = {
    "start": "started",
    "pause": "paused",
    "resume": "resumed",
    "complete": "completed",
    "fail": "failed",
    "cancel": "cancelled",
    "restart": "restarted",
    "delete": "deleted",
    "claim": "claimed",
    "retry": "retried",
    "release": "released",
}

TRIGGERS = {verb: trigger for trigger, verb in EVENTS.items()}

RUN_STATES = ["pending", "running", "paused", "completed", "failed", "cancelled", "deleted"]
SESSION_STATUSES = tuple(RUN_STATES[:-1])  # what the status views show (a deleted one leaves them)
ACTIVE = ("pending", "running", "paused")  # not ended: what a new priority still changes

RUN_TRANSITIONS = [
    {"trigger": "start", "source": "pending", "dest": "running"},
    {"trigger": "pause", "source": ["pending", "running"], "dest": "paused"},
    {"trigger": "resume", "source": "paused", "dest": "running", "conditions": "has_started"},
    {"trigger": "resume", "source": "paused", "dest": "pending", "unless": "has_started"},
    {"trigger": "complete", "source": "running", "dest": "completed"},
    {"trigger": "fail", "source": ["pending", "running"], "dest": "failed"},
    {"trigger": "cancel", "source": ["pending", "running", "paused"], "dest": "cancelled"},
    {"trigger": "restart", "source": list(TERMINAL), "dest": "pending"},
    {"trigger": "delete", "source": ["pending", "paused", *TERMINAL], "dest": "deleted"},
]

# A batch completes when its last item ends, even if it was never started or is paused (its items
# can be cancelled one by one); otherwise it moves as a session does.
BATCH_TRANSITIONS = [t for t in RUN_TRANSITIONS if t["trigger"] != "complete"] + [
    {"trigger": "complete", "source": ["pending", "running", "paused"], "dest": "completed"},
]

STEP_STATES = ["pending", "running", "completed", "failed", "cancelled"]

STEP_TRANSITIONS = [
    {"trigger": "claim", "source": "pending", "dest": "running"},
    {"trigger": "complete", "source": "running", "dest": "completed"},
    {"trigger": "retry", "source": "running", "dest": "pending"},
    {"trigger": "release", "source": "running", "dest": "pending"},
    {"trigger": "fail", "source": "running", "dest": "failed"},
    {"trigger": "cancel", "source": ["pending", "running"], "dest": "cancelled"},
]

ITEM_STATES = ["pending", "running", "completed", "failed", "cancelled"]

ITEM_TRANSITIONS = [
    {"trigger": "start", "source": "pending", "dest": "running"},
    {"trigger": "complete", "source": ["pending", "running"], "dest": "completed"},
    {"trigger": "fail", "source": ["pending", "running"], "dest": "failed"},
    {"trigger": "cancel", "source": ["pending", "running"], "dest": "cancelled"},
    {"trigger": "restart", "source": list(TERMINAL) + ["pending", "running"], "dest": "pending"},
]


class StateMachine:
    """A `transitions` Machine used as a table: which trigger leads where from which state."""

    def __init__(self, name: str, states: list[str], transitions: list[dict]) -> None:
        self.name = name
        self.machine = Machine(
            model=None, states=states, transitions=transitions, initial=states[0], auto_transitions=False
        )
        self._dests: dict[tuple[str, str, bool], str] = {}

    def allowed(self, trigger: str, state: str) -> bool:
        return bool(self.machine.get_transitions(trigger=trigger, source=state))

    def dest(self, trigger: str, state: str, started: bool = False) -> str:
        """The state `trigger` leads to from `state`; InvalidTransition when it is not allowed."""
        known = self._dests.get((trigger, state, started))
        if known is not None:
            return known  # the machine is fixed data: answers are remembered (replay asks millions of times)
        candidates = self.machine.get_transitions(trigger=trigger, source=state)
        for transition in candidates:
            wanted = [c.target for c in transition.conditions if c.func == "has_started"]
            if all(flag == started for flag in wanted):
                self._dests[(trigger, state, started)] = transition.dest
                return transition.dest
        raise InvalidTransition(
            f"cannot {trigger} a {self.name} that is {state}",
            current_state=state,
        )

    def event(self, trigger: str) -> str:
        return f"{self.name}.{EVENTS[trigger]}"


SESSION = StateMachine("session", RUN_STATES, RUN_TRANSITIONS)
BATCH = StateMachine("batch", RUN_STATES, BATCH_TRANSITIONS)
STEP = StateMachine("step", STEP_STATES, STEP_TRANSITIONS)
ITEM = StateMachine("item", ITEM_STATES, ITEM_TRANSITIONS)
