"""The one place that names Sluice's topics.

Every stage topic is keyed by exception id, so all events of one exception land in one partition and are
processed in order. Names are ``<prefix>.<stage>``; the prefix comes from Settings.topic_prefix, which
lets several Sluice deployments (or tests) share one cluster.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TopicNames:
    prefix: str

    @property
    def ingested(self) -> str:
        return f"{self.prefix}.ingested"

    def all(self) -> list[str]:
        return [self.ingested]
