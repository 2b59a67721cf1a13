"""The scheduler: pure algorithms (``matching``, ``spans``, ``probing``), orchestration
services over the marketplace (``services``), and the Celery app and thin tasks
(``celery``, ``tasks``). Importing this package imports neither Django nor Celery;
see ``scheduler/README.md`` for how to run workers and beat."""
