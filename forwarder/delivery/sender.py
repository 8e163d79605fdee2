"""Sending one request: the only module that imports ``requests``.

``transport_outcome`` is the one place a ``requests`` exception becomes an ``Outcome``. What a response
means is the upstream's business (``turretio.Upstream.classify``): this module never sees a path's meaning
or a header's. Retries are the flusher's, never urllib3's (its ``Retry`` skips POST).
"""

from __future__ import annotations

import errno
import socket
import ssl
import time

import requests
from requests.adapters import HTTPAdapter

from forwarder.config import Config
from forwarder.message import QueuedMessage
from forwarder.metrics import Metrics
from forwarder.turretio import Credentials, Outcome, Result, Retry, Upstream

_MAX_RESPONSE_BYTES = 65536


class Sender:
    """One keep-alive pool shared by the worker threads; ``attempt`` never raises for a network failure.

    Requests go straight to the transport adapter, not through ``Session.post``: a session merges cookies,
    hooks, redirects and the environment (proxies, ``REQUESTS_CA_BUNDLE``, netrc) into every request, which
    cost a quarter of the daemon's CPU per delivery (``bench/README.md``, item 6) and of which a relay wants
    none. Proxies from the environment are still honoured: looked up once per API URL.
    """

    def __init__(self, upstream: Upstream, metrics: Metrics, concurrency: int) -> None:
        self._upstream = upstream
        self._metrics = metrics
        # Retries are ours, never urllib3's (its Retry skips POST).
        self._adapter = HTTPAdapter(pool_connections=1, pool_maxsize=concurrency, max_retries=0, pool_block=False)
        self._proxies: dict[str, dict[str, str]] = {}

    def attempt(self, queued: QueuedMessage, credentials: Credentials | None, config: Config) -> Outcome:
        """Build, send and classify one request, with both timeouts set and TLS always verified."""
        request = self._upstream.build_request(queued, credentials, time.time())
        prepared = requests.Request("POST", config.api_url + request.path, request.headers,
                                    data=request.body).prepare()
        started = time.monotonic()
        try:
            with self._adapter.send(
                prepared, stream=True, timeout=(config.connect_timeout, config.read_timeout),
                verify=str(config.ca_file) if config.ca_file else True, proxies=self._proxies_for(config.api_url),
            ) as response:
                body = _read_capped(response)
                status, headers = response.status_code, response.headers
        except requests.RequestException as error:
            return transport_outcome(error)
        finally:
            self._metrics.request_duration.observe(time.monotonic() - started)
        return self._upstream.classify(queued.message, status, headers, body, time.time())

    def _proxies_for(self, api_url: str) -> dict[str, str]:
        """``HTTPS_PROXY``/``NO_PROXY`` as requests reads them; the environment does not change under us."""
        if api_url not in self._proxies:
            self._proxies[api_url] = requests.utils.get_environ_proxies(api_url)
        return self._proxies[api_url]


def _read_capped(response: requests.Response) -> bytes:
    """The response body up to a bound: a misbehaving server cannot make us buffer gigabytes."""
    chunks, size = [], 0
    for chunk in response.iter_content(8192):
        chunks.append(chunk)
        size += len(chunk)
        if size >= _MAX_RESPONSE_BYTES:
            break
    return b"".join(chunks)[:_MAX_RESPONSE_BYTES]


def transport_outcome(error: requests.RequestException) -> Retry:
    """The one place a ``requests`` exception becomes an ``Outcome``; the reason never holds the URL."""
    causes = list(_causes(error))
    if isinstance(error, requests.exceptions.SSLError) or any(isinstance(c, ssl.SSLError) for c in causes):
        tls = next((c for c in causes if isinstance(c, ssl.SSLError)), None)
        return Retry(Result.TLS, f"tls: {getattr(tls, 'reason', None) or 'handshake failed'}", endpoint=True)
    if isinstance(error, requests.Timeout) or any(isinstance(c, TimeoutError) for c in causes):
        return Retry(Result.TIMEOUT, "timeout", endpoint=True)
    return Retry(Result.CONNECT, _connect_reason(causes), endpoint=True)


def _connect_reason(causes: list[BaseException]) -> str:
    for cause in causes:
        if isinstance(cause, socket.gaierror):
            return "dns lookup failed"
        if isinstance(cause, OSError) and cause.errno in (errno.ECONNREFUSED, errno.ECONNRESET):
            return "connection refused" if cause.errno == errno.ECONNREFUSED else "connection reset"
    return "connection failed"


def _causes(error: BaseException) -> list[BaseException]:
    """The exception and everything it wraps (urllib3 nests the real cause a few levels down)."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [error]
    while todo and len(seen) < 16:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        todo += [e for e in (current.__cause__, current.__context__, getattr(current, "reason", None),
                             *current.args) if isinstance(e, BaseException)]
    return seen
