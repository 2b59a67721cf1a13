"""The Hivemart marketplace: a Django project with one app per bounded context.

Apps: ``accounts`` (users, API keys), ``catalog`` (models that may be served), ``providers``
(registration, heartbeats, measured figures), ``jobs`` (jobs, plans, state machine) and
``ledger`` (double-entry credits). ``common`` holds the pieces every app shares: the
``ApplicationError`` hierarchy, the API exception handler, request ids and pagination.
"""
