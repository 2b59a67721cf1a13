"""Marketplace settings, all driven by environment variables with safe local defaults.

| variable | default | meaning |
|---|---|---|
| ``DATABASE_URL`` | empty: SQLite file ``$HIVEMART_HOME/marketplace.sqlite3`` | e.g. ``postgres://user@host:5432/db`` |
| ``HIVEMART_HOME`` | ``./var`` | where embedded state (the SQLite file) lives |
| ``REDIS_URL`` | empty (the scheduler then uses its embedded broker) | Celery broker for production |
| ``HIVEMART_CACHE_URL`` | empty: Redis at ``REDIS_URL`` if set, else the database | the shared cache (throttles, login lockout) |
| ``DEBUG`` | ``false`` | ``true`` only on a developer machine |
| ``SECRET_KEY`` | required unless ``DEBUG`` (then a random per-process key) | Django's signing key; the example env's placeholder is refused |
| ``ALLOWED_HOSTS`` | ``localhost,127.0.0.1,[::1]`` (``*`` when ``DEBUG``) | comma-separated |
| ``HIVEMART_HTTPS`` | ``true`` unless ``DEBUG`` (``HIVEMART_SECURE_COOKIES`` is an older name) | served over HTTPS: secure cookies, redirect to https, HSTS |
| ``HIVEMART_HSTS_SECONDS`` | ``31536000`` when ``HIVEMART_HTTPS`` | Strict-Transport-Security max-age |
| ``HIVEMART_HSTS_INCLUDE_SUBDOMAINS``, ``HIVEMART_HSTS_PRELOAD`` | ``true`` | the HSTS header's includeSubDomains and preload |
| ``HIVEMART_PROXY_HOPS`` | ``0`` | reverse proxies in front of the web process: trust X-Forwarded-Proto and the last hops of X-Forwarded-For |
| ``CSRF_TRUSTED_ORIGINS`` | empty | extra origins (``https://market.example.org``) allowed to POST forms |
| ``HIVEMART_LOGIN_FAILURES`` | ``5`` | failed web logins per (username, address) before a lockout |
| ``HIVEMART_LOGIN_LOCKOUT_S`` | ``900`` | how long failures count and a lockout lasts |
| ``HIVEMART_PLATFORM_FEE_BPS`` | ``500`` (5 %) | platform fee on captured credits, basis points |
| ``HIVEMART_HEARTBEAT_PERIOD_S`` | ``15`` | seconds between a provider's heartbeats: the Sell page's command tells agents to use it |
| ``HIVEMART_HEARTBEAT_TIMEOUT_S`` | 4 x the period (``60``) | a provider silent this long is marked offline; at least 3 x the period |
| ``HIVEMART_CHALLENGE_TTL_S`` | ``300`` | how long a registration challenge stays valid |
| ``HIVEMART_OPEN_SIGNUP`` | ``true`` | whether ``POST /api/auth/signup/`` is open to anyone |
| ``HIVEMART_SWARM_PEERS`` | empty (no probes) | bootstrap multiaddrs the scheduler's prober joins |
| ``HIVEMART_MODELS_DIR`` | ``$HIVEMART_HOME/models`` | reference checkpoints for probes, ``<dir>/<model_id>/`` |
| ``HIVEMART_PLATFORM_KEY_FILE`` | ``$HIVEMART_HOME/platform.key`` | the Ed25519 key tickets are signed with (created on first use) |
| ``HIVEMART_TICKET_TTL`` | ``3600`` | seconds a job ticket stays valid |
| ``HIVEMART_CREDIT_WINDOW_TOKENS`` | ``4096`` | a ticket's credit window: tokens through its blocks a provider may serve (and be paid for) beyond the client's last countersignature |
| ``HIVEMART_SUSPEND_AFTER`` | ``2`` | offences (failed audits, wrong probe answers) before a provider is suspended |
| ``HIVEMART_AUDIT_REQUIRE_EVIDENCE`` | ``false`` | refuse audits that do not prove the claimed output (receipt + output digests) |
| ``HIVEMART_AUDIT_DEPOSIT`` | ``100000`` | micro-credits an audit without evidence puts down; forfeited when it proves nothing |
| ``HIVEMART_AUDIT_QUOTA_BYTES`` | 64 MiB | audit tensors one user may have stored at once |
| ``HIVEMART_SETTLE_GRACE_S`` | ``30`` | a settling job waits this long for late receipts before it is done |
| ``HIVEMART_STRIPE_SECRET_KEY`` | empty (no Stripe) | Stripe secret key: top-ups through Stripe Checkout |
| ``HIVEMART_STRIPE_WEBHOOK_SECRET`` | empty | the signing secret of the webhook endpoint ``/api/payments/stripe/webhook/`` |
| ``HIVEMART_STRIPE_API_BASE`` | ``https://api.stripe.com`` | where Stripe's API is reached (tests point it at a loopback stand-in) |
| ``HIVEMART_TEST_TOPUPS`` | ``true`` only when ``DEBUG`` and no Stripe key | the test payment provider: top-ups paid on a button, no money; never on in production unless set |
| ``HIVEMART_TOPUP_CURRENCY`` | ``usd`` | the currency top-ups are charged in |
| ``HIVEMART_TOPUP_CREDITS_PER_UNIT`` | ``100`` | whole credits one currency unit buys (100: a credit costs a cent) |
| ``HIVEMART_TOPUP_MINOR_PER_UNIT`` | ``100`` | the currency's smallest units per unit (cents per dollar; 1 for yen) |
| ``HIVEMART_TOPUP_MIN_CREDITS``, ``HIVEMART_TOPUP_MAX_CREDITS`` | ``100``, ``1000000`` | the range of one top-up, whole credits |
| ``HIVEMART_LOG_LEVEL`` | ``INFO`` | log level of the web, worker and beat processes |
| ``HIVEMART_LOG_FORMAT`` | ``text`` | ``text`` (``TIME LEVEL logger: message``) or ``json`` (one object per line) |
| ``HIVEMART_*`` scheduler knobs | see the scheduler section below | intervals, probe size, reliability floor, job deadlines |

To add an app (``receipts``, ``web``, ...): append it to ``HIVEMART_APPS`` and include its
``api_urls`` in ``marketplace/urls.py``.
"""

