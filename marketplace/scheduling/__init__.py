"""The marketplace side of the scheduler: queues matching for new jobs, the replanning and
placement API, and the ``worker``/``beat`` management commands (``scheduler/`` holds the rest)."""
