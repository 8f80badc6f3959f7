"""The worker: Sluice's stages run as Faust agents over Kafka, with their tables.

One concept a module (docs/architecture.md draws the map):

- :mod:`~app.worker.registry`: every stage's name, input and output topics and event types;
- :mod:`~app.worker.ports`: the small typed protocols the runner is handed (producer, changelog,
  clock, tenants, telemetry), so it runs the same against Kafka and in memory;
- :mod:`~app.worker.runner`: the per-record loop (decode, idempotency, retry, commit order);
- :mod:`~app.worker.quarantine` and :mod:`~app.worker.redrive`: dead letters, ordered quarantine,
  and an operator's redrive or discard;
- :mod:`~app.worker.outcomes`: each outcome's stat, metric and span record, from one table;
- :mod:`~app.worker.stages` and :mod:`~app.worker.projection`: what each stage does with an event
  (around the pure functions in agents/) and the fold into the ``exceptions`` table;
- :mod:`~app.worker.faust_app` and :mod:`~app.worker.wiring`: the Faust app, its topics, tables and
  agents, built when a worker starts (:func:`app.worker.wiring.build_worker`);
- :mod:`~app.worker.web`: the worker's read endpoints; :mod:`~app.worker.memory`: in-memory ports.

Importing any of them starts nothing: configuration is read, and the Faust app built, only when a
worker starts.
"""