from __future__ import annotations

import os
import secrets
import warnings
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from hivemart_core.logs import logging_config, parse_log_format

BASE_DIR = Path(__file__).resolve().parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use true or false)")


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ImproperlyConfigured(f"{name}={value} is outside [{minimum}, {maximum}]")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name, "").strip()
    return [item.strip() for item in raw.split(",") if item.strip()] if raw else default


DEBUG = env_bool("DEBUG", False)

SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("set SECRET_KEY (or DEBUG=true for a throwaway development key)")
    # Sessions and signed values do not survive a restart with this key: fine for development only.
    SECRET_KEY = secrets.token_urlsafe(50)
elif "change-me" in SECRET_KEY.lower() and not DEBUG:
    # deploy/hivemart.env.example's placeholder: a key everyone who read the example knows.
    raise ImproperlyConfigured(
        "SECRET_KEY is still the example's placeholder; set a long random one, e.g. "
        "python3 -c 'import secrets; print(secrets.token_urlsafe(50))'"
    )

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["*"] if DEBUG else ["localhost", "127.0.0.1", "[::1]"])

HIVEMART_HOME = Path(os.environ.get("HIVEMART_HOME") or "var").resolve()

# --- applications -------------------------------------------------------------------------

# The marketplace's own apps, one per bounded context. Later apps are appended here.
HIVEMART_APPS = [
    "marketplace.common",
    "marketplace.accounts",
    "marketplace.catalog",
    "marketplace.ledger",
    "marketplace.providers",
    "marketplace.jobs",
    "scheduler.app",
    "marketplace.web",
    "marketplace.receipts",
    "marketplace.payments",
]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI and ReDoc, served from this site (no CDN)
    *HIVEMART_APPS,
]

