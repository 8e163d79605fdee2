"""Setting values: the parsers of durations, sizes, modes, addresses, URLs and secrets.

Each parser takes a raw string (or a TOML value) and returns the value or raises ``ValueError`` with a
reason; ``config`` adds the setting's name and source to make it a ``ConfigError``. ``Secret`` keeps a
credential out of every repr and log line.
"""

from __future__ import annotations

import base64
import binascii
import grp
import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

SOCKET_PATH_MAX = 107  # sun_path is 108 bytes on Linux, one of them the terminating NUL


class Secret:
    """A credential that cannot leak by accident: ``repr`` and ``str`` are masked, ``reveal()`` is not."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The clear value; call it only where the credential is used (signing, headers)."""
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def text(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError("expected a string")
    if not raw.strip():
        raise ValueError("is empty")
    return raw.strip()


_NUMBER_UNIT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
_SECONDS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_BYTES = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3}


def _quantity(units: Mapping[str, float], what: str, at_least: str, at_most: str | None = None
              ) -> Callable[[object], float]:
    """A parser of a number with a unit suffix, bounded by ``at_least`` and ``at_most`` (written with units)."""

    def scale(raw: object) -> float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):  # TOML numbers are in the base unit
            if raw < 0 or not math.isfinite(raw):
                raise ValueError(f"not a {what}")
            return float(raw)
        match = _NUMBER_UNIT.fullmatch(text(raw).lower())
        if match is None or match[2] not in units:
            raise ValueError(f"not a {what}")
        return float(match[1]) * units[match[2]]

    minimum = scale(at_least)
    maximum = math.inf if at_most is None else scale(at_most)

    def parse(raw: object) -> float:
        if scale(raw) < minimum:
            raise ValueError(f"must be at least {at_least}")
        if scale(raw) > maximum:
            raise ValueError(f"must be at most {at_most}")
        return scale(raw)

    return parse


def duration(at_least: str) -> Callable[[object], float]:
    return _quantity(_SECONDS, "duration (use 250ms, 5s, 2m, 1h, 5d or seconds)", at_least)


def size(at_least: str, at_most: str | None = None) -> Callable[[object], int]:
    parse = _quantity(_BYTES, "size (use 512KiB, 64MiB, 1GiB, 1MB or bytes)", at_least, at_most)
    return lambda raw: int(parse(raw))


def integer(at_least: int, at_most: int | None = None) -> Callable[[object], int]:
    bounds = f"at least {at_least}" if at_most is None else f"between {at_least} and {at_most}"

    def parse(raw: object) -> int:
        if isinstance(raw, str) and re.fullmatch(r"\s*\d+\s*", raw):
            raw = int(raw)
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise ValueError("not a whole number")
        if raw < at_least or (at_most is not None and raw > at_most):
            raise ValueError(f"must be {bounds}")
        return raw

    return parse


def choice(*choices: str) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        if text(raw).lower() not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return text(raw).lower()

    return parse


_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def parse_bool(raw: object) -> bool:
    """A boolean; ``add_arguments`` recognises this parser to let a bare ``--log-emails`` mean true."""
    if isinstance(raw, bool):
        return raw
    if text(raw).lower() not in _BOOLEANS:
        raise ValueError("not a boolean (use true/false, yes/no, 1/0)")
    return _BOOLEANS[text(raw).lower()]


def parse_mode(raw: object) -> int:
    if isinstance(raw, int):  # TOML's 660 is decimal: refusing beats silently applying mode 0o1224
        raise ValueError('write the mode as a quoted octal string, e.g. "0660"')
    digits = text(raw).lower().removeprefix("0o")
    if not re.fullmatch(r"[0-7]{1,4}", digits) or int(digits, 8) > 0o777:
        raise ValueError("not an octal permission mode from 0000 to 0777")
    return int(digits, 8)


def parse_group(raw: object) -> int:
    """A group name or numeric gid, resolved now to the gid ``chown`` needs."""
    name = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else text(raw)
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError("no such group") from None


def parse_address(raw: object) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port``; ``off`` disables the listener (``None``)."""
    if text(raw).lower() == "off":
        return None
    host, _, port = text(raw).rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("not an IPv6 address inside the brackets") from None
    elif not host or ":" in host:
        raise ValueError('not host:port (write IPv6 as "[::1]:9464"; "off" disables)')
    if not port.isdigit() or int(port) > 65535:
        raise ValueError("port must be from 0 to 65535")
    return host, int(port)


def parse_api_url(raw: object) -> str:
    parts = urllib.parse.urlsplit(text(raw))
    if parts.scheme.lower() == "http":
        raise ValueError("http:// is refused: the forwarder always uses TLS, write https://")
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise ValueError("must be an https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    return text(raw).rstrip("/")


def parse_path(raw: object) -> Path:
    return Path(text(raw))


def parse_socket_path(raw: object) -> Path:
    if len(os.fsencode(parse_path(raw))) > SOCKET_PATH_MAX:
        raise ValueError(f"longer than {SOCKET_PATH_MAX} bytes, the limit of a Unix socket path")
    return parse_path(raw)


def parse_readable_file(raw: object) -> Path:
    path = parse_path(raw)
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ValueError("no such readable file")
    return path


def parse_api_key(raw: object) -> Secret:
    return Secret(text(raw))


def parse_api_secret(raw: object) -> Secret:
    try:
        decoded = base64.b64decode(text(raw), validate=True)
    except binascii.Error:
        decoded = b""
    if not decoded:
        raise ValueError("not valid base64 (the value is not shown)")
    return Secret(text(raw))


def default_data_dir(environ: Mapping[str, str], values: Mapping[str, Any]) -> str:
    """XDG's state directory, else ``~/.local/state``, else a per-user directory in /tmp."""
    if os.path.isabs(environ.get("XDG_STATE_HOME", "")):  # the XDG spec says to ignore relative paths
        return os.path.join(environ["XDG_STATE_HOME"], "turret-forwarder")
    if environ.get("HOME"):
        return os.path.join(environ["HOME"], ".local", "state", "turret-forwarder")
    return f"/tmp/turret-forwarder-{os.getuid()}"
