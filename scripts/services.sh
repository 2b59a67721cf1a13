# Starts the PostgreSQL and Redis servers the test suite runs against, when they are not up.
# Sourced by scripts/test. In CI (CI=true) a service that cannot start is a hard failure;
# on a developer machine the tests that need it are skipped with a reason instead.

_service_fail() {
    if [ "${CI:-}" = "true" ]; then
        echo "error: $1" >&2
        exit 1
    fi
    echo "warning: $1 (tests that need it will be skipped)" >&2
}

ensure_postgres() {
    if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then return 0; fi
    if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
        echo "starting PostgreSQL" >&2
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
        for _ in $(seq 1 30); do
            pg_isready -q -h 127.0.0.1 -p 5432 && return 0
            sleep 1
        done
    fi
    _service_fail "PostgreSQL is not reachable on 127.0.0.1:5432 and could not be started"
    unset DATABASE_URL
    return 1
}

ensure_redis() {
    if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then return 0; fi
    if command -v redis-server >/dev/null; then
        echo "starting Redis" >&2
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
        for _ in $(seq 1 30); do
            redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && return 0
            sleep 1
        done
    fi
    _service_fail "Redis is not reachable on 127.0.0.1:6379 and could not be started"
    unset REDIS_URL
    return 1
}

# The browser test (tests/web/test_browser.py) drives Debian's chromium through Playwright,
# which must never download a browser of its own. Installs the package when it is missing.
ensure_chromium() {
    local browser="${HIVEMART_CHROMIUM:-/usr/bin/chromium}"
    if [ -x "$browser" ]; then return 0; fi
    if command -v apt-get >/dev/null && [ "$(id -u)" = "0" ]; then
        echo "installing chromium (for the browser test)" >&2
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } \
            >/tmp/hivemart-chromium-install.log 2>&1 || tail -n 20 /tmp/hivemart-chromium-install.log >&2
        if [ -x "$browser" ]; then return 0; fi
    fi
    # In CI the test itself fails too (it does not skip when CI=true); failing here says why sooner.
    _service_fail "chromium is not installed at $browser and could not be installed (apt-get install chromium)"
    return 1
}
