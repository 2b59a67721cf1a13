"""Production hardening: ``check --deploy`` is clean with the example env's settings and the
placeholder SECRET_KEY is refused; a login POST through a TLS proxy hop (not on 127.0.0.1)
works with the documented proxy settings and fails without them; the SQLite file is private;
every page carries a Content-Security-Policy and the API docs load nothing from elsewhere."""

from __future__ import annotations

import http.client
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from django.test import Client

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PASSWORD = "correct horse battery staple"
START_TIMEOUT_S = 120  # a loaded machine may be slow to start gunicorn; not a timing assertion
# Where the proxy connects from: a loopback address that is not gunicorn's default trusted 127.0.0.1.
PROXY_SOURCE = "127.0.0.2"
PUBLIC_HOST = "market.example.org"


def example_env(**overrides: str) -> dict[str, str]:
    """The process environment of a compose service: deploy/hivemart.env.example's settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HIVEMART_", "DJANGO_"))
        and k not in {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "DEBUG", "ALLOWED_HOSTS"}
    }
    for line in (ROOT / "deploy" / "hivemart.env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    env.update(DJANGO_SETTINGS_MODULE="marketplace.settings", **overrides)
    return env


def manage(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "marketplace.manage", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


# --- settings ---------------------------------------------------------------------------------------


def test_check_deploy_is_clean_with_the_example_settings(tmp_path: Path) -> None:
    env = example_env(
        SECRET_KEY=secrets.token_urlsafe(50),
        HIVEMART_HOME=str(tmp_path / "home"),
        HIVEMART_PLATFORM_KEY_FILE=str(tmp_path / "platform.key"),
    )
    result = manage(env, "check", "--deploy", "--fail-level", "WARNING", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout
    # Without the HTTPS settings, the same check fails: it does look at them.
    plain = manage({**env, "HIVEMART_HTTPS": "false"}, "check", "--deploy", "--fail-level", "WARNING", cwd=tmp_path)
    assert plain.returncode != 0 and "security.W004" in plain.stderr + plain.stdout


def test_the_example_placeholder_secret_key_is_refused(tmp_path: Path) -> None:
    env = example_env(HIVEMART_HOME=str(tmp_path / "home"))
    assert "CHANGE-ME" in env["SECRET_KEY"]
    result = manage(env, "check", cwd=tmp_path)
    assert result.returncode != 0 and "placeholder" in result.stderr


def test_the_sqlite_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {
        **example_env(SECRET_KEY=secrets.token_urlsafe(50), HIVEMART_HOME=str(home)),
        "DATABASE_URL": "",
        "REDIS_URL": "",
        "HIVEMART_CACHE_URL": "",
    }
    assert manage(env, "migrate", "--no-input", cwd=tmp_path).returncode == 0
    database = home / "marketplace.sqlite3"
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) & 0o077 == 0
    # A file an older version left world-readable is made private on the next start.
    database.chmod(0o644)
    assert manage(env, "check", cwd=tmp_path).returncode == 0
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    # SQLite gives its write-ahead log the main file's mode.
    for extra in home.glob("marketplace.sqlite3-*"):
        assert stat.S_IMODE(extra.stat().st_mode) & 0o077 == 0, extra


# --- pages ------------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/", "/login/", "/signup/", "/providers/", "/api/models/", "/admin/login/"])
def test_every_response_has_a_content_security_policy(path: str, settings) -> None:  # noqa: ANN001
    policy = Client().get(path)["Content-Security-Policy"]
    assert policy == settings.HIVEMART_CSP
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy


@pytest.mark.django_db
def test_pages_run_no_inline_script_and_load_nothing_from_elsewhere() -> None:
    for path in ("/", "/login/", "/signup/", "/providers/", "/sell/", "/api/docs/", "/api/redoc/"):
        body = Client().get(path).content.decode()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", body), f"{path} has an inline script"
        assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", body), f"{path} loads from another site"


@pytest.mark.django_db
def test_api_docs_are_served_from_the_package() -> None:
    client = Client()
    swagger = client.get("/api/docs/")
    assert swagger.status_code == 200 and "'unsafe-inline'" in swagger["Content-Security-Policy"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', swagger.content.decode())
    assert any("swagger-ui-bundle.js" in a for a in assets) and any("swagger-ui.css" in a for a in assets)
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert b"".join(response.streaming_content if response.streaming else [response.content]), asset
    init = client.get("/api/docs/?script=")
    assert init["Content-Type"].startswith("application/javascript") and b"SwaggerUIBundle" in init.content
    redoc = client.get("/api/redoc/").content.decode()
    bundle = re.search(r'src="([^"]+redoc\.standalone\.js)"', redoc).group(1)
    assert client.get(bundle).status_code == 200


# --- a TLS proxy hop --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy(ThreadingHTTPServer):
    """A reverse proxy that 'terminated TLS': it forwards to gunicorn from PROXY_SOURCE, sets
    X-Forwarded-Proto: https and appends the client to X-Forwarded-For, as nginx does."""

    daemon_threads = True

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(BaseHTTPRequestHandler):
    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in {"x-forwarded-proto", "connection"}}
        headers["X-Forwarded-Proto"] = "https"
        headers["X-Forwarded-For"] = ", ".join(
            filter(None, [self.headers.get("X-Forwarded-For"), self.client_address[0]])
        )
        upstream = http.client.HTTPConnection(
            "127.0.0.1",
            self.server.upstream_port,
            timeout=60,  # type: ignore
            source_address=(PROXY_SOURCE, 0),
        )
        try:
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in {"connection", "transfer-encoding", "content-length"}:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        finally:
            upstream.close()

    do_GET = do_POST = _forward

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def web_behind_proxy(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """gunicorn with the example env's settings on SQLite, and a proxy hop in front of it.
    ``request.param``: settings to change. Yields (the proxy's url, gunicorn's url)."""
    try:
        with socket.create_connection(("127.0.0.1", 9), source_address=(PROXY_SOURCE, 0), timeout=1):
            pass
    except ConnectionRefusedError:
        pass  # the address exists (nothing listens on port 9)
    except OSError:
        pytest.skip(f"this machine cannot send from {PROXY_SOURCE}")
    home = tmp_path / "home"
    env = {
        **example_env(
            SECRET_KEY=secrets.token_urlsafe(50),
            HIVEMART_HOME=str(home),
            FORWARDED_ALLOW_IPS=PROXY_SOURCE,
            ALLOWED_HOSTS=f"{PUBLIC_HOST},127.0.0.1",
        ),
        "DATABASE_URL": "",
        "REDIS_URL": "",
        "HIVEMART_CACHE_URL": "",
        "HIVEMART_MATCH_ON_CREATE": "false",
        **request.param,
    }
    assert manage(env, "migrate", "--no-input", cwd=tmp_path).returncode == 0
    created = manage(
        env,
        "shell",
        "-c",
        "from marketplace.accounts.services import user_create; "
        f"user_create(username='operator', password={PASSWORD!r})",
        cwd=tmp_path,
    )
    assert created.returncode == 0, created.stderr
    port = free_port()
    log = (tmp_path / "web.log").open("w")
    web = subprocess.Popen(
        [str(BIN / "gunicorn"), "marketplace.wsgi:application", "--bind", f"127.0.0.1:{port}", "--workers", "1"],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proxy = Proxy(port)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert web.poll() is None, (tmp_path / "web.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code in (200, 503):
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gunicorn never answered"
            time.sleep(0.3)
        yield f"http://127.0.0.1:{proxy.server_address[1]}", f"http://127.0.0.1:{port}"
    finally:
        proxy.shutdown()
        proxy.server_close()
        web.send_signal(signal.SIGTERM)
        try:
            web.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(web.pid, signal.SIGKILL)
            web.wait(timeout=30)
        log.close()


def browser_login(proxy_url: str) -> tuple[httpx.Response, httpx.Response]:
    """The login page and the login POST through the proxy, as a browser on https://PUBLIC_HOST
    sends them. Secure cookies are carried by hand: httpx would not send them to an http:// url."""
    with httpx.Client(base_url=proxy_url, headers={"Host": PUBLIC_HOST}, timeout=30) as browser:
        page = browser.get("/login/")
        if page.status_code != 200:
            return page, page
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        cookie = page.headers["set-cookie"].split(";", 1)[0]
        posted = browser.post(
            "/login/",
            data={"username": "operator", "password": PASSWORD, "csrfmiddlewaretoken": token},
            headers={"Origin": f"https://{PUBLIC_HOST}", "Cookie": cookie},
        )
        return page, posted


