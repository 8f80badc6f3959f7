"""Sluice's topic names: ``<prefix>.<name>``, for the topics the stage registry declares.

The stages and the topics they read and write are declared once, in :mod:`app.worker.registry`; this
module only adds the deployment's prefix (Settings.topic_prefix), which lets several deployments or
test runs share one cluster. Stage topics are keyed by exception id, so all events of one exception
land in one partition and are processed in order. The grouping topic is keyed by tenant and
fingerprint, so repeats of one fingerprint meet in one partition whatever exception they belong to;
an exception keeps the fingerprint of its first report, so its events also stay in one grouping
partition, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.worker.registry import OPERATIONS, PROJECTION, STAGE_NAMES, stage, topic_suffixes

# Every consuming stage, in pipeline order; each has a DLQ topic.
STAGES = STAGE_NAMES


@dataclass(frozen=True)
class TopicNames:
    prefix: str

    def of(self, suffix: str) -> str:
        """The full name of the registry's topic ``suffix``."""
        return f"{self.prefix}.{suffix}"

    @property
    def ingested(self) -> str:
        """ExceptionIngested, written by the API; read by intake."""
        return self.of("ingested")

    @property
    def fingerprinted(self) -> str:
        """ExceptionFingerprinted, keyed by tenant+fingerprint; read by grouping."""
        return self.of("fingerprinted")

    @property
    def accepted(self) -> str:
        """ExceptionAccepted; read by triage."""
        return self.of("accepted")

    @property
    def triaged(self) -> str:
        """ExceptionTriaged; read by policy."""
        return self.of("triaged")

    @property
    def decided(self) -> str:
        """ExceptionDecided; read by playbook."""
        return self.of("decided")

    @property
    def planned(self) -> str:
        """ExceptionPlanned; read by the tool stage."""
        return self.of("planned")

    @property
    def completed(self) -> str:
        """ExceptionCompleted: the end of the chain."""
        return self.of("completed")

    @property
    def operations(self) -> str:
        """Dead letters, parking, quarantine lifts, and requests to the projection stage."""
        return self.of(OPERATIONS)

    def input_of(self, stage_name: str) -> str:
        """Where an operator's redrive or discard request for a stage must go."""
        return self.of(stage(stage_name).requests)

    def history(self) -> list[str]:
        """The topics whose events form an exception's history (read by the projection)."""
        return [self.of(name) for name in PROJECTION.inputs]

    def dlq(self, stage_name: str) -> str:
        """Where a stage dead-letters what it cannot process: ``<prefix>.<stage>.dlq``."""
        return self.of(f"{stage_name}.dlq")

    def all(self) -> list[str]:
        """Every topic Sluice creates: the stage topics and one DLQ per stage."""
        return [*(self.of(s) for s in topic_suffixes()), *(self.dlq(s) for s in STAGES)]
