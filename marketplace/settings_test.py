"""Settings for the test suite: the real settings (database from DATABASE_URL, ...) plus a
fixed throwaway SECRET_KEY and a fast password hasher.

pytest-django loads these (``DJANGO_SETTINGS_MODULE`` in pyproject.toml) before any conftest
runs, so this is the one place where the test environment can supply a SECRET_KEY; it goes
into ``os.environ`` so that processes the tests start (Celery workers, provider agents)
inherit the same settings.
"""

import os

os.environ.setdefault("SECRET_KEY", "hivemart-tests-only-not-a-secret")
# Every test signs up from 127.0.0.1; the production rate would start refusing them part-way
# through the suite (test_api.py checks the throttle itself with a low rate).
os.environ.setdefault("HIVEMART_SIGNUP_RATE", "100000/hour")
os.environ.setdefault("HIVEMART_CHALLENGE_RATE", "100000/minute")
# No worker consumes the queue in most tests; tests/scheduler turns matching-on-create on
# where a real worker runs.
os.environ.setdefault("HIVEMART_MATCH_ON_CREATE", "false")

# The test client speaks plain HTTP; tests of the HTTPS settings start processes of their own.
os.environ.setdefault("HIVEMART_HTTPS", "false")

from marketplace.settings import *  # noqa: E402,F401,F403

# In-process tests share one process, so a per-process cache is shared enough, and it keeps
# cache writes out of the test database (live_server tests on in-memory SQLite share one
# connection between threads) and off the Redis that REDIS_URL names for the Celery tests (where
# cache.clear() would flush the broker). The shared caches (the database's, Redis) are tested with
# processes of their own running the production settings: tests/web/test_login_lockout.py.
if not os.environ.get("HIVEMART_CACHE_URL"):
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
