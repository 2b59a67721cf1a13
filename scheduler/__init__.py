"""The scheduler, above the marketplace: pure algorithms (``matching``, and ``audit``'s
recomputation), the prober (``probing``, which opens swarm connections), orchestration
services over the marketplace by task family (``services``: planning, replanning,
housekeeping, probes, settlement, audits, placement), the Celery app and thin tasks
(``celery``, ``tasks``, ``broker``), and its Django app (``scheduler.app``: the scheduling
API, hooks and health check). Importing this package imports neither Django nor Celery;
see ``scheduler/README.md`` for how to run workers and beat."""
