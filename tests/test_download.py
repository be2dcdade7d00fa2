"""Tests for components.data.download: every server here is a LoopbackServer this test starts itself."""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from components.data.download import (
    DOWNLOAD_ERRORS,
    DownloadConfig,
    DownloadResult,
    SafeDownloader,
    _Target,
    blocked_reason,
)
from components.data.loopback_server import LoopbackServer, redirect_to, send_bytes

ALLOW = ("127.0.0.1/32",)
PAYLOAD = bytes(range(256)) * 40  # 10 KiB, every byte value
Route = Callable[[BaseHTTPRequestHandler], None]


def quiet(route: Route) -> Route:
    """Wrap a route so a client that gave up (closed socket) ends it without a server traceback."""

    def handler(request: BaseHTTPRequestHandler) -> None:
        try:
            route(request)
        except OSError:
            request.close_connection = True

    return handler


def sleep_then(seconds: float, body: bytes) -> Route:
    def route(request: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        send_bytes(request, body, "application/octet-stream")

    return quiet(route)


@quiet
def drip_body(request: BaseHTTPRequestHandler) -> None:
    request.send_response(200)
    request.send_header("Content-Length", "100")
    request.end_headers()
    for _ in range(100):
        request.wfile.write(b"x")
        time.sleep(0.2)


@quiet
def drip_headers(request: BaseHTTPRequestHandler) -> None:
    request.wfile.write(b"HTTP/1.1 200 OK\r\nX-Pad: ")
    for _ in range(200):
        request.wfile.write(b"a")
        time.sleep(0.05)


@quiet
def huge_content_length(request: BaseHTTPRequestHandler) -> None:
    request.send_response(200)
    request.send_header("Content-Length", str(10**12))
    request.end_headers()
    request.wfile.write(b"x" * 100)
    time.sleep(2)  # never sends the rest: the client must refuse on the header alone


@quiet
def big_until_close(request: BaseHTTPRequestHandler) -> None:
    request.send_response(200)
    request.send_header("Connection", "close")  # no Content-Length: the body ends when the connection does
    request.end_headers()
    request.wfile.write(b"y" * 50_000)


@quiet
def endless_chunked(request: BaseHTTPRequestHandler) -> None:
    request.send_response(200)
    request.send_header("Transfer-Encoding", "chunked")
    request.end_headers()
    chunk = b"z" * 4096
    for _ in range(100_000):  # 400 MB at most; stops when the client hangs up
        request.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))


def hang_up(request: BaseHTTPRequestHandler) -> None:
    request.close_connection = True  # close without a response


def echo_host(request: BaseHTTPRequestHandler) -> None:
    send_bytes(request, request.headers["Host"].encode(), "text/plain")


def echo_client_port(request: BaseHTTPRequestHandler) -> None:
    send_bytes(request, str(request.client_address[1]).encode(), "text/plain")


ROUTES: dict[str, Route] = {
    "/img": lambda r: send_bytes(r, PAYLOAD, "image/jpeg"),
    "/missing": lambda r: send_bytes(r, b"no such image", "text/plain", 404),
    "/error": lambda r: send_bytes(r, b"boom", "text/plain", 500),
    "/slow": sleep_then(1.0, PAYLOAD),
    "/hangup": hang_up,
    "/drip": drip_body,
    "/drip-headers": drip_headers,
    "/huge-length": huge_content_length,
    "/big-close": big_until_close,
    "/big-chunked": endless_chunked,
    "/exact": lambda r: send_bytes(r, b"e" * 1000, "application/octet-stream"),
    "/host": echo_host,
    "/peer": echo_client_port,
    "/r1": redirect_to("/r2"),  # relative Location
    "/loop": redirect_to("/loop"),
    "/to-file": redirect_to("file:///etc/passwd"),
    **{f"/c{i}": redirect_to(f"/c{i + 1}") for i in range(10)},
}


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer(routes=ROUTES) as srv:
        srv.routes["/r2"] = redirect_to(f"{srv.base_url}/img")  # absolute Location, needs the port
        yield srv