MIDDLEWARE = [
    "marketplace.common.middleware.RequestIdMiddleware",
    # Body size per endpoint (413) and API URL length (414), before anything reads the request.
    "marketplace.common.middleware.RequestLimitsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "marketplace.web.middleware.ContentSecurityPolicyMiddleware",
    # Serves /static/ from gunicorn itself (the web pages' one stylesheet); no separate file server.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "marketplace.urls"
WSGI_APPLICATION = "marketplace.wsgi.application"
AUTH_USER_MODEL = "accounts.User"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- database -----------------------------------------------------------------------------


def private_sqlite_file(path: Path) -> Path:
    """Create the SQLite file readable by its owner only (it holds password and API key hashes),
    or take group and other access away from an existing one we own. SQLite gives its -wal and
    -shm files the main file's mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        info = path.stat()
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            path.chmod(0o600)
    except OSError:
        pass  # not ours to change (a read-only mount, another user's file): SQLite reports what matters
    return path


_database_url = os.environ.get("DATABASE_URL", "").strip()
if _database_url:
    DATABASES = {"default": dj_database_url.parse(_database_url, conn_max_age=env_int("DB_CONN_MAX_AGE", 0))}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": private_sqlite_file(HIVEMART_HOME / "marketplace.sqlite3"),
            "OPTIONS": {
                # The web server and the scheduler's workers write to the same file. IMMEDIATE
                # transactions take the write lock up front, so two writers queue (for up to
                # `timeout` seconds) instead of failing with "database is locked" on upgrade;
                # this is also what serialises ledger writes where SELECT ... FOR UPDATE is a no-op.
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "").strip()

# The cache holds what every web worker must agree on: throttle counters and login lockouts.
# A per-process cache would count each gunicorn worker apart (N workers, N times the limit),
# so it is always shared: Redis in production, else a table in the database (the embedded
# default; the web app creates it on migrate).
_cache_url = os.environ.get("HIVEMART_CACHE_URL", "").strip() or REDIS_URL
CACHES = {
    "default": (
        {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": _cache_url,
            "KEY_PREFIX": "hivemart-cache",
        }
        if _cache_url
        else {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": "hivemart_cache",
            # Culling drops entries at random once full: a flood of keys must not wash out lockouts.
            "OPTIONS": {"MAX_ENTRIES": 1_000_000},
        }
    )
}

# --- security -----------------------------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Served over HTTPS (directly or behind a TLS proxy): secure cookies, a redirect from http and
# HSTS. Only a site on plain HTTP (the demo on loopback) turns it off.
HIVEMART_HTTPS = not DEBUG and env_bool("HIVEMART_HTTPS", env_bool("HIVEMART_SECURE_COOKIES", True))
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = HIVEMART_HTTPS
SECURE_SSL_REDIRECT = HIVEMART_HTTPS
# Health checks come from inside (compose, the load balancer) over plain HTTP.
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
SECURE_HSTS_SECONDS = env_int("HIVEMART_HSTS_SECONDS", 31_536_000, minimum=0) if HIVEMART_HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("HIVEMART_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = env_bool("HIVEMART_HSTS_PRELOAD", True)
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True

# Behind reverse proxies (nginx, a load balancer), the web process sees the proxy's address and
# plain HTTP. With HIVEMART_PROXY_HOPS=N (the number of proxies that append to X-Forwarded-For),
# X-Forwarded-Proto says whether the client used https and the N-th address from the end of
# X-Forwarded-For is the client's (what throttles and lockouts count). Trust them only when every
# request passes through the proxies: a client reaching gunicorn directly could set both. gunicorn
# itself needs --forwarded-allow-ips (FORWARDED_ALLOW_IPS) naming the proxies (docs/operators.md).
HIVEMART_PROXY_HOPS = env_int("HIVEMART_PROXY_HOPS", 0, minimum=0, maximum=10)
if HIVEMART_PROXY_HOPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Origins besides the site's own (scheme://host[:port]) allowed to POST forms, comma-separated.
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# The pages load nothing from elsewhere and run no inline script (marketplace.web.middleware).
# The API docs (Swagger UI, ReDoc) render styles from script, hence their own policy.
HIVEMART_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
HIVEMART_CSP_DOCS = (
    HIVEMART_CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'") + "; worker-src 'self' blob:"
)
HIVEMART_CSP_DOCS_PATHS = ("/api/docs/", "/api/redoc/")

# Web login (marketplace.accounts.lockout): after HIVEMART_LOGIN_FAILURES wrong passwords for one
# username from one address, that pair is locked out for HIVEMART_LOGIN_LOCKOUT_S; an address is
# locked after 4x as many failures over any usernames, a username after 20x from any addresses.
HIVEMART_LOGIN_FAILURES = env_int("HIVEMART_LOGIN_FAILURES", 5, minimum=1)
HIVEMART_LOGIN_LOCKOUT_S = env_int("HIVEMART_LOGIN_LOCKOUT_S", 900, minimum=1)
AUTHENTICATION_BACKENDS = ["marketplace.accounts.lockout.LockoutModelBackend"]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = HIVEMART_HOME / "static"
# Serve straight from the apps' static folders (read once at start), so `collectstatic` is
# optional: neither the demo nor deploy/ runs it. Files collected into STATIC_ROOT are served too.
WHITENOISE_USE_FINDERS = True
# ... which is why a missing STATIC_ROOT is normal here, not worth a warning on every start.
warnings.filterwarnings("ignore", message=r"No directory at: .*static", category=UserWarning)
LOGIN_URL = "web:login"
LOGIN_REDIRECT_URL = "web:wallet"
LOGOUT_REDIRECT_URL = "web:overview"

# --- API ----------------------------------------------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "marketplace.accounts.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "marketplace.common.pagination.Pagination",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "marketplace.common.exceptions.api_exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"]
    + (["rest_framework.renderers.BrowsableAPIRenderer"] if DEBUG else []),
    "DEFAULT_PARSER_CLASSES": ["marketplace.common.parsers.JSONParser"],  # DRF's, with a nesting limit
    "DEFAULT_THROTTLE_RATES": {
        "signup": os.environ.get("HIVEMART_SIGNUP_RATE", "20/hour"),
        "challenge": os.environ.get("HIVEMART_CHALLENGE_RATE", "120/minute"),
    },
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    # Which X-Forwarded-For entry is the client (0: the connection's own address).
    "NUM_PROXIES": HIVEMART_PROXY_HOPS,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Hivemart marketplace API",
    "DESCRIPTION": "Accounts, API keys, model catalog, providers, jobs and the credit ledger.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # <id:...> path segments (marketplace.common.converters) are integers.
    "PATH_CONVERTER_OVERRIDES": {"id": {"type": "integer"}},
    "ENUM_NAME_OVERRIDES": {
        "JobKind": "marketplace.jobs.models.Job.Kind",
        "JobState": "marketplace.jobs.models.Job.State",
        "ProviderState": "marketplace.providers.models.Provider.State",
        "AccountKind": "marketplace.ledger.models.Account.Kind",
        "TransactionKind": "marketplace.ledger.models.Transaction.Kind",
        "HoldState": "marketplace.ledger.models.Hold.State",
        "ModelDType": "marketplace.catalog.models.CatalogModel.DType",
        "AuditState": "marketplace.receipts.models.Audit.State",
        "AuditVerdict": "marketplace.receipts.models.Audit.Verdict",
    },
}

# --- Hivemart -----------------------------------------------------------------------------

HIVEMART_PLATFORM_FEE_BPS = env_int("HIVEMART_PLATFORM_FEE_BPS", 500, minimum=0, maximum=10_000)
# Agents heartbeat every HIVEMART_HEARTBEAT_PERIOD_S (the Sell page's command says so); one
# silent for HIVEMART_HEARTBEAT_TIMEOUT_S is offline. The timeout must allow a couple of lost or
# late heartbeats, or a healthy provider flaps online/offline.
HIVEMART_HEARTBEAT_PERIOD_S = env_int("HIVEMART_HEARTBEAT_PERIOD_S", 15, minimum=1)
HIVEMART_HEARTBEAT_TIMEOUT_S = env_int("HIVEMART_HEARTBEAT_TIMEOUT_S", 4 * HIVEMART_HEARTBEAT_PERIOD_S, minimum=1)
if HIVEMART_HEARTBEAT_TIMEOUT_S < 3 * HIVEMART_HEARTBEAT_PERIOD_S:
    raise ImproperlyConfigured(
        f"HIVEMART_HEARTBEAT_TIMEOUT_S={HIVEMART_HEARTBEAT_TIMEOUT_S} is less than 3 x "
        f"HIVEMART_HEARTBEAT_PERIOD_S={HIVEMART_HEARTBEAT_PERIOD_S}: providers would be marked offline "
        f"between heartbeats; raise the timeout or lower the period"
    )
HIVEMART_CHALLENGE_TTL_S = env_int("HIVEMART_CHALLENGE_TTL_S", 300, minimum=10)
HIVEMART_OPEN_SIGNUP = env_bool("HIVEMART_OPEN_SIGNUP", True)
# Settlement (marketplace.receipts): the platform key signs job tickets; tickets expire after
# HIVEMART_TICKET_TTL seconds; a provider with HIVEMART_SUSPEND_AFTER offences is suspended;
# a settling job is done once nothing is left to settle and HIVEMART_SETTLE_GRACE_S has passed.
HIVEMART_PLATFORM_KEY_FILE = Path(
    os.environ.get("HIVEMART_PLATFORM_KEY_FILE") or HIVEMART_HOME / "platform.key"
).resolve()
HIVEMART_TICKET_TTL = env_int("HIVEMART_TICKET_TTL", 3600, minimum=10)
# The payment channel's credit window (docs/protocol.md): a ticket for b blocks states
# HIVEMART_CREDIT_WINDOW_TOKENS * b work units (at most its max_units).
HIVEMART_CREDIT_WINDOW_TOKENS = env_int("HIVEMART_CREDIT_WINDOW_TOKENS", 4096, minimum=1, maximum=2**40)
HIVEMART_SUSPEND_AFTER = env_int("HIVEMART_SUSPEND_AFTER", 2, minimum=1)
HIVEMART_REPUTATION_PENALTY = env_int("HIVEMART_REPUTATION_PENALTY", 25, minimum=0, maximum=100)
HIVEMART_SETTLE_GRACE_S = env_int("HIVEMART_SETTLE_GRACE_S", 30, minimum=0)
# Audits (POST /api/audits/) carry three tensors of up to 8 MiB each, base64-encoded.
DATA_UPLOAD_MAX_MEMORY_SIZE = 36 * 1024 * 1024
# Refuse audits that do not prove the claimed output was signed for by the provider (receipt +
# output digests, see docs/protocol.md), even with a deposit.
HIVEMART_AUDIT_REQUIRE_EVIDENCE = env_bool("HIVEMART_AUDIT_REQUIRE_EVIDENCE", False)
# An audit without that evidence needs a deposit of at least this many micro-credits from the
# reporter's wallet: returned if the provider is found cheating, forfeited to the platform (it
# paid for the recomputation) when the audit proves nothing.
HIVEMART_AUDIT_DEPOSIT = env_int("HIVEMART_AUDIT_DEPOSIT", 100_000, minimum=1)
# Bytes of audit tensors one user may have stored at once (over all their jobs); an audit's
# tensors are dropped once it is decided.
HIVEMART_AUDIT_QUOTA_BYTES = env_int("HIVEMART_AUDIT_QUOTA_BYTES", 64 * 1024 * 1024, minimum=0)
HIVEMART_SETTLE_INTERVAL_S = env_int("HIVEMART_SETTLE_INTERVAL_S", 10, minimum=1)

# Money in and out (marketplace.payments; docs/operators.md). Top-ups go through Stripe Checkout
# when a secret key is set; the webhook's signing secret authenticates what Stripe reports.
HIVEMART_STRIPE_SECRET_KEY = os.environ.get("HIVEMART_STRIPE_SECRET_KEY", "").strip()
HIVEMART_STRIPE_WEBHOOK_SECRET = os.environ.get("HIVEMART_STRIPE_WEBHOOK_SECRET", "").strip()
HIVEMART_STRIPE_API_BASE = os.environ.get("HIVEMART_STRIPE_API_BASE", "").strip() or "https://api.stripe.com"
if HIVEMART_STRIPE_SECRET_KEY and not HIVEMART_STRIPE_WEBHOOK_SECRET:
    raise ImproperlyConfigured(
        "HIVEMART_STRIPE_SECRET_KEY is set without HIVEMART_STRIPE_WEBHOOK_SECRET: paid top-ups could never be "
        "credited (set the webhook endpoint's signing secret, see docs/operators.md)"
    )
if HIVEMART_STRIPE_SECRET_KEY:
    # The top-up form's answer redirects to Stripe's checkout page, and browsers hold a form's
    # redirects to form-action too.
    HIVEMART_CSP = HIVEMART_CSP.replace("form-action 'self'", "form-action 'self' https://checkout.stripe.com")
# The test payment provider (a button on this site pays, no money moves in): on for a developer
# machine without Stripe, never in production unless an operator sets it (the demo does).
HIVEMART_TEST_TOPUPS = env_bool("HIVEMART_TEST_TOPUPS", DEBUG and not HIVEMART_STRIPE_SECRET_KEY)
HIVEMART_TOPUP_CURRENCY = (os.environ.get("HIVEMART_TOPUP_CURRENCY", "").strip() or "usd").lower()
if len(HIVEMART_TOPUP_CURRENCY) != 3 or not HIVEMART_TOPUP_CURRENCY.isalpha():
    raise ImproperlyConfigured("HIVEMART_TOPUP_CURRENCY is a three-letter ISO 4217 code such as usd or eur")
HIVEMART_TOPUP_CREDITS_PER_UNIT = env_int("HIVEMART_TOPUP_CREDITS_PER_UNIT", 100, minimum=1, maximum=10**9)
HIVEMART_TOPUP_MINOR_PER_UNIT = env_int("HIVEMART_TOPUP_MINOR_PER_UNIT", 100, minimum=1, maximum=1000)
HIVEMART_TOPUP_MIN_CREDITS = env_int("HIVEMART_TOPUP_MIN_CREDITS", 100, minimum=1, maximum=10**9)
HIVEMART_TOPUP_MAX_CREDITS = env_int(
    "HIVEMART_TOPUP_MAX_CREDITS", 1_000_000, minimum=HIVEMART_TOPUP_MIN_CREDITS, maximum=10**9
)

# --- scheduler (Celery; see scheduler/celery.py and scheduler/README.md) ------------------

# Broker: Redis at REDIS_URL when set; otherwise kombu's filesystem transport under
# $HIVEMART_HOME/celery, which the web process, workers and beat on one machine share.
HIVEMART_CELERY_QUEUE = os.environ.get("HIVEMART_CELERY_QUEUE", "").strip() or "hivemart"
# Enqueue job_match when a job is created (after commit). Tests turn it off where no worker runs.
HIVEMART_MATCH_ON_CREATE = env_bool("HIVEMART_MATCH_ON_CREATE", True)
# Enqueue receipts_settle after an upload accepts receipts, and audit_decide after an audit is
# filed (after commit); off wherever matching on create is off (tests without a worker), unless set.
HIVEMART_SETTLE_ON_UPLOAD = env_bool("HIVEMART_SETTLE_ON_UPLOAD", HIVEMART_MATCH_ON_CREATE)
HIVEMART_PLAN_BACKUPS = env_int("HIVEMART_PLAN_BACKUPS", 2, minimum=0, maximum=16)
# A provider whose latest measured success rate is below this (percent) is degraded: never planned.
HIVEMART_RELIABILITY_FLOOR_PCT = env_int("HIVEMART_RELIABILITY_FLOOR_PCT", 90, minimum=0, maximum=100)
HIVEMART_HOUSEKEEPING_INTERVAL_S = env_int("HIVEMART_HOUSEKEEPING_INTERVAL_S", 30, minimum=1)
# How long the API remembers an Idempotency-Key and its response (marketplace.common.idempotency):
# a retry within this window replays the first answer; after it the key may be used afresh.
HIVEMART_IDEMPOTENCY_RETENTION_S = env_int("HIVEMART_IDEMPOTENCY_RETENTION_S", 24 * 3600, minimum=60)
# A request that has held its key this long without answering is presumed dead (a killed worker;
# gunicorn's timeout is 60 s), and a retry with the same key may run it again.
HIVEMART_IDEMPOTENCY_LOCK_S = env_int("HIVEMART_IDEMPOTENCY_LOCK_S", 120, minimum=1)
HIVEMART_PROBE_INTERVAL_S = env_int("HIVEMART_PROBE_INTERVAL_S", 300, minimum=5)
HIVEMART_PROBE_TOKENS = env_int("HIVEMART_PROBE_TOKENS", 16, minimum=1, maximum=4096)
HIVEMART_PROBE_REQUESTS = env_int("HIVEMART_PROBE_REQUESTS", 2, minimum=1, maximum=100)
HIVEMART_PROBE_TIMEOUT_S = env_int("HIVEMART_PROBE_TIMEOUT_S", 30, minimum=1)
# Bootstrap multiaddrs the prober joins the swarm through; no probes without them.
HIVEMART_SWARM_PEERS = env_list("HIVEMART_SWARM_PEERS", [])
# Checkpoints the prober computes reference outputs from: <HIVEMART_MODELS_DIR>/<model_id>/.
HIVEMART_MODELS_DIR = Path(os.environ.get("HIVEMART_MODELS_DIR") or HIVEMART_HOME / "models").resolve()
# Pending or planned jobs with no transition for this long fail, releasing their holds.
HIVEMART_JOB_IDLE_TIMEOUT_S = env_int("HIVEMART_JOB_IDLE_TIMEOUT_S", 3600, minimum=1)
# Running jobs fail this long after they started running.
HIVEMART_JOB_RUN_TIMEOUT_S = env_int("HIVEMART_JOB_RUN_TIMEOUT_S", 86400, minimum=1)

# One line per record on stderr, for every logger (Django's, the scheduler's, Celery's; the
# worker and beat use this too, scheduler.celery): text ("TIME LEVEL logger: message") or, with
# HIVEMART_LOG_FORMAT=json, one JSON object per line (a traceback stays in its record).
try:
    HIVEMART_LOG_FORMAT = parse_log_format(os.environ.get("HIVEMART_LOG_FORMAT") or "text")
except ValueError as e:
    raise ImproperlyConfigured(f"HIVEMART_LOG_FORMAT: {e}") from None
try:
    LOGGING = logging_config(os.environ.get("HIVEMART_LOG_LEVEL") or "INFO", HIVEMART_LOG_FORMAT)
except ValueError as e:
    raise ImproperlyConfigured(f"HIVEMART_LOG_LEVEL: {e}") from None
