"""Safe HTTP(S) image downloader for the ingest stage.

Why not img2dataset's downloader: it fetches with `urllib.request.urlopen`, which follows redirects without
looking at where they point (a public URL can bounce to 127.0.0.1, 10.x or a cloud metadata address) and
reads bodies without a bound. Here, on urllib3:

- only http/https; every address a host resolves to is checked (`blocked_reason`) before any connection,
  and so is every redirect hop, which we follow ourselves;
- the connection goes to the checked IP itself (the `Host` header / TLS SNI carry the name), so a DNS answer
  that changes between check and connect cannot redirect us;
- one deadline per attempt covers name resolution, connect, headers and body: the lookup runs on a resolver
  thread the attempt waits on only for the time left (the system resolver's own timeout is 5 s a try), and every
  socket read gets only the time left, so a slow DNS server or a server dripping a byte at a time cannot stretch it;
- bodies are bounded by Content-Length up front and by counting while streaming;
- keep-alive pools per (scheme, IP, port, host), so loopback benchmarks measure transfers, not handshakes.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urljoin, urlsplit

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError, NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3TimeoutError
from urllib3.response import BaseHTTPResponse
from urllib3.util import Timeout, parse_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DOWNLOAD_ERRORS = (
    "invalid_url",
    "unsupported_scheme",
    "blocked_address",
    "dns_error",
    "connection_error",
    "timeout",
    "http_error",
    "too_large",
    "too_many_redirects",
    "opted_out",
)

_SCHEMES = {"http": 80, "https": 443}
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_DRAIN_LIMIT = 64 * 1024  # a redirect/error body up to this size is read off to keep the connection alive
_MAX_POOLS = 256  # ingest touches many hosts; idle pools beyond this are closed (least recently used first)
_BACKOFF_S = 0.1
_MAX_BACKOFF_S = 2.0

_SHARED_ADDRESS_SPACE = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")  # well-known NAT64 prefix: the last 32 bits are IPv4


@dataclass(frozen=True)
class DownloadConfig:
    """Limits and policy for `SafeDownloader`."""

    timeout: float = 10.0  # seconds for one attempt as a whole (connect + headers + body, all redirect hops)
    retries: int = 1  # extra attempts, only for transient failures (timeout, connection error, HTTP 5xx/429)
    max_bytes: int = 16 * 2**20  # refuse bodies larger than this
    max_redirects: int = 5
    allow_networks: tuple[str, ...] = ()  # CIDRs allowed although non-public, each optionally :port (allowed_network)
    user_agent: str = "clipforge-ingest/0.1"
    thread_count: int = 16
    # X-Robots-Tag directives by which a site opts an image out (img2dataset's default list): the row is dropped as
    # opted_out. A directive scoped to an agent ("otherbot: noai") counts only for ours, the user agent's product.
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError(f"ingest.download.timeout must be > 0, got {self.timeout}")
        for name, least in (("retries", 0), ("max_redirects", 0), ("max_bytes", 1), ("thread_count", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"ingest.download.{name} must be >= {least}, got {getattr(self, name)}")
        for entry in self.allow_networks:
            allowed_network(entry)  # fail at construction on a typo, not at the first download
        directives = self.disallowed_header_directives
        if any(not isinstance(d, str) or not d.strip() or "," in d or ":" in d for d in directives):
            raise ValueError("ingest.download.disallowed_header_directives must be directive names such as noai, "
                             f"got {list(self.disallowed_header_directives)}")


@dataclass(frozen=True)
class DownloadResult:
    """The outcome of one `fetch`: `body` on success, else `error` (one of DOWNLOAD_ERRORS) and `detail`."""

    url: str
    body: bytes | None
    error: str | None
    detail: str
    status: int | None  # last HTTP status seen
    final_url: str  # after redirects


def _embedded_ipv4(addr: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries traffic to (mapped, 6to4, NAT64), if any."""
    if isinstance(addr, ipaddress.IPv4Address):
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _NAT64_PREFIX:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


@dataclass(frozen=True)
class AllowedNetwork:
    network: IPNetwork
    port: int | None  # None: every port


def allowed_network(entry: str) -> AllowedNetwork:
    """An allow_networks entry: a CIDR (127.0.0.1/32: every port of it) or a CIDR and one port (127.0.0.1/32:8080,
    ::1/128:8080), so that allowing a mirror does not open every other service on its address. ValueError when it
    is neither."""
    try:
        return AllowedNetwork(ipaddress.ip_network(entry), None)
    except ValueError:
        network, _, port = entry.rpartition(":")
        if not (network and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"ingest.download.allow_networks: {entry!r} is not a CIDR, nor CIDR:port") from None
        return AllowedNetwork(ipaddress.ip_network(network), int(port))


