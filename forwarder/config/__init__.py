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
import difflib
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forwarder.config.settings import BY_NAME, CREDENTIALS, SETTINGS, Derived, Setting
from forwarder.config.values import Secret, duration, parse_bool
from forwarder.errors import ConfigError

__all__ = ["CONFIG_ENV", "SETTINGS", "Config", "Secret", "Setting", "add_arguments", "changed_settings",
           "load_config", "parse_duration", "settings_markdown"]

CONFIG_ENV = "FORWARDER_CONFIG"
"""Where the TOML file's path comes from when ``--config`` is not given."""

parse_duration = duration(at_least="0s")
"""A duration as the settings take it ("7d", "90m", "300"), for command flags such as ``--older-than``."""


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
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)  # name -> origin

    def source_of(self, name: str) -> str:
        """Where setting ``name``'s value came from (``--data-dir``, ``env ...``, ``config ...``, ``default``).

        For the ``ConfigError`` of a value found bad only when used (a taken port, a data dir that is a
        file); a ``Config`` built by hand has no sources and says so.
        """
        return self.sources.get(name, "the value in use")

    @property
    def admin_socket(self) -> Path:
        """The daemon's queue-tools socket (mode 0600): beside the data it changes, not in the apps' volume."""
        return self.data_dir / "admin.sock"


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
            bare_is_true: dict[str, Any] = {"nargs": "?", "const": "true"} if s.parse is parse_bool else {}
            groups[s.group].add_argument(s.flag, dest=s.name, default=argparse.SUPPRESS, help=_help_text(s),
                                         **bare_is_true)


class _RefusedFlag(argparse.Action):
    """A credential on the command line: refused without echoing it, since ``ps`` shows argv to all."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setting = BY_NAME[self.dest]
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
    secret_files = tuple(path for name in CREDENTIALS if (path := _load_credential(name, values, sources)))
    if values["backoff_base"] > values["backoff_cap"]:
        raise ConfigError("backoff_base", sources["backoff_base"],
                          f"is longer than backoff_cap ({sources['backoff_cap']})")
    return Config(**values, config_file=config_file, secret_files=secret_files, sources=sources)


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
    for key in sorted(table.keys() - BY_NAME.keys()):
        close = difflib.get_close_matches(key, BY_NAME, n=1)
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
    values[name] = _parse(BY_NAME[name], text, f"file {path}")
    return path