@pytest.fixture
def other_server() -> Iterator[LoopbackServer]:
    """A server on 127.0.0.2, outside ALLOW: nothing may ever reach it."""
    with LoopbackServer(host="127.0.0.2", routes={"/img": ROUTES["/img"]}) as srv:
        yield srv


def downloader(**overrides) -> SafeDownloader:
    return SafeDownloader(DownloadConfig(**{"allow_networks": ALLOW, "retries": 0, **overrides}))


def fetch(url: str, **overrides) -> DownloadResult:
    with downloader(**overrides) as dl:
        result = dl.fetch(url)
    assert result.error is None or result.error in DOWNLOAD_ERRORS
    return result


@pytest.fixture
def no_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test on any name resolution (urllib3 resolves even literal IPs, so this means no connection)."""

    def forbidden(*args, **kwargs):
        raise AssertionError(f"getaddrinfo called: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", forbidden)


def fake_resolver(monkeypatch: pytest.MonkeyPatch, answers: list[str] | Exception) -> list[str]:
    """Make "localhost" resolve to `answers` (or fail with it); literal IPs still work, nothing hits DNS."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def resolve(host, port, *args, **kwargs):
        if host != "localhost":
            return real(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        lookups.append(host)
        if isinstance(answers, Exception):
            raise answers
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return lookups


# --- success, HTTP errors, retries ---------------------------------------------------------------------------


def test_ok_returns_exact_bytes(server: LoopbackServer) -> None:
    url = f"{server.base_url}/img"
    result = fetch(url)
    assert result == DownloadResult(url, PAYLOAD, None, "HTTP 200", 200, url)


def test_body_of_exactly_max_bytes_is_accepted(server: LoopbackServer) -> None:
    result = fetch(f"{server.base_url}/exact", max_bytes=1000)
    assert result.error is None and result.body == b"e" * 1000


def test_404_is_http_error_and_not_retried(server: LoopbackServer) -> None:
    result = fetch(f"{server.base_url}/missing", retries=2)
    assert (result.error, result.detail, result.status, result.body) == ("http_error", "HTTP 404", 404, None)
    assert server.requests == ["/missing"]


def test_500_is_http_error_and_retried(server: LoopbackServer) -> None:
    result = fetch(f"{server.base_url}/error", retries=2)
    assert (result.error, result.detail, result.status) == ("http_error", "HTTP 500", 500)
    assert server.requests == ["/error"] * 3


def test_hang_up_is_connection_error_and_retried(server: LoopbackServer) -> None:
    result = fetch(f"{server.base_url}/hangup", retries=1)
    assert (result.error, result.status) == ("connection_error", None)
    assert server.requests == ["/hangup", "/hangup"]


def test_refused_connection_is_connection_error() -> None:
    with socket.socket() as unlistened:  # bound but not listening: connecting to it is refused
        unlistened.bind(("127.0.0.1", 0))
        result = fetch(f"http://127.0.0.1:{unlistened.getsockname()[1]}/img")
    assert result.error == "connection_error" and "refused" in result.detail


def test_connections_are_kept_alive(server: LoopbackServer) -> None:
    with downloader() as dl:
        ports = {dl.fetch(f"{server.base_url}/peer").body for _ in range(5)}
    assert len(ports) == 1


def test_host_header_names_the_host_while_the_checked_ip_is_dialled(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups = fake_resolver(monkeypatch, ["127.0.0.1"])
    result = fetch(f"http://localhost:{server.port}/host")
    assert result.body == f"localhost:{server.port}".encode()
    assert lookups == ["localhost"]  # resolved once, for the check; the connection reused that answer


def test_https_pool_dials_the_ip_and_verifies_the_name() -> None:
    with downloader() as dl:
        pool = dl._pool(_Target("https", "images.test", 443, "127.0.0.1", "/a.jpg"))  # builds, never connects
    assert pool.host == "127.0.0.1"
    assert pool.conn_kw["server_hostname"] == "images.test"
    assert pool.assert_hostname == "images.test"


# --- deadlines -----------------------------------------------------------------------------------------------


def test_slow_response_times_out_and_is_retried(server: LoopbackServer) -> None:
    start = time.monotonic()
    result = fetch(f"{server.base_url}/slow", timeout=0.5, retries=1)
    elapsed = time.monotonic() - start
    assert result.error == "timeout" and result.status is None
    assert server.requests == ["/slow", "/slow"]
    assert elapsed < 2 * 0.5 + 0.1 + 0.5  # two attempts, the backoff, slack


def test_slow_drip_body_cannot_outlast_the_deadline(server: LoopbackServer) -> None:
    start = time.monotonic()
    result = fetch(f"{server.base_url}/drip", timeout=1.0)
    elapsed = time.monotonic() - start
    assert result.error == "timeout"
    assert 0.9 < elapsed < 1.5


def test_slow_drip_headers_cannot_outlast_the_deadline(server: LoopbackServer) -> None:
    start = time.monotonic()
    result = fetch(f"{server.base_url}/drip-headers", timeout=0.5)
    assert result.error == "timeout"
    assert time.monotonic() - start < 1.0


# --- size limits ---------------------------------------------------------------------------------------------


# In a network namespace of its own (only `lo`, so no query can leave the machine) whose resolv.conf names a DNS
# server on 127.0.0.1 that reads every query and never answers: the system resolver waits 5 s a try on it.
SILENT_DNS = """
import json, socket, sys, time, os
sys.path.insert(0, {repo!r})
from components.data.download import DownloadConfig, SafeDownloader
silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
silent.bind(("127.0.0.1", 53))
started = time.monotonic()
with SafeDownloader(DownloadConfig(timeout=1.0, retries=0)) as downloader:
    result = downloader.fetch("http://images.unanswered.example/cat.jpg")
print(json.dumps({{"error": result.error, "detail": result.detail, "seconds": time.monotonic() - started}}))
sys.stdout.flush()
os._exit(0)  # the lookup thread is still waiting on the silent server
"""


def test_a_resolver_that_never_answers_cannot_outlast_the_deadline(tmp_path) -> None:
    import json
    import shutil
    import subprocess
    import sys

    from tests.helpers import REPO

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("this test needs root and unshare(1) for a network namespace of its own (CI runs as root)")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:5 attempts:1\n")
    script = tmp_path / "silent_dns.py"
    script.write_text(SILENT_DNS.format(repo=str(REPO)))
    inside = f"ip link set lo up && mount --bind {resolv} /etc/resolv.conf && exec {sys.executable} {script}"
    done = subprocess.run(["unshare", "--net", "--mount", "sh", "-c", inside], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["error"] == "timeout" and "resolving images.unanswered.example" in outcome["detail"], outcome
    assert 0.9 < outcome["seconds"] < 1.8, outcome  # the deadline, not the resolver's 5 s


def test_too_large_by_content_length_is_refused_before_reading(server: LoopbackServer) -> None:
    start = time.monotonic()
    result = fetch(f"{server.base_url}/huge-length", max_bytes=1000, timeout=5)
    assert result.error == "too_large" and result.status == 200
    assert "Content-Length" in result.detail
    assert time.monotonic() - start < 1.0  # did not wait for a body that never comes


@pytest.mark.parametrize("path", ["/big-close", "/big-chunked"])
def test_too_large_without_content_length_is_counted(server: LoopbackServer, path: str) -> None:
    start = time.monotonic()
    result = fetch(f"{server.base_url}{path}", max_bytes=10_000, timeout=5)
    assert (result.error, result.body) == ("too_large", None)
    assert time.monotonic() - start < 1.0  # stopped reading the endless stream


# --- redirects -----------------------------------------------------------------------------------------------


def test_redirect_chain_of_two_succeeds(server: LoopbackServer) -> None:
    result = fetch(f"{server.base_url}/r1")
    assert (result.error, result.body, result.status) == (None, PAYLOAD, 200)
    assert result.final_url == f"{server.base_url}/img"
    assert server.requests == ["/r1", "/r2", "/img"]


def test_redirect_loop(server: LoopbackServer) -> None:
    result = fetch(f"{server.base_url}/loop")
    assert result.error == "too_many_redirects" and result.status == 302
    assert server.requests == ["/loop"]


def test_more_redirects_than_allowed(server: LoopbackServer) -> None:
    result = fetch(f"{server.base_url}/c0", max_redirects=5)
    assert result.error == "too_many_redirects"
    assert server.requests == [f"/c{i}" for i in range(6)]  # the original request and 5 hops


def test_redirect_to_file_scheme(server: LoopbackServer) -> None:
    result = fetch(f"{server.base_url}/to-file")
    assert result.error == "unsupported_scheme" and result.final_url == "file:///etc/passwd"
    assert "redirect hop 1" in result.detail


# --- address policy ------------------------------------------------------------------------------------------


def test_direct_url_to_non_allowed_loopback_is_blocked(other_server: LoopbackServer) -> None:
    result = fetch(f"{other_server.base_url}/img")
    assert result.error == "blocked_address"
    assert result.detail == "127.0.0.2 is not a public address (loopback)"
    assert other_server.requests == []


def test_redirect_to_non_allowed_loopback_is_blocked(server: LoopbackServer, other_server: LoopbackServer) -> None:
    server.routes["/to-other"] = redirect_to(f"{other_server.base_url}/img")
    result = fetch(f"{server.base_url}/to-other")
    assert (result.error, result.status) == ("blocked_address", 302)
    assert result.detail == "127.0.0.2 is not a public address (loopback), redirect hop 1"
    assert result.final_url == f"{other_server.base_url}/img"
    assert server.requests == ["/to-other"]
    assert other_server.requests == []


def test_default_policy_blocks_loopback(server: LoopbackServer) -> None:
    result = fetch(f"{server.base_url}/img", allow_networks=())
    assert result.error == "blocked_address"
    assert server.requests == []


def test_every_resolved_address_is_checked(
    server: LoopbackServer, other_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_resolver(monkeypatch, ["127.0.0.1", "127.0.0.2"])
    result = fetch(f"http://localhost:{server.port}/img")
    assert result.error == "blocked_address"
    assert "localhost resolves to 127.0.0.2" in result.detail
    assert server.requests == [] and other_server.requests == []


def test_resolver_failure_is_dns_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_resolver(monkeypatch, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert fetch("http://localhost/img").error == "dns_error"


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "shared address space"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("fc00::1", "private"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("fec0::1", "site-local"),
        ("2002:7f00:1::", "loopback"),  # 6to4 wrapping 127.0.0.1
        ("64:ff9b::a00:1", "private"),  # NAT64 wrapping 10.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address: str, reason: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


def test_allow_networks_admit_exactly_their_addresses() -> None:
    allow = [ipaddress.ip_network("127.0.0.1/32")]
    assert blocked_reason(ipaddress.ip_address("127.0.0.1"), allow) is None
    assert blocked_reason(ipaddress.ip_address("::ffff:127.0.0.1"), allow) is None
    assert blocked_reason(ipaddress.ip_address("127.0.0.2"), allow) == "loopback"


def test_bad_allow_network_fails_at_config_time() -> None:
    for entry in ("127.0.0.1/99", "127.0.0.1/32:http", "127.0.0.1/32:70000", "localhost:80"):
        with pytest.raises(ValueError):
            DownloadConfig(allow_networks=(entry,))


def with_robots_tags(*values: str) -> Route:
    """A 200 with the payload and an X-Robots-Tag header per value."""

    def handler(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        for value in values:
            request.send_header("X-Robots-Tag", value)
        request.send_header("Content-Type", "image/png")
        request.send_header("Content-Length", str(len(PAYLOAD)))
        request.end_headers()
        request.wfile.write(PAYLOAD)

    return handler


def test_an_image_opted_out_by_x_robots_tag_is_dropped_as_img2dataset_drops_it(server: LoopbackServer) -> None:
    routes = {"/noai": ("noai",), "/several": ("noarchive", "NoImageIndex, nofollow"),
              "/ours": ("clipforge-ingest: noai",), "/theirs": ("otherbot: noai",),
              "/harmless": ("noarchive, nosnippet",), "/after-redirect": ("noindex",)}
    for path, values in routes.items():
        server.routes[path] = with_robots_tags(*values)
    server.routes["/hop"] = redirect_to("/after-redirect")
    outcome = {path: fetch(f"{server.base_url}{path}") for path in [*routes, "/hop"]}
    opted_out = {path for path, result in outcome.items() if result.error == "opted_out"}
    assert opted_out == {"/noai", "/several", "/ours", "/after-redirect", "/hop"}, outcome
    assert outcome["/several"].detail == "X-Robots-Tag: NoImageIndex, nofollow"
    assert outcome["/hop"].detail == "X-Robots-Tag: noindex, redirect hop 1" and outcome["/hop"].body is None
    assert outcome["/theirs"].body == outcome["/harmless"].body == PAYLOAD
    # An empty list downloads regardless; a directive with a comma or a colon is refused when the config is built.
    assert fetch(f"{server.base_url}/noai", disallowed_header_directives=()).body == PAYLOAD
    with pytest.raises(ValueError, match="disallowed_header_directives must be directive names"):
        DownloadConfig(disallowed_header_directives=("noai, noindex",))


def test_an_allowed_network_with_a_port_opens_that_port_only(server: LoopbackServer) -> None:
    """`127.0.0.1/32:<port>` admits the mirror on that port; another service on the same address stays refused,
    before any connection (an entry without a port would admit both)."""
    with LoopbackServer(routes={"/img": ROUTES["/img"]}) as other_service:
        allow = (f"127.0.0.1/32:{server.port}",)
        assert fetch(f"{server.base_url}/img", allow_networks=allow).error is None
        refused = fetch(f"{other_service.base_url}/img", allow_networks=allow)
        assert refused.error == "blocked_address" and other_service.requests == []
        assert fetch(f"{other_service.base_url}/img", allow_networks=("127.0.0.1/32",)).error is None
    assert DownloadConfig(allow_networks=("::1/128:8080", "::1")).allow_networks  # IPv6, with and without a port


# --- URLs that never reach the network -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/a.jpg",
        "data:image/png;base64,AAAA",
        "javascript:alert(1)",
        "gopher://127.0.0.1:70/",
    ],
)
def test_unsupported_schemes(url: str, no_lookups: None) -> None:
    assert fetch(url).error == "unsupported_scheme"


@pytest.mark.parametrize(
    "url", ["", "   ", None, "not a url", "://x", "http://", "http:///a.jpg", "http://[::1", "http://127.0.0.1:99999/"]
)
def test_invalid_urls(url: str, no_lookups: None) -> None:
    result = fetch(url)  # type: ignore[arg-type]
    assert (result.error, result.body) == ("invalid_url", None)


# --- many URLs -----------------------------------------------------------------------------------------------


def test_submitted_fetches_run_concurrently(server: LoopbackServer) -> None:
    for i in range(6):
        server.routes[f"/d{i}"] = sleep_then(0.05 * (6 - i), f"d{i}".encode())  # earlier URLs finish later
    urls = [f"{server.base_url}/d{i}" for i in range(6)] + [f"{server.base_url}/missing", "ftp://127.0.0.1/x"]
    start = time.monotonic()
    with downloader(thread_count=8) as dl:
        results = [future.result() for future in [dl.submit(url) for url in urls]]
    elapsed = time.monotonic() - start
    assert [r.url for r in results] == urls
    assert [r.body for r in results[:6]] == [f"d{i}".encode() for i in range(6)]
    assert [r.error for r in results[6:]] == ["http_error", "unsupported_scheme"]
    assert elapsed < 0.9  # sequentially it would take 1.05 s
