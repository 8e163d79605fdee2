"""The settings: one table (``SETTINGS``) turned into a frozen ``Config``; flags > env > TOML > defaults.

Owns every setting's name, default, parser and help text, and derives from that one table the argparse
flags, the environment variables, the TOML keys, the ``--help`` text and the README table, so the five
cannot disagree (gunicorn's ``Setting`` idea at huey's weight). ``load_config`` is pure: it reads no
``os.environ`` (the caller passes ``environ``) and touches the file system only to read the TOML file and
the secret files. It never logs; a bad value is a ``ConfigError`` naming the setting and its source, and a
secret's value is never echoed, not even in an error.

Value syntax, the same in flags, environment and TOML:
- durations: ``250ms``, ``5s``, ``2m``, ``1h``, ``5d`` or plain seconds (``1.5``);
- sizes: ``512KiB``, ``64MiB``, ``1GiB`` (powers of 1024), ``KB``/``MB``/``GB`` (powers of 1000) or plain
  bytes (``1000``);
- booleans: ``true``/``false``, ``yes``/``no``, ``1``/``0``; modes: a quoted octal string (``"0660"``);
- an empty environment variable counts as unset (what ``VAR=`` in a compose file usually means).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import difflib
import grp
import ipaddress
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forwarder.errors import ConfigError

CONFIG_ENV = "FORWARDER_CONFIG"
"""Where the TOML file's path comes from when ``--config`` is not given."""

_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes on Linux, one of them the terminating NUL


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


@dataclass(frozen=True)
class Derived:
    """A default computed at load time from ``environ`` and the settings above it in the table."""

    text: str  # how --help and the README show it
    compute: Callable[[Mapping[str, str], Mapping[str, Any]], str]


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One row of the table. ``default`` is raw text, parsed like any other source; ``None`` is unset."""

    name: str
    default: str | Derived | None
    parse: Callable[[Any], Any]  # raw str or TOML value -> value; raises ValueError(reason)
    help: str
    env: str | None
    cli: bool = True  # False for credentials: every user can read argv with ps
    reloadable: bool = False
    secret: bool = False  # the value is never echoed, not even in an error
    group: str  # orders --help and the README

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default_text(self) -> str:
        if isinstance(self.default, Derived):
            return self.default.text
        return "(none)" if self.default is None else self.default


def _text(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError("expected a string")
    if not raw.strip():
        raise ValueError("is empty")
    return raw.strip()


_NUMBER_UNIT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
_SECONDS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_BYTES = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3}


def _quantity(units: Mapping[str, float], what: str, at_least: str) -> Callable[[object], float]:
    """A parser of a number with a unit suffix, bounded below by ``at_least`` (written with a unit)."""

    def scale(raw: object) -> float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):  # TOML numbers are in the base unit
            if raw < 0 or not math.isfinite(raw):
                raise ValueError(f"not a {what}")
            return float(raw)
        match = _NUMBER_UNIT.fullmatch(_text(raw).lower())
        if match is None or match[2] not in units:
            raise ValueError(f"not a {what}")
        return float(match[1]) * units[match[2]]

    minimum = scale(at_least)

    def parse(raw: object) -> float:
        if scale(raw) < minimum:
            raise ValueError(f"must be at least {at_least}")
        return scale(raw)

    return parse


def _duration(at_least: str) -> Callable[[object], float]:
    return _quantity(_SECONDS, "duration (use 250ms, 5s, 2m, 1h, 5d or seconds)", at_least)


parse_duration = _duration(at_least="0s")
"""A duration as the settings take it ("7d", "90m", "300"), for command flags such as ``--older-than``."""


def _size(at_least: str) -> Callable[[object], int]:
    parse = _quantity(_BYTES, "size (use 512KiB, 64MiB, 1GiB, 1MB or bytes)", at_least)
    return lambda raw: int(parse(raw))


def _integer(at_least: int, at_most: int | None = None) -> Callable[[object], int]:
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


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        if _text(raw).lower() not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return _text(raw).lower()

    return parse


_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _parse_bool(raw: object) -> bool:
    """A boolean; ``add_arguments`` recognises this parser to let a bare ``--log-emails`` mean true."""
    if isinstance(raw, bool):
        return raw
    if _text(raw).lower() not in _BOOLEANS:
        raise ValueError("not a boolean (use true/false, yes/no, 1/0)")
    return _BOOLEANS[_text(raw).lower()]


def _parse_mode(raw: object) -> int:
    if isinstance(raw, int):  # TOML's 660 is decimal: refusing beats silently applying mode 0o1224
        raise ValueError('write the mode as a quoted octal string, e.g. "0660"')
    digits = _text(raw).lower().removeprefix("0o")
    if not re.fullmatch(r"[0-7]{1,4}", digits) or int(digits, 8) > 0o777:
        raise ValueError("not an octal permission mode from 0000 to 0777")
    return int(digits, 8)


def _parse_group(raw: object) -> int:
    """A group name or numeric gid, resolved now to the gid ``chown`` needs."""
    name = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else _text(raw)
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError("no such group") from None


def _parse_address(raw: object) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port``; ``off`` disables the listener (``None``)."""
    if _text(raw).lower() == "off":
        return None
    host, _, port = _text(raw).rpartition(":")
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


