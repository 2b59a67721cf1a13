"""The scheduler's Django app (label ``scheduling``): it queues matching for new jobs, settlement
for uploaded receipts and decisions for audits through the marketplace's hooks, adds the broker
to ``/healthz``, serves the replanning and placement API, and gives ``hivemart-market`` its
``worker`` and ``beat`` commands. The marketplace names it only by string (``INSTALLED_APPS``,
``marketplace/urls.py``), so the scheduler depends on the marketplace and not the reverse."""
