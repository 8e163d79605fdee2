"""Logging: one line per event, JSON or text, with email addresses and secrets redacted in the formatter.

Owns the log line format and the redaction, so no call site has to remember either: every record that
reaches the root logger (ours, and urllib3's or watchdog's) passes through one formatter that replaces
registered secrets with ``***`` and email addresses with ``<email:xxxxxxxx>`` (unless ``log_emails``), in
the message, in the fields and in the formatted exception.

Convention for structured fields: pass one dict under ``extra={"fields": {...}}``, e.g.
``logger.warning("Delivery paused", extra={"fields": {"reason": "auth", "email": address}})``. Put the
address itself in a field, not ``email_ref(address)``: the formatter redacts it, and ``log_emails`` can
then show it while debugging. Field names ``ts``, ``level``, ``logger``, ``msg`` and ``exc`` are the
line's own; a field with one of those names is written as ``field.<name>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+(?:@|%40)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_HEAD_KEYS = ("ts", "level", "logger", "msg")
_OWN_KEYS = (*_HEAD_KEYS, "exc")

_secrets: set[str] = set()
_secrets_pattern: re.Pattern[str] | None = None
_secrets_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Mask ``value`` as ``***`` in every line from now on (API keys and secrets, given at load time)."""
    global _secrets_pattern
    if not value:
        return
    with _secrets_lock:
        _secrets.add(value)
        # longest first, so a secret containing another is masked whole
        ordered = sorted(_secrets, key=len, reverse=True)
        _secrets_pattern = re.compile("|".join(re.escape(secret) for secret in ordered))


def email_ref(email: str) -> str:
    """A short, stable stand-in for an address: the first 8 hex digits of sha256 of it, lowercased.

    Stable across processes, so the lines about one address can be found together; it is a pseudonym,
    not an anonymisation: whoever holds a list of candidate addresses can recompute it.
    """
    digest = hashlib.sha256(email.lower().encode("utf-8")).hexdigest()
    return f"<email:{digest[:8]}>"


def _ref_of_match(match: re.Match[str]) -> str:
    # an address inside a URL path is percent-encoded; hash the address, not its encoding
    return email_ref(urllib.parse.unquote(match[0]))


def _mask(text: str, log_emails: bool) -> str:
    """``text`` with registered secrets masked and, unless ``log_emails``, addresses replaced."""
    pattern = _secrets_pattern
    if pattern is not None:
        text = pattern.sub("***", text)
    return text if log_emails else _EMAIL.sub(_ref_of_match, text)


def redact(text: str) -> str:
    """``text`` as a log line would show it by default: secrets masked, addresses as short hashes."""
    return _mask(text, log_emails=False)


class _Formatter(logging.Formatter):
    """Builds the redacted line as a dict, then renders it with the strategy of the chosen format."""

    def __init__(self, render: Callable[[Mapping[str, Any]], str], log_emails: bool) -> None:
        super().__init__()
        self._render = render
        self._log_emails = log_emails

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line: dict[str, Any] = {
            "ts": created.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": self._redact(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        for key, value in (fields.items() if isinstance(fields, Mapping) else ()):
            line[f"field.{key}" if key in _OWN_KEYS else str(key)] = self._redact(value)
        exc = self.formatException(record.exc_info) if record.exc_info else ""
        if record.stack_info:
            exc = (exc + "\n" + self.formatStack(record.stack_info)).strip()
        if exc:
            line["exc"] = self._redact(exc)
        return self._render(line)

    def _redact(self, value: Any) -> Any:
        if isinstance(value, str):
            return _mask(value, self._log_emails)
        if isinstance(value, Mapping):
            return {str(key): self._redact(item) for key, item in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self._redact(item) for item in value]
        if value is None or isinstance(value, (bool, int, float)):
            return value
        return _mask(str(value), self._log_emails)


def _render_json(line: Mapping[str, Any]) -> str:
    return json.dumps(line, default=str)


def _render_text(line: Mapping[str, Any]) -> str:
    """``ts level logger msg k=v ...``; values with spaces, quotes or newlines are JSON-quoted."""
    msg = line["msg"].replace("\n", "\\n")  # one line per event, even for a multi-line message
    head = f"{line['ts']} {line['level']} {line['logger']} {msg}"
    pairs = [f"{key}={_text_value(value)}" for key, value in line.items() if key not in _HEAD_KEYS]
    return " ".join([head, *pairs])


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and not re.search(r'[\s"=\\]', value):
        return value
    return json.dumps(value, default=str)


_RENDERERS = {"json": _render_json, "text": _render_text}


class _Handler(logging.StreamHandler[TextIO]):
    """Marks the handler ``setup_logging`` installed, so a second call replaces it instead of adding one."""


def setup_logging(fmt: str, level: str, log_emails: bool, stream: TextIO | None = None) -> None:
    """Send every record at ``level`` or above to ``stream`` (default: ``sys.stderr`` at call time).

    Called again on reload: the new handler is installed before the old one is removed, so no line is
    lost in between.
    """
    if fmt not in _RENDERERS or level not in _LEVELS:
        raise ValueError(f"unknown log format {fmt!r} or level {level!r}")
    handler = _Handler(sys.stderr if stream is None else stream)
    handler.setFormatter(_Formatter(_RENDERERS[fmt], log_emails))
    root = logging.getLogger()
    root.addHandler(handler)
    for old in [h for h in root.handlers if isinstance(h, _Handler) and h is not handler]:
        root.removeHandler(old)
    root.setLevel(_LEVELS[level])


class RateLimitedLog:
    """Log a repeating warning once, then at most once per ``interval``, with the count of repeats.

    Keys name the condition (e.g. ``"upstream-unreachable"``) and must come from a closed set: the state
    per key is kept until ``clear``. Thread-safe; ``clock`` is injected (``time.monotonic``) for tests.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (when the last line was logged, occurrences since, last msg, last fields)
        self._state: dict[str, tuple[float, int, str, Mapping[str, Any]]] = {}

    def warn(self, key: str, msg: str, fields: Mapping[str, Any] | None = None) -> None:
        """Log now if ``key`` is new or ``interval`` has passed since its last line, else count it."""
        now = self._clock()
        with self._lock:
            logged_at, suppressed, _, _ = self._state.get(key, (now - self._interval, 0, msg, {}))
            if now - logged_at < self._interval:
                self._state[key] = (logged_at, suppressed + 1, msg, fields or {})
                return
            self._state[key] = (now, 0, msg, fields or {})
        self._emit(msg, fields or {}, suppressed + 1 if suppressed else 0)

    def clear(self, key: str) -> None:
        """The condition ended: log the repeats not yet reported, and log the next occurrence at once."""
        with self._lock:
            _, suppressed, msg, fields = self._state.pop(key, (0.0, 0, "", {}))
        if suppressed:
            self._emit(msg, fields, suppressed)

    def _emit(self, msg: str, fields: Mapping[str, Any], repeated: int) -> None:
        if repeated:
            msg, fields = f"{msg} (repeated {repeated} times)", {**fields, "repeated": repeated}
        self._logger.warning(msg, extra={"fields": fields})