def _parse_api_url(raw: object) -> str:
    parts = urllib.parse.urlsplit(_text(raw))
    if parts.scheme.lower() == "http":
        raise ValueError("http:// is refused: the forwarder always uses TLS, write https://")
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise ValueError("must be an https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    return _text(raw).rstrip("/")


def _parse_path(raw: object) -> Path:
    return Path(_text(raw))


def _parse_socket_path(raw: object) -> Path:
    if len(os.fsencode(_parse_path(raw))) > _SOCKET_PATH_MAX:
        raise ValueError(f"longer than {_SOCKET_PATH_MAX} bytes, the limit of a Unix socket path")
    return _parse_path(raw)


def _parse_readable_file(raw: object) -> Path:
    path = _parse_path(raw)
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ValueError("no such readable file")
    return path


def _parse_api_key(raw: object) -> Secret:
    return Secret(_text(raw))


def _parse_api_secret(raw: object) -> Secret:
    try:
        decoded = base64.b64decode(_text(raw), validate=True)
    except binascii.Error:
        decoded = b""
    if not decoded:
        raise ValueError("not valid base64 (the value is not shown)")
    return Secret(_text(raw))


def _default_data_dir(environ: Mapping[str, str], values: Mapping[str, Any]) -> str:
    """XDG's state directory, else ``~/.local/state``, else a per-user directory in /tmp."""
    if os.path.isabs(environ.get("XDG_STATE_HOME", "")):  # the XDG spec says to ignore relative paths
        return os.path.join(environ["XDG_STATE_HOME"], "turret-forwarder")
    if environ.get("HOME"):
        return os.path.join(environ["HOME"], ".local", "state", "turret-forwarder")
    return f"/tmp/turret-forwarder-{os.getuid()}"


_POSITIVE = _duration(at_least="1ms")
_CORE, _UPSTREAM, _DELIVERY, _OPS = "core", "upstream", "delivery", "ops"

SETTINGS: tuple[Setting, ...] = (
    Setting(name="data_dir", group=_CORE, env="FORWARDER_DATA_DIR", parse=_parse_path,
            default=Derived("$XDG_STATE_HOME/turret-forwarder or ~/.local/state/turret-forwarder",
                            _default_data_dir),
            help="Directory of the outbox database and its lock."),
    Setting(name="socket", group=_CORE, env="FORWARDER_SOCKET", parse=_parse_socket_path,
            default=Derived("<data_dir>/forwarder.sock", lambda _, got: f"{got['data_dir']}/forwarder.sock"),
            help="Unix socket the apps write messages to."),
    Setting(name="socket_mode", group=_CORE, env="FORWARDER_SOCKET_MODE", default="0660", parse=_parse_mode,
            help="Octal permission mode of the socket."),
    Setting(name="socket_group", group=_CORE, env="FORWARDER_SOCKET_GROUP", default=None, parse=_parse_group,
            help="Group (name or gid) owning the socket, so that its members may write."),
    Setting(name="max_message_bytes", group=_CORE, env="FORWARDER_MAX_MESSAGE_BYTES", default="512KiB",
            parse=_size(at_least="1KiB"), reloadable=True, help="Longest request line; longer is too_large."),
    Setting(name="idle_timeout", group=_CORE, env="FORWARDER_IDLE_TIMEOUT", default="60s", parse=_POSITIVE,
            reloadable=True, help="Close a connection that sent nothing for this long."),
    Setting(name="metrics_addr", group=_CORE, env="FORWARDER_METRICS_ADDR", default="127.0.0.1:9464",
            parse=_parse_address, help="host:port of /metrics, /healthz and /readyz; off disables them."),
    Setting(name="log_format", group=_CORE, env="FORWARDER_LOG_FORMAT", default="json",
            parse=_choice("json", "text"), reloadable=True, help="json (an object a line) or text."),
    Setting(name="log_level", group=_CORE, env="FORWARDER_LOG_LEVEL", default="info",
            parse=_choice("debug", "info", "warning", "error"), reloadable=True,
            help="debug, info, warning or error."),
    Setting(name="log_emails", group=_CORE, env="FORWARDER_LOG_EMAILS", default="false", parse=_parse_bool,
            reloadable=True, help="Debugging only: log email addresses in clear, not as a short hash."),
    Setting(name="api_url", group=_UPSTREAM, env="TURRET_API_URL", default="https://api.turret.io",
            parse=_parse_api_url, reloadable=True, help="Turret.IO API base URL; https only."),
    Setting(name="ca_file", group=_UPSTREAM, env="TURRET_CA_FILE", default=None, parse=_parse_readable_file,
            reloadable=True, help="PEM bundle verifying the API's certificate instead of the system's."),
    Setting(name="api_key", group=_UPSTREAM, env="TURRET_API_KEY", default=None, parse=_parse_api_key,
            cli=False, reloadable=True, secret=True, help="Turret.IO API key (or api_key_file)."),
    Setting(name="api_secret", group=_UPSTREAM, env="TURRET_API_SECRET", default=None,
            parse=_parse_api_secret, cli=False, reloadable=True, secret=True,
            help="Turret.IO API secret, base64 as distributed (or api_secret_file)."),
    Setting(name="api_key_file", group=_UPSTREAM, env="TURRET_API_KEY_FILE", default=None,
            parse=_parse_path, reloadable=True, help="File holding the API key, outer spaces stripped."),
    Setting(name="api_secret_file", group=_UPSTREAM, env="TURRET_API_SECRET_FILE", default=None,
            parse=_parse_path, reloadable=True, help="File holding the API secret, outer spaces stripped."),
    Setting(name="concurrency", group=_DELIVERY, env="FORWARDER_CONCURRENCY", default="8",
            parse=_integer(1, 256), help="Requests in flight at once (distinct ordering keys)."),
    Setting(name="window_messages", group=_DELIVERY, env="FORWARDER_WINDOW_MESSAGES", default="10000",
            parse=_integer(1), help="Messages the flusher reads ahead from the outbox."),
    Setting(name="connect_timeout", group=_DELIVERY, env="TURRET_CONNECT_TIMEOUT", default="5s",
            parse=_POSITIVE, reloadable=True, help="TCP and TLS connect timeout of an attempt."),
    Setting(name="read_timeout", group=_DELIVERY, env="TURRET_READ_TIMEOUT", default="30s",
            parse=_POSITIVE, reloadable=True, help="How long an attempt waits for the API's response."),
    Setting(name="backoff_base", group=_DELIVERY, env="FORWARDER_BACKOFF_BASE", default="1s",
            parse=_POSITIVE, reloadable=True, help="First retry delay; doubles each attempt, with jitter."),
    Setting(name="backoff_cap", group=_DELIVERY, env="FORWARDER_BACKOFF_CAP", default="300s",
            parse=_POSITIVE, reloadable=True, help="Longest retry delay."),
    Setting(name="retry_after_cap", group=_DELIVERY, env="FORWARDER_RETRY_AFTER_CAP", default="1h",
            parse=_POSITIVE, reloadable=True, help="Longest Retry-After of the API that is honoured."),
    Setting(name="max_age", group=_DELIVERY, env="FORWARDER_MAX_AGE", default="5d", parse=_POSITIVE,
            reloadable=True, help="A message older than this becomes a dead letter."),
    Setting(name="max_attempts", group=_DELIVERY, env="FORWARDER_MAX_ATTEMPTS", default="0",
            parse=_integer(0), reloadable=True, help="Attempts before a dead letter; 0 means no cap."),
    Setting(name="auth_probe_interval", group=_DELIVERY, env="FORWARDER_AUTH_PROBE_INTERVAL", default="60s",
            parse=_POSITIVE, reloadable=True, help="While credentials are refused, how often one probes."),
    Setting(name="stall_after", group=_DELIVERY, env="FORWARDER_STALL_AFTER", default="5m", parse=_POSITIVE,
            reloadable=True, help="/readyz fails if a backlog waits and nothing was delivered this long."),
    Setting(name="max_backlog_messages", group=_OPS, env="FORWARDER_MAX_BACKLOG_MESSAGES", default="1000000",
            parse=_integer(1), reloadable=True, help="Outbox message count at which new ones are full."),
    Setting(name="max_backlog_bytes", group=_OPS, env="FORWARDER_MAX_BACKLOG_BYTES", default="1GiB",
            parse=_size(at_least="1KiB"), reloadable=True, help="Outbox size at which new ones are full."),
    Setting(name="min_free_bytes", group=_OPS, env="FORWARDER_MIN_FREE_BYTES", default="64MiB",
            parse=_size(at_least="0"), reloadable=True, help="Free disk below which new messages are full."),
    Setting(name="shutdown_timeout", group=_OPS, env="FORWARDER_SHUTDOWN_TIMEOUT", default="5s",
            parse=_duration(at_least="0s"), help="How long a stop waits for requests in flight."),
    Setting(name="reload_interval", group=_OPS, env="FORWARDER_RELOAD_INTERVAL", default="10s",
            parse=_POSITIVE, help="Period of the config and secret files' content check, besides watching."),
)

_BY_NAME = {setting.name: setting for setting in SETTINGS}
_CREDENTIALS = ("api_key", "api_secret")  # each has a <name>_file twin setting


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting, parsed; a reload builds a new one and compares with ``changed_settings``."""

    data_dir: Path
    socket: Path
    socket_mode: int
    socket_group: int | None  # gid
    max_message_bytes: int
    idle_timeout: float  # every duration is in seconds
    metrics_addr: tuple[str, int] | None
    log_format: str
    log_level: str
    log_emails: bool
    api_url: str  # without a trailing slash
    ca_file: Path | None
    api_key: Secret | None  # from the value or the file
    api_secret: Secret | None  # still base64, as distributed
    api_key_file: Path | None
    api_secret_file: Path | None
    concurrency: int
    window_messages: int
    connect_timeout: float
    read_timeout: float
    backoff_base: float
    backoff_cap: float
    retry_after_cap: float
    max_age: float
    max_attempts: int
    auth_probe_interval: float
    stall_after: float
    max_backlog_messages: int
    max_backlog_bytes: int
    min_free_bytes: int
    shutdown_timeout: float
    reload_interval: float
    config_file: Path | None
    secret_files: tuple[Path, ...]  # what a reload watches besides config_file


def add_arguments(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """Add ``--config`` and a flag per CLI setting (all, or those in ``names``), grouped as in the table.

    Every flag defaults to ``argparse.SUPPRESS``: an absent flag is absent from ``vars(namespace)``, so
    the environment, the file or the default applies.
    """
    wanted = None if names is None else set(names)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                        help=f"TOML file of settings, keys named as below (env {CONFIG_ENV})")
    groups: dict[str, Any] = {}
    for s in SETTINGS:
        if not s.cli:  # claim the flag, or argparse would take --api-key as an abbreviation of --api-key-file
            parser.add_argument(s.flag, nargs="?", action=_RefusedFlag, default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
        elif wanted is None or s.name in wanted:
            if s.group not in groups:
                groups[s.group] = parser.add_argument_group(f"{s.group} settings")
            bare_is_true: dict[str, Any] = {"nargs": "?", "const": "true"} if s.parse is _parse_bool else {}
            groups[s.group].add_argument(s.flag, dest=s.name, default=argparse.SUPPRESS, help=_help_text(s),
                                         **bare_is_true)


class _RefusedFlag(argparse.Action):
    """A credential on the command line: refused without echoing it, since ``ps`` shows argv to all."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setting = _BY_NAME[self.dest]
        parser.error(f"{option_string} is refused: set {setting.env} or {setting.flag}-file instead")


def _help_text(setting: Setting) -> str:
    notes = [f"env {setting.env}"] if setting.env else []
    notes += [f"default {setting.default_text}"] + (["reloadable"] if setting.reloadable else [])
    return f"{setting.help} ({'; '.join(notes)})".replace("%", "%%")


def settings_markdown() -> str:
    """The README's settings table, generated so that the README cannot drift from ``SETTINGS``."""
    lines = ["| Setting (TOML key) | Flag | Environment | Default | On reload | Description |",
             "|---|---|---|---|---|---|"]
    for s in SETTINGS:
        cells = (f"`{s.name}`", f"`{s.flag}`" if s.cli else "—", f"`{s.env}`" if s.env else "—",
                 f"`{s.default_text}`", "applied" if s.reloadable else "needs restart", s.help)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def load_config(flags: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    """Build a ``Config`` from ``vars(namespace)`` and an environment; raise ``ConfigError`` if bad.

    A flag whose value is ``None`` counts as absent, like a suppressed one. Giving a credential both as
    a value and as a file is an error, not a silent precedence rule.
    """
    config_file, from_file = _read_config_file(flags, environ)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        raw, sources[setting.name] = _pick(setting, flags, environ, from_file, config_file)
        if isinstance(raw, Derived):
            raw = raw.compute(environ, values)
        values[setting.name] = None if raw is None else _parse(setting, raw, sources[setting.name])
    secret_files = tuple(path for name in _CREDENTIALS if (path := _load_credential(name, values, sources)))
    if values["backoff_base"] > values["backoff_cap"]:
        raise ConfigError("backoff_base", sources["backoff_base"],
                          f"is longer than backoff_cap ({sources['backoff_cap']})")
    return Config(**values, config_file=config_file, secret_files=secret_files)


def changed_settings(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """Names of the settings that differ, split into (reloadable, needing a restart), in table order."""
    changed = [s for s in SETTINGS if getattr(old, s.name) != getattr(new, s.name)]
    return [s.name for s in changed if s.reloadable], [s.name for s in changed if not s.reloadable]


def _given(value: Any) -> bool:
    return value is not None and value != ""


def _pick(setting: Setting, flags: Mapping[str, Any], environ: Mapping[str, str],
          from_file: Mapping[str, Any], config_file: Path | None) -> tuple[Any, str]:
    """The raw value of ``setting`` with the highest precedence, and where it came from."""
    if _given(flags.get(setting.name)):
        return flags[setting.name], setting.flag
    if setting.env and _given(environ.get(setting.env)):
        return environ[setting.env], f"env {setting.env}"
    if setting.name in from_file:
        return from_file[setting.name], f"config {config_file}"
    return setting.default, "default"


def _parse(setting: Setting, raw: Any, source: str) -> Any:
    try:
        return setting.parse(raw)
    except ValueError as error:
        reason = str(error) if setting.secret else f"{error}, got {raw!r}"
        raise ConfigError(setting.name, source, reason) from None


def _read_config_file(flags: Mapping[str, Any], environ: Mapping[str, str]
                      ) -> tuple[Path | None, dict[str, Any]]:
    """The TOML file named by ``--config`` or ``FORWARDER_CONFIG``, if any, and its settings."""
    if _given(flags.get("config")):
        path, source = Path(flags["config"]), "--config"
    elif _given(environ.get(CONFIG_ENV)):
        path, source = Path(environ[CONFIG_ENV]), f"env {CONFIG_ENV}"
    else:
        return None, {}
    try:
        with path.open("rb") as file:
            table = tomllib.load(file)
    except OSError as error:
        raise ConfigError("config", source, f"cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("config", f"config {path}", f"not valid TOML: {error}") from None
    for key in sorted(table.keys() - _BY_NAME.keys()):
        close = difflib.get_close_matches(key, _BY_NAME, n=1)
        hint = f", did you mean {close[0]}?" if close else ""
        raise ConfigError(key, f"config {path}", f"unknown setting{hint}")
    return path, table


def _load_credential(name: str, values: dict[str, Any], sources: Mapping[str, str]) -> Path | None:
    """Fill ``values[name]`` from ``<name>_file`` if that is set, and return that file (to watch)."""
    file_setting = f"{name}_file"
    path: Path | None = values[file_setting]
    if path is None:
        return None
    if values[name] is not None:
        both = f"{name} is given too ({sources[name]}); give only one"
        raise ConfigError(file_setting, sources[file_setting], both)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ConfigError(file_setting, sources[file_setting], f"cannot read {path}: {reason}") from None
    values[name] = _parse(_BY_NAME[name], text, f"file {path}")
    return path
