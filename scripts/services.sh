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