def blocked_reason(addr: IPAddress, allow: Sequence[IPNetwork] = ()) -> str | None:
    """Why `addr` must not be contacted ("loopback", "private", ...), or None if it may be.

    Addresses inside `allow` are accepted whatever they are. An IPv6 address that embeds an IPv4 one
    (::ffff:10.0.0.1, 2002:0a00:0001::, 64:ff9b::10.0.0.1) is judged by the IPv4 address it leads to.
    """
    if any(addr in network for network in allow):
        return None
    embedded = _embedded_ipv4(addr)
    if embedded is not None:
        return blocked_reason(embedded, allow)
    # `is_global` alone is not enough on every Python version (e.g. multicast and fec0::/10 count as global
    # on 3.11), so the specific properties are checked first; they also give the message its reason.
    checks = (
        ("unspecified", addr.is_unspecified),
        ("loopback", addr.is_loopback),
        ("link-local", addr.is_link_local),
        ("multicast", addr.is_multicast),
        ("shared address space", addr in _SHARED_ADDRESS_SPACE),
        ("site-local", isinstance(addr, ipaddress.IPv6Address) and addr.is_site_local),
        ("reserved", addr.is_reserved),
        ("private", addr.is_private),
        ("not globally routable", not addr.is_global),
    )
    return next((reason for reason, hit in checks if hit), None)


class _Refused(Exception):
    """Internal: a fetch attempt ends with `error`/`detail` (raised from deep inside one hop)."""

    def __init__(self, error: str, detail: str):
        super().__init__(detail)
        self.error = error
        self.detail = detail


# The deadline (time.monotonic()) of the attempt running on this thread. http.client builds the response
# object deep inside urllib3, so the deadline reaches it this way rather than through arguments.
_thread_deadline = threading.local()


class _DeadlineReader(io.RawIOBase):
    """Raw socket reader that gives each recv only the time left until the attempt's deadline."""

    def __init__(self, sock: socket.socket, deadline: float):
        super().__init__()
        self._sock = sock
        # makefile() holds a reference that keeps the fd open after http.client "closes" the connection
        # (Connection: close bodies are read after that); our close() releases it.
        self._raw = sock.makefile("rb", buffering=0)
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int | None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("download deadline passed")
        self._sock.settimeout(remaining)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """What http.client.HTTPResponse needs from a socket (makefile) with deadline-bounded reads."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock = sock
        self._deadline = deadline

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


class _DeadlineHTTPResponse(http.client.HTTPResponse):
    """http.client response whose status line, headers and body all obey the current attempt's deadline."""

    def __init__(self, sock: socket.socket, *args, **kwargs):
        super().__init__(_DeadlineSocket(sock, _thread_deadline.value), *args, **kwargs)  # type: ignore[arg-type]


class _HTTPConnection(HTTPConnection):
    response_class = _DeadlineHTTPResponse


class _HTTPSConnection(HTTPSConnection):
    response_class = _DeadlineHTTPResponse


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


@dataclass(frozen=True)
class _Target:
    """One validated hop: where to connect (a checked IP) and what to ask for."""

    scheme: str
    host: str  # as in the URL (IDNA-encoded, no brackets): Host header, SNI and certificate name
    port: int
    ip: str
    request_uri: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _SCHEMES[self.scheme] else f"{host}:{self.port}"


def opt_out(values: Sequence[str], agent: str, disallowed: Sequence[str]) -> str | None:
    """The first X-Robots-Tag value that opts a response out for `agent`: one of the `disallowed` directives, for
    every agent ("noai, noimageai") or for `agent` ("clipforge-ingest: noai"). Read as img2dataset reads it."""
    disallowed = {d.lower() for d in disallowed}
    for value in values:
        scope, _, directives = value.rpartition(":") if value.count(":") == 1 else ("", "", value)
        if scope.strip().lower() in ("", agent) and disallowed & {d.strip().lower() for d in directives.split(",")}:
            return value
    return None


def _release(resp: BaseHTTPResponse, reuse: bool) -> None:
    """Give the connection back: kept alive if the unread rest is small, otherwise closed unread."""
    remaining = resp.length_remaining
    if reuse and remaining is not None and remaining <= _DRAIN_LIMIT:
        resp.drain_conn()
    else:
        resp.close()
    resp.release_conn()


def _classify(exc: Exception, timeout: float) -> _Refused:
    """Map a urllib3/socket/http.client exception to an error code and detail."""
    if isinstance(exc, NewConnectionError):  # a subclass of ConnectTimeoutError, but "refused" is no timeout
        return _Refused("connection_error", f"cannot connect: {exc.__cause__ or type(exc).__name__}")
    if isinstance(exc, (Urllib3TimeoutError, socket.timeout)):
        return _timed_out(timeout)
    return _Refused("connection_error", f"{type(exc).__name__}: {exc}"[:200])


