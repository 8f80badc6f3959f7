"""The one place that names Sluice's topics.

Stage topics are keyed by exception id, so all events of one exception land in one partition and are
processed in order. The grouping topic is keyed by tenant and fingerprint, so repeats of one fingerprint
meet in one partition whatever exception they belong to; an exception keeps the fingerprint of its first
report, so its events also stay in one grouping partition, in order. Names are ``<prefix>.<name>``; the
prefix (Settings.topic_prefix) lets several deployments or test runs share one cluster.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TopicNames:
    prefix: str

    def _t(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    @property
    def ingested(self) -> str:
        """ExceptionIngested, written by the API; read by intake."""
        return self._t("ingested")

    @property
    def fingerprinted(self) -> str:
        """ExceptionFingerprinted, keyed by tenant+fingerprint; read by grouping."""
        return self._t("fingerprinted")

    @property
    def accepted(self) -> str:
        """ExceptionAccepted; read by triage."""
        return self._t("accepted")

    @property
    def triaged(self) -> str:
        """ExceptionTriaged; read by policy."""
        return self._t("triaged")

    @property
    def decided(self) -> str:
        """ExceptionDecided; read by playbook."""
        return self._t("decided")

    @property
    def planned(self) -> str:
        """ExceptionPlanned; read by the tool stage."""
        return self._t("planned")

    @property
    def completed(self) -> str:
        """ExceptionCompleted: the end of the chain."""
        return self._t("completed")

    @property
    def operations(self) -> str:
        """Dead letters, parking, quarantine lifts, and requests to the projection stage."""
        return self._t("operations")

    def input_of(self, stage: str) -> str:
        """The topic a stage consumes: where an operator's redrive request for it must go."""
        return {
            "intake": self.ingested,
            "group": self.fingerprinted,
            "triage": self.accepted,
            "policy": self.triaged,
            "playbook": self.decided,
            "tool": self.planned,
            "projection": self.operations,
        }[stage]

    def history(self) -> list[str]:
        """The topics whose events form an exception's history (read by the projection)."""
        return [
            self.ingested,
            self.accepted,
            self.triaged,
            self.decided,
            self.planned,
            self.completed,
            self.operations,
        ]

    def dlq(self, stage: str) -> str:
        """Where a stage dead-letters what it cannot process: ``<prefix>.<stage>.dlq``."""
        return self._t(f"{stage}.dlq")

    def all(self) -> list[str]:
        return [*self.history(), self.fingerprinted, *(self.dlq(s) for s in STAGES)]


# Every consuming stage, in pipeline order; each has a DLQ topic.
STAGES = ("intake", "group", "triage", "policy", "playbook", "tool", "projection")
