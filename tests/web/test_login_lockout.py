"""Web login lockout (marketplace.accounts.lockout): wrong passwords lock a (username, address)
out, then even the right password is refused; the count is shared by every web process
through the cache (two real gunicorn servers over one SQLite file, and over one Redis), and
so is the sign-up throttle."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from django.test import Client
from django.urls import reverse

from marketplace.accounts.services import user_create

BIN = Path(sys.executable).parent
PASSWORD = "correct horse battery staple"
START_TIMEOUT_S = 120  # a loaded machine may be slow to start gunicorn; not a timing assertion


@pytest.fixture(autouse=True)
def fresh_counts() -> Iterator[None]:
    """Failure counts from other tests (the suite's cache outlives a test) must not lock these out."""
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


def post_login(client: Client, username: str, password: str, address: str = "203.0.113.7") -> int:
    return client.post(
        reverse("web:login"), {"username": username, "password": password}, REMOTE_ADDR=address
    ).status_code


@pytest.mark.django_db
def test_wrong_passwords_lock_the_pair_and_then_the_right_password_is_refused(settings) -> None:  # noqa: ANN001
    settings.HIVEMART_LOGIN_FAILURES = 5
    user_create(username="victim", password=PASSWORD)
    client = Client()
    assert [post_login(client, "victim", f"guess-{i}") for i in range(6)] == [200] * 4 + [429] * 2
    locked = client.post(reverse("web:login"), {"username": "victim", "password": PASSWORD}, REMOTE_ADDR="203.0.113.7")
    assert locked.status_code == 429 and b"Too many failed log-ins" in locked.content
    assert "_auth_user_id" not in client.session
    # Case variants of the name are the same account's counter, not a way around it.
    assert post_login(client, "VICTIM", PASSWORD) == 429
    # The owner, from elsewhere, is not locked out by a stranger's guessing.
    assert post_login(Client(), "victim", PASSWORD, address="198.51.100.1") == 302


@pytest.mark.django_db
def test_a_success_clears_the_count_before_the_limit(settings) -> None:  # noqa: ANN001
    settings.HIVEMART_LOGIN_FAILURES = 3
    user_create(username="forgetful", password=PASSWORD)
    assert [post_login(Client(), "forgetful", "nope") for _ in range(2)] == [200, 200]
    assert post_login(Client(), "forgetful", PASSWORD) == 302
    assert [post_login(Client(), "forgetful", "nope") for _ in range(2)] == [200, 200]  # counted from zero again


@pytest.mark.django_db
def test_spraying_many_usernames_from_one_address_locks_the_address(settings) -> None:  # noqa: ANN001
    settings.HIVEMART_LOGIN_FAILURES = 2  # the address limit is 4x: 8 failures over any names
    user_create(username="target", password=PASSWORD)
    statuses = [post_login(Client(), f"user-{i}", "password1") for i in range(9)]
    assert statuses[:7] == [200] * 7 and statuses[7:] == [429, 429]
    assert post_login(Client(), "target", PASSWORD) == 429
    assert post_login(Client(), "target", PASSWORD, address="198.51.100.2") == 302


@pytest.mark.django_db
def test_the_admin_login_is_behind_the_same_lockout(settings) -> None:  # noqa: ANN001
    settings.HIVEMART_LOGIN_FAILURES = 2
    user_create(username="boss", password=PASSWORD, is_staff=True)
    for _ in range(2):
        post_login(Client(), "boss", "wrong")
    admin = Client()
    response = admin.post(
        "/admin/login/", {"username": "boss", "password": PASSWORD, "next": "/admin/"}, REMOTE_ADDR="203.0.113.7"
    )
    assert response.status_code == 200 and "_auth_user_id" not in admin.session  # refused, form shown again
    assert (
        Client()
        .post(
            "/admin/login/", {"username": "boss", "password": PASSWORD, "next": "/admin/"}, REMOTE_ADDR="198.51.100.3"
        )
        .status_code
        == 302
    )


# --- shared across processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(home: Path, **extra: str) -> dict[str, str]:
    """Production settings on plain loopback HTTP, behind one (simulated) proxy hop so each test
    can name its own client address in X-Forwarded-For."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HIVEMART_", "DJANGO_"))}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "marketplace.settings",
            "SECRET_KEY": secrets.token_urlsafe(50),
            "DEBUG": "false",
            "HIVEMART_HTTPS": "false",
            "HIVEMART_HOME": str(home),
            "DATABASE_URL": "",
            "REDIS_URL": "",
            "HIVEMART_PROXY_HOPS": "1",
            "HIVEMART_LOGIN_FAILURES": "5",
            "HIVEMART_SIGNUP_RATE": "2/hour",
            "HIVEMART_MATCH_ON_CREATE": "false",
            **extra,
        }
    )
    return env


def redis_url_or_skip() -> str:
    url = os.environ.get("REDIS_URL", "")
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run this against Redis (REDIS_URL=redis://...)")
        pytest.skip("needs Redis: set REDIS_URL=redis://127.0.0.1:6379/0")
    return url


def redis_cache_clean(url: str) -> None:
    """Drop the marketplace cache's keys (lockouts, throttles) from the test Redis, nothing else."""
    import redis

    client = redis.Redis.from_url(url)
    for key in client.scan_iter("hivemart-cache:*"):
        client.delete(key)


@pytest.fixture
def two_servers(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Two gunicorn servers (separate processes) over one marketplace: what two web workers,
    or two web machines, are. ``request.param``: which shared cache ("database" or "redis")."""
    extra = {}
    if request.param == "redis":
        extra["REDIS_URL"] = redis_url_or_skip()
        redis_cache_clean(extra["REDIS_URL"])
        request.addfinalizer(lambda: redis_cache_clean(extra["REDIS_URL"]))
    env = server_env(tmp_path / "home", **extra)
    migrate = subprocess.run(
        [sys.executable, "-m", "marketplace.manage", "migrate", "--no-input"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    create = subprocess.run(
        [
            sys.executable,
            "-m",
            "marketplace.manage",
            "shell",
            "-c",
            f"from marketplace.accounts.services import user_create; "
            f"user_create(username='shared', password={PASSWORD!r})",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert create.returncode == 0, create.stderr[-3000:]
    procs, urls = [], []
    try:
        for i in range(2):
            port = free_port()
            log = (tmp_path / f"web{i}.log").open("w")
            procs.append(
                subprocess.Popen(
                    [
                        str(BIN / "gunicorn"),
                        "marketplace.wsgi:application",
                        "--bind",
                        f"127.0.0.1:{port}",
                        "--workers",
                        "1",
                    ],
                    env=env,
                    cwd=tmp_path,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        for proc, url in zip(procs, urls, strict=False):
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                assert proc.poll() is None, (tmp_path / "web0.log").read_text()[-3000:]
                try:
                    if httpx.get(f"{url}/healthz", timeout=5).status_code in (200, 503):
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"{url} never answered"
                time.sleep(0.3)
        yield urls
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def form_post(url: str, path: str, data: dict[str, str], address: str) -> httpx.Response:
    """GET the form for its CSRF token, then POST it, as a browser at ``address`` would."""
    with httpx.Client(base_url=url, headers={"X-Forwarded-For": address}, timeout=30) as browser:
        page = browser.get(path)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        return browser.post(path, data={**data, "csrfmiddlewaretoken": token})


def shared_lockout_and_signup(urls: list[str]) -> None:
    address = f"10.{secrets.randbelow(250)}.{secrets.randbelow(250)}.{secrets.randbelow(250)}"
    # Five wrong passwords, alternating between the servers: the fifth locks, wherever it lands.
    statuses = [
        form_post(urls[i % 2], "/login/", {"username": "shared", "password": f"no-{i}"}, address).status_code
        for i in range(6)
    ]
    assert statuses == [200] * 4 + [429] * 2
    for url in urls:
        assert form_post(url, "/login/", {"username": "shared", "password": PASSWORD}, address).status_code == 429
    # The sign-up throttle (2/hour here) counts across the servers too.
    signups = [
        form_post(
            urls[i % 2],
            "/signup/",
            {"username": f"new-{address}-{i}".replace(".", "-"), "password1": PASSWORD, "password2": PASSWORD},
            address,
        ).status_code
        for i in range(3)
    ]
    assert signups == [302, 302, 429]


@pytest.mark.slow
@pytest.mark.parametrize("two_servers", ["database", "redis"], indirect=True)
def test_lockout_and_signup_throttle_are_shared_by_processes(two_servers: list[str]) -> None:
    """The embedded default's database cache and production's Redis: either way, the second
    process sees the first one's failures and sign-ups."""
    shared_lockout_and_signup(two_servers)
