"""The Faust application: the worker process that runs Sluice's stage agents and holds its tables.

``faust -A app.faust_app worker`` and ``sluice worker`` both start it. Everything is configured from
:class:`app.settings.Settings`, so several workers (or test runs) differ only by environment.
"""

from __future__ import annotations

from app.faust_worker import create_app
from app.settings import get_settings
from app.topics import TopicNames

settings = get_settings()
topics = TopicNames(settings.topic_prefix)
app = create_app(settings)

# The pipeline's agents and the worker's web views register themselves on `app` when imported.
from app import pipeline, worker_web  # noqa: E402, F401