def _timed_out(timeout: float) -> _Refused:
    return _Refused("timeout", f"timed out after {timeout:g} s")


def _is_transient(result: DownloadResult) -> bool:
    return _transient(result.error, result.status)


def _transient(error: str | None, status: int | None) -> bool:
    """A failure another attempt may not meet: a timeout, a refused or dropped connection, HTTP 5xx or 429."""
    if error in ("timeout", "connection_error"):
        return True
    return error == "http_error" and status is not None and (status >= 500 or status == 429)


def transient_drop(reason: str, message: str | None) -> bool:
    """Whether a row dropped as `reason` (with its error message, "HTTP 503", ...) failed transiently: what
    ingest.retry downloads again."""
    status = re.match(r"HTTP (\d{3})\b", message or "")
    return _transient(reason, int(status.group(1)) if status else None)


class SafeDownloader:
    """Downloads http(s) URLs under the rules in the module docstring. Thread-safe; use as a context manager."""

    def __init__(self, config: DownloadConfig):
        self.config = config
        self._allow = tuple(allowed_network(entry) for entry in config.allow_networks)
        self._agent = config.user_agent.split("/")[0].strip().lower()  # "clipforge-ingest"
        self._pools: OrderedDict[tuple[str, str, int, str], HTTPConnectionPool] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=config.thread_count, thread_name_prefix="clipforge-download")
        # One lookup per download thread at most; a lookup past its attempt's deadline finishes here unwaited for.
        self._resolver = ThreadPoolExecutor(max_workers=config.thread_count, thread_name_prefix="clipforge-resolve")

    def __enter__(self) -> SafeDownloader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker threads and close every pooled connection."""
        self._executor.shutdown(wait=True)
        self._resolver.shutdown(wait=False, cancel_futures=True)  # a hung lookup must not hold the part
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()

    def submit(self, url: str) -> Future[DownloadResult]:
        """Fetch on one of the `thread_count` threads; the future's result is `fetch(url)`'s."""
        return self._executor.submit(self.fetch, url)

    def fetch(self, url: str) -> DownloadResult:
        """Download one URL, retrying transient failures; never raises for a bad URL or server."""
        for attempt in range(self.config.retries + 1):
            if attempt:
                time.sleep(min(_BACKOFF_S * 2 ** (attempt - 1), _MAX_BACKOFF_S))
            result = self._attempt(url)
            if not _is_transient(result):
                break
        return result

    def _attempt(self, url: str) -> DownloadResult:
        """One attempt: follow up to max_redirects hops, all within one deadline."""
        cfg = self.config
        deadline = time.monotonic() + cfg.timeout
        _thread_deadline.value = deadline
        current, status = url, None
        seen: set[str] = set()  # URLs requested in this attempt: coming back to one is a loop
        for hop in range(cfg.max_redirects + 1):
            where = f", redirect hop {hop}" if hop else ""
            try:
                target = self._validate(current, deadline)
                seen.add(current)
                resp = self._request(target, deadline)
                status = resp.status
                if status in _REDIRECT_STATUSES:
                    location = resp.headers.get("Location")
                    _release(resp, reuse=True)
                    if not location:
                        detail = f"HTTP {status} without Location{where}"
                        return DownloadResult(url, None, "http_error", detail, status, current)
                    current = urljoin(current, location)
                    if current in seen:
                        return DownloadResult(url, None, "too_many_redirects", f"redirect loop{where}", status, current)
                    continue
                if not 200 <= status < 300:
                    _release(resp, reuse=True)
                    return DownloadResult(url, None, "http_error", f"HTTP {status}{where}", status, current)
                refusal = opt_out(resp.headers.getlist("X-Robots-Tag"), self._agent, cfg.disallowed_header_directives)
                if refusal is not None:
                    _release(resp, reuse=False)  # the body is not wanted
                    return DownloadResult(url, None, "opted_out", f"X-Robots-Tag: {refusal}{where}", status, current)
                body = self._read_body(resp, deadline)
                return DownloadResult(url, body, None, f"HTTP {status}", status, current)
            except _Refused as refused:
                return DownloadResult(url, None, refused.error, refused.detail + where, status, current)
            # ValueError too: http.client raises it for a malformed chunk size.
            except (HTTPError, OSError, http.client.HTTPException, ValueError) as exc:
                failure = _classify(exc, cfg.timeout)
                return DownloadResult(url, None, failure.error, failure.detail + where, status, current)
        detail = f"more than {cfg.max_redirects} redirects"
        return DownloadResult(url, None, "too_many_redirects", detail, status, current)

    def _validate(self, url: object, deadline: float) -> _Target:
        """Parse and check one hop's URL; resolve its host (by `deadline`) and check every address. Raises _Refused."""
        if not isinstance(url, str) or not url.strip():
            raise _Refused("invalid_url", "empty or not a string")
        try:
            scheme = urlsplit(url.strip()).scheme.lower()
            if not scheme:
                raise _Refused("invalid_url", "no scheme")
            if scheme not in _SCHEMES:
                raise _Refused("unsupported_scheme", f"scheme {scheme!r} is not http/https")
            parsed = parse_url(url.strip())
        except ValueError as exc:  # urllib3's LocationParseError is a ValueError
            raise _Refused("invalid_url", f"unparsable URL: {exc}"[:200]) from None
        if not parsed.host:
            raise _Refused("invalid_url", "no host")
        host = parsed.host.strip("[]")
        port = parsed.port or _SCHEMES[scheme]
        addresses = self._resolve(host, port, deadline)
        allowed_here = [entry.network for entry in self._allow if entry.port in (None, port)]
        for addr in addresses:
            reason = blocked_reason(addr, allowed_here)
            if reason is not None:
                shown = str(addr) if str(addr) == host else f"{host} resolves to {addr}, which"
                raise _Refused("blocked_address", f"{shown} is not a public address ({reason})")
        return _Target(scheme, host, port, str(addresses[0]), parsed.request_uri)

    def _resolve(self, host: str, port: int, deadline: float) -> list[IPAddress]:
        """All addresses of `host` (a literal IP needs no lookup), deduplicated, in resolver order, or a timeout
        once `deadline` passes."""
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        lookup = self._resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            infos = lookup.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise _Refused("timeout", f"resolving {host} outlasted the {self.config.timeout:g} s deadline") from None
        except (socket.gaierror, UnicodeError) as exc:
            raise _Refused("dns_error", f"cannot resolve {host}: {exc}") from None
        # The scope of a link-local IPv6 answer (fe80::1%eth0) is dropped: such an address is refused anyway.
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        if not addresses:
            raise _Refused("dns_error", f"no address for {host}")
        return addresses

    def _pool(self, target: _Target) -> HTTPConnectionPool:
        """The keep-alive pool for this (scheme, IP, port, host), created on first use."""
        key = (target.scheme, target.ip, target.port, target.host)
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            common = {"maxsize": self.config.thread_count, "block": False, "retries": False}
            if target.scheme == "https":
                # Connect to the checked IP; verify the certificate and send SNI for the original name.
                pool = _HTTPSPool(
                    target.ip, target.port, server_hostname=target.host, assert_hostname=target.host, **common
                )
            else:
                pool = _HTTPPool(target.ip, target.port, **common)
            self._pools[key] = pool
            if len(self._pools) > _MAX_POOLS:
                # Connections of the evicted pool still in use are closed when they are put back.
                self._pools.popitem(last=False)[1].close()
            return pool

    def _request(self, target: _Target, deadline: float) -> BaseHTTPResponse:
        """Send the GET and return the response with its body unread."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timed_out(self.config.timeout)
        headers = {
            "Host": target.host_header,
            "User-Agent": self.config.user_agent,
            "Accept-Encoding": "identity",  # bytes are stored as sent, and max_bytes counts what is stored
        }
        return self._pool(target).urlopen(
            "GET",
            target.request_uri,
            headers=headers,
            retries=False,  # fetch() retries; urllib3 must neither retry nor follow redirects on its own
            redirect=False,
            timeout=Timeout(connect=remaining, read=remaining),
            preload_content=False,
            decode_content=False,
        )

    def _read_body(self, resp: BaseHTTPResponse, deadline: float) -> bytes:
        """Read the body, refusing it past max_bytes (announced or counted) or past the deadline."""
        limit = self.config.max_bytes
        announced = resp.length_remaining
        if announced is not None and announced > limit:
            _release(resp, reuse=False)
            raise _Refused("too_large", f"Content-Length {announced} > max_bytes {limit}")
        chunks: list[bytes] = []
        total = 0
        # Ask for at most limit + 1 bytes: one byte more than allowed is enough to refuse.
        while chunk := resp.read(min(_CHUNK, limit + 1 - total)):
            total += len(chunk)
            if total > limit:
                _release(resp, reuse=False)
                raise _Refused("too_large", f"body exceeds max_bytes {limit}")
            if time.monotonic() > deadline:
                _release(resp, reuse=False)
                raise _timed_out(self.config.timeout)
            chunks.append(chunk)
        resp.release_conn()
        return b"".join(chunks)