@pytest.mark.slow
@pytest.mark.parametrize("web_behind_proxy", [{}], indirect=True)
def test_a_login_through_a_tls_proxy_hop_works_with_the_documented_settings(web_behind_proxy: tuple[str, str]) -> None:
    proxy_url, direct_url = web_behind_proxy
    page, posted = browser_login(proxy_url)
    assert page.status_code == 200 and "Secure" in page.headers["set-cookie"]  # the CSRF cookie
    assert page.headers["strict-transport-security"] == "max-age=31536000; includeSubDomains; preload"
    assert posted.status_code == 302 and posted.headers["location"] == "/wallet/", posted.text[:500]
    session = [c for c in posted.headers.get_list("set-cookie") if c.startswith("sessionid=")]
    assert session and "Secure" in session[0] and "HttpOnly" in session[0]
    # Plain HTTP that did not come through the proxy is sent to https; health checks are not.
    direct = httpx.get(f"{direct_url}/login/", headers={"Host": PUBLIC_HOST})
    assert direct.status_code == 301 and direct.headers["location"] == f"https://{PUBLIC_HOST}/login/"
    assert httpx.get(f"{direct_url}/healthz").status_code in (200, 503)


@pytest.mark.slow
@pytest.mark.parametrize(
    "web_behind_proxy", [{"HIVEMART_PROXY_HOPS": "0", "FORWARDED_ALLOW_IPS": "127.0.0.1"}], indirect=True
)
def test_without_the_proxy_settings_the_proxied_site_is_unusable(web_behind_proxy: tuple[str, str]) -> None:
    """What the settings fix: the proxied https request looks like plain HTTP, so Django sends
    the browser to https again (a redirect loop) instead of showing the login page."""
    proxy_url, _ = web_behind_proxy
    page, _ = browser_login(proxy_url)
    assert page.status_code == 301 and page.headers["location"] == f"https://{PUBLIC_HOST}/login/"
