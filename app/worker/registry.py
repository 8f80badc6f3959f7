"""The stage registry: the one place where a stage's name, topics and event types live.

Everything else derives from it: the topic names (:class:`app.topics.TopicNames`), the Faust agents
and their tables (:mod:`app.worker.wiring`), the type check at the top of each stage
(:mod:`app.worker.stages`), the per-stage metrics declared at start, and where an operator's redrive
request for a stage is sent (the API). Topics are named here by their suffix; the deployment's prefix
is added by :class:`app.topics.TopicNames`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from schemas.events import (
    EventBase,
    ExceptionAccepted,
    ExceptionApprovalExpired,
    ExceptionApprovalRefused,
    ExceptionApprovalRequested,
    ExceptionApprovalSubmitted,
    ExceptionApproved,
    ExceptionCompleted,
    ExceptionDecided,
    ExceptionDiscardRequested,
    ExceptionFingerprinted,
    ExceptionIngested,
    ExceptionPlanned,
    ExceptionRedriveRequested,
    ExceptionRejected,
    ExceptionTriaged,
)

E = TypeVar("E", bound=EventBase)

OPERATIONS = "operations"  # dead letters, parking, quarantine lifts, requests to the projection


@dataclass(frozen=True)
class Stage(Generic[E]):
    """One consuming stage.

    ``inputs`` are the topics it reads; an operator's redrive or discard for it goes to ``requests``
    (its first input unless ``request_topic`` says otherwise), keyed by the exception id, so the request is ordered with the stage's own
    events. ``agent`` names the Faust agent function: profiles attribute CPU to stages by it.
    ``records_processed`` is False for the projection, whose fold already ignores an event id it
    holds, so it keeps no ``processed-<stage>`` table.
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    consumes: type[E]
    emits: tuple[type[EventBase], ...]
    agent: str
    records_processed: bool = True
    request_topic: str | None = None

    @property
    def requests(self) -> str:
        return self.request_topic or self.inputs[0]


INTAKE = Stage(
    "intake",
    ("ingested",),
    ("fingerprinted",),
    ExceptionIngested,
    (ExceptionFingerprinted,),
    "take_in_exceptions",
)
GROUP = Stage(
    "group",
    ("fingerprinted",),
    ("accepted",),
    ExceptionFingerprinted,
    (ExceptionAccepted,),
    "group_repeats",
)
TRIAGE = Stage(
    "triage",
    ("accepted",),
    ("triaged",),
    ExceptionAccepted,
    (ExceptionTriaged,),
    "triage_exceptions",
)
POLICY = Stage(
    "policy", ("triaged",), ("decided",), ExceptionTriaged, (ExceptionDecided,), "apply_policy"
)
# What a stage that holds exceptions for approval writes about them (agents/approval.py).
APPROVAL_NOTES: tuple[type[EventBase], ...] = (
    ExceptionApprovalRequested,
    ExceptionApproved,
    ExceptionRejected,
    ExceptionApprovalExpired,
    ExceptionApprovalRefused,
)
# The two stages that can hold an exception for approval (agents/approval.py) also write the
# approval notes (requested, approved, rejected, expired, refused) to the operations topic.
PLAYBOOK = Stage(
    "playbook",
    ("decided",),
    ("planned", OPERATIONS),
    ExceptionDecided,
    (ExceptionPlanned, *APPROVAL_NOTES),
    "choose_playbook",
)
TOOL = Stage(
    "tool",
    ("planned",),
    ("completed", OPERATIONS),
    ExceptionPlanned,
    (ExceptionCompleted, *APPROVAL_NOTES),
    "execute_tools",
)
# The projection folds every event of an exception's history into its record. Its requests come on
# the operations topic, which it reads anyway.
PROJECTION = Stage(
    "projection",
    ("ingested", "accepted", "triaged", "decided", "planned", "completed", OPERATIONS),
    (),
    EventBase,
    (),
    "project_state",
    records_processed=False,
    request_topic=OPERATIONS,
)

# Every consuming stage, in pipeline order; each has a DLQ topic ``<prefix>.<stage>.dlq``.
STAGES: tuple[Stage[Any], ...] = (INTAKE, GROUP, TRIAGE, POLICY, PLAYBOOK, TOOL, PROJECTION)
BY_NAME: dict[str, Stage[Any]] = {stage.name: stage for stage in STAGES}
STAGE_NAMES: tuple[str, ...] = tuple(BY_NAME)

# What operators send to a stage's request topic.
REQUESTS = (ExceptionRedriveRequested, ExceptionDiscardRequested)
# Events addressed to one stage by ``payload.stage``: the others that read the topic pass them by
# (the projection folds them into the history).
ADDRESSED = (*REQUESTS, ExceptionApprovalSubmitted)


def stage(name: str) -> Stage[Any]:
    """The stage called ``name``; a KeyError names the stages there are."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no stage {name!r}; the stages are {', '.join(STAGE_NAMES)}") from None


def topic_suffixes() -> list[str]:
    """Every stage topic (inputs and outputs), each once, in pipeline order."""
    seen: dict[str, None] = {}
    for s in STAGES:
        for name in (*s.inputs, *s.outputs):
            seen.setdefault(name)
    return list(seen)
