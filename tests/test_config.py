"""Tests of forwarder.config: precedence, every parser's good and bad input, secrets, the table's outputs."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import grp
import os
from pathlib import Path
from typing import Any

import pytest

from forwarder.config import (
    SETTINGS,
    Config,
    Secret,
    add_arguments,
    changed_settings,
    load_config,
    settings_markdown,
)
from forwarder.errors import ConfigError

DEMO_SECRET = base64.b64encode(b"demo-secret-bytes").decode()


def _flags(*argv: str) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return vars(parser.parse_args(argv))


def _load(tmp_path: Path, *argv: str, **environ: str) -> Config:
    return load_config(_flags(*argv), {"HOME": str(tmp_path), **environ})


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "forwarder.toml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, *argv: str, **environ: str) -> str:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, *argv, **environ)
    return str(caught.value)


@pytest.mark.parametrize(
    ("name", "flag", "env", "toml", "expected"),
    [
        ("idle_timeout", "2s", "3s", '"4s"', (2.0, 3.0, 4.0, 60.0)),
        ("max_message_bytes", "2KiB", "3KiB", "4096", (2048, 3072, 4096, 524288)),
        ("log_level", "debug", "warning", '"error"', ("debug", "warning", "error", "info")),
        ("metrics_addr", "127.0.0.1:1", "[::1]:2", '"off"', (("127.0.0.1", 1), ("::1", 2), None,
                                                            ("127.0.0.1", 9464))),
        ("api_url", "https://a.example/", "https://b.example", '"https://c.example/v1/"',
         ("https://a.example", "https://b.example", "https://c.example/v1", "https://api.turret.io")),
    ],
)
def test_flag_beats_env_beats_toml_beats_default(
    tmp_path: Path, name: str, flag: str, env: str, toml: str, expected: tuple[Any, ...]
) -> None:
    setting = next(s for s in SETTINGS if s.name == name)
    assert setting.env is not None
    config_file = _toml(tmp_path, f"{name} = {toml}\n")
    layers: list[tuple[list[str], dict[str, str]]] = [
        ([setting.flag, flag, "--config", str(config_file)], {setting.env: env}),
        (["--config", str(config_file)], {setting.env: env}),
        (["--config", str(config_file)], {}),
        ([], {}),
    ]
    got = tuple(getattr(_load(tmp_path, *argv, **environ), name) for argv, environ in layers)
    assert got == expected


def test_config_flag_beats_config_env(tmp_path: Path) -> None:
    flagged = _toml(tmp_path, "concurrency = 3\n")
    ignored = tmp_path / "other.toml"
    ignored.write_text("concurrency = 4\n")
    assert _load(tmp_path, "--config", str(flagged), FORWARDER_CONFIG=str(ignored)).concurrency == 3
    assert _load(tmp_path, FORWARDER_CONFIG=str(ignored)).concurrency == 4
    assert _load(tmp_path, FORWARDER_CONFIG=str(ignored)).config_file == ignored


def test_empty_env_and_none_flag_count_as_unset(tmp_path: Path) -> None:
    config = load_config({"idle_timeout": None}, {"HOME": str(tmp_path), "FORWARDER_IDLE_TIMEOUT": ""})
    assert config.idle_timeout == 60.0


def test_load_config_ignores_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORWARDER_IDLE_TIMEOUT", "7s")
    assert _load(tmp_path).idle_timeout == 60.0


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"XDG_STATE_HOME": "/state", "HOME": "/home/u"}, "/state/turret-forwarder"),
        ({"XDG_STATE_HOME": "relative", "HOME": "/home/u"}, "/home/u/.local/state/turret-forwarder"),
        ({"HOME": "/home/u"}, "/home/u/.local/state/turret-forwarder"),
        ({}, f"/tmp/turret-forwarder-{os.getuid()}"),
    ],
)
def test_default_data_dir_comes_from_the_passed_environment(environ: dict[str, str], expected: str) -> None:
    config = load_config({}, environ)
    assert (config.data_dir, config.socket) == (Path(expected), Path(expected) / "forwarder.sock")


def test_socket_default_follows_data_dir(tmp_path: Path) -> None:
    assert _load(tmp_path, "--data-dir", "/srv/fwd").socket == Path("/srv/fwd/forwarder.sock")


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("idle_timeout", "250ms", 0.25),
        ("idle_timeout", "2m", 120.0),
        ("idle_timeout", "1.5", 1.5),
        ("max_age", "5d", 432000.0),
        ("retry_after_cap", "1h", 3600.0),
        ("shutdown_timeout", "0", 0.0),
        ("max_message_bytes", "16MiB", 16 * 1024**2),
        ("max_backlog_bytes", "1GiB", 1024**3),
        ("max_backlog_bytes", "2MB", 2_000_000),
        ("min_free_bytes", "1000", 1000),
        ("socket_mode", "660", 0o660),
        ("socket_mode", "0600", 0o600),
        ("socket_mode", "0o640", 0o640),
        ("socket_group", "0", 0),
        ("socket_group", grp.getgrgid(os.getgid()).gr_name, os.getgid()),
        ("metrics_addr", "[::1]:9464", ("::1", 9464)),
        ("metrics_addr", "localhost:0", ("localhost", 0)),
        ("metrics_addr", "OFF", None),
        ("log_format", "TEXT", "text"),
        ("log_emails", "yes", True),
        ("log_emails", "0", False),
        ("api_url", "https://api.example.test/", "https://api.example.test"),
        ("concurrency", "256", 256),
        ("max_attempts", "0", 0),
    ],
)
def test_good_values_parse(tmp_path: Path, name: str, raw: str, expected: Any) -> None:
    setting = next(s for s in SETTINGS if s.name == name)
    assert setting.env is not None
    assert getattr(_load(tmp_path, **{setting.env: raw}), name) == expected


@pytest.mark.parametrize(
    ("name", "raw", "reason"),
    [
        ("data_dir", "  ", "is empty"),
        ("socket", "/" + "s" * 107, "longer than 107 bytes, the limit of a Unix socket path"),
        ("socket_mode", "0999", "not an octal permission mode from 0000 to 0777"),
        ("socket_mode", "01777", "not an octal permission mode from 0000 to 0777"),
        ("socket_group", "no-such-group-for-forwarder-tests", "no such group"),
        ("max_message_bytes", "512", "must be at least 1KiB"),
        ("max_message_bytes", "17MiB", "must be at most 16MiB"),
        ("max_message_bytes", "12QB", "not a size (use 512KiB, 64MiB, 1GiB, 1MB or bytes)"),
        ("idle_timeout", "5x", "not a duration (use 250ms, 5s, 2m, 1h, 5d or seconds)"),
        ("idle_timeout", "-1s", "not a duration (use 250ms, 5s, 2m, 1h, 5d or seconds)"),
        ("idle_timeout", "0", "must be at least 1ms"),
        ("metrics_addr", "9464", 'not host:port (write IPv6 as "[::1]:9464"; "off" disables)'),
        ("metrics_addr", "::1:9464", 'not host:port (write IPv6 as "[::1]:9464"; "off" disables)'),
        ("metrics_addr", "[zz]:1", "not an IPv6 address inside the brackets"),
        ("metrics_addr", "127.0.0.1:65536", "port must be from 0 to 65535"),
        ("log_format", "xml", "must be one of json, text"),
        ("log_level", "verbose", "must be one of debug, info, warning, error"),
        ("log_emails", "maybe", "not a boolean (use true/false, yes/no, 1/0)"),
        ("api_url", "http://api.turret.io", "http:// is refused: the forwarder always uses TLS, write https://"),
        ("api_url", "ftp://api.turret.io", "must be an https:// URL with a host"),
        ("api_url", "https://api.turret.io/?debug=1", "must not have a query or fragment"),
        ("ca_file", "/nonexistent/ca.pem", "no such readable file"),
        ("concurrency", "0", "must be between 1 and 256"),
        ("concurrency", "257", "must be between 1 and 256"),
        ("concurrency", "eight", "not a whole number"),
        ("window_messages", "0", "must be at least 1"),
        ("max_attempts", "-1", "not a whole number"),
        ("max_backlog_messages", "1.5", "not a whole number"),
        ("reload_interval", "soon", "not a duration (use 250ms, 5s, 2m, 1h, 5d or seconds)"),
    ],
)
def test_bad_value_names_setting_and_source(tmp_path: Path, name: str, raw: str, reason: str) -> None:
    setting = next(s for s in SETTINGS if s.name == name)
    assert setting.env is not None
    assert _error(tmp_path, **{setting.env: raw}) == f"{name} (env {setting.env}): {reason}, got {raw!r}"


def test_bad_flag_names_the_flag(tmp_path: Path) -> None:
    assert _error(tmp_path, "--max-message-bytes", "1") == (
        "max_message_bytes (--max-message-bytes): must be at least 1KiB, got '1'"
    )


def test_bad_toml_value_names_the_file(tmp_path: Path) -> None:
    config_file = _toml(tmp_path, "socket_mode = 660\n")
    assert _error(tmp_path, "--config", str(config_file)) == (
        f'socket_mode (config {config_file}): write the mode as a quoted octal string, e.g. "0660", got 660'
    )


@pytest.mark.parametrize(
    ("toml", "name", "expected"),
    [("idle_timeout = 1.5\n", "idle_timeout", 1.5), ("log_emails = true\n", "log_emails", True),
     ("max_backlog_bytes = 2048\n", "max_backlog_bytes", 2048), ("socket_group = 0\n", "socket_group", 0)],
)
def test_toml_native_values(tmp_path: Path, toml: str, name: str, expected: Any) -> None:
    assert getattr(_load(tmp_path, "--config", str(_toml(tmp_path, toml))), name) == expected


@pytest.mark.parametrize(
    ("toml", "expected"),
    [("concurrency = true\n", "concurrency ({}): not a whole number, got True"),
     ("max_age = [1]\n", "max_age ({}): expected a string, got [1]"),
     ("idle_timeout = -2\n",
      "idle_timeout ({}): not a duration (use 250ms, 5s, 2m, 1h, 5d or seconds), got -2"),
     ],
)
def test_toml_wrong_native_types(tmp_path: Path, toml: str, expected: str) -> None:
    config_file = _toml(tmp_path, toml)
    assert _error(tmp_path, "--config", str(config_file)) == expected.format(f"config {config_file}")


def test_unknown_toml_key_is_named(tmp_path: Path) -> None:
    config_file = _toml(tmp_path, "max_age = '1d'\nmax_ages = '2d'\n")
    assert _error(tmp_path, "--config", str(config_file)) == (
        f"max_ages (config {config_file}): unknown setting, did you mean max_age?"
    )


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    assert _error(tmp_path, FORWARDER_CONFIG=str(missing)) == (
        f"config (env FORWARDER_CONFIG): cannot read {missing}: No such file or directory"
    )
    broken = _toml(tmp_path, "max_age = \n")
    assert _error(tmp_path, "--config", str(broken)).startswith(f"config (config {broken}): not valid TOML: ")


def test_backoff_base_longer_than_cap_is_refused(tmp_path: Path) -> None:
    assert _error(tmp_path, FORWARDER_BACKOFF_BASE="10m") == (
        "backoff_base (env FORWARDER_BACKOFF_BASE): is longer than backoff_cap (default)"
    )


def test_credentials_from_values(tmp_path: Path) -> None:
    config = _load(tmp_path, TURRET_API_KEY="demo-key", TURRET_API_SECRET=DEMO_SECRET)
    assert (config.api_key, config.api_secret) == (Secret("demo-key"), Secret(DEMO_SECRET))
    assert config.secret_files == ()


def test_credentials_from_files_are_stripped_and_watched(tmp_path: Path) -> None:
    key_file, secret_file = tmp_path / "key", tmp_path / "secret"
    key_file.write_text("  demo-key\n")
    secret_file.write_text(f"{DEMO_SECRET}\n")
    config = _load(tmp_path, "--api-key-file", str(key_file), TURRET_API_SECRET_FILE=str(secret_file))
    assert config.api_key is not None and config.api_key.reveal() == "demo-key"
    assert config.api_secret is not None and config.api_secret.reveal() == DEMO_SECRET
    assert config.secret_files == (key_file, secret_file)


def test_value_and_file_for_one_credential_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("demo-key")
    assert _error(tmp_path, TURRET_API_KEY="other", TURRET_API_KEY_FILE=str(key_file)) == (
        "api_key_file (env TURRET_API_KEY_FILE): api_key is given too (env TURRET_API_KEY); give only one"
    )


def test_missing_secret_file_names_the_file_setting(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert _error(tmp_path, "--api-secret-file", str(missing)) == (
        f"api_secret_file (--api-secret-file): cannot read {missing}: No such file or directory"
    )


@pytest.mark.parametrize("secret", ["not base64 at all!", "c2VjcmV0!", "c2VjcmV0=x", "===="])
def test_bad_base64_secret_is_never_echoed(tmp_path: Path, secret: str) -> None:
    message = _error(tmp_path, TURRET_API_SECRET=secret)
    assert message == "api_secret (env TURRET_API_SECRET): not valid base64 (the value is not shown)"
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret)
    message = _error(tmp_path, TURRET_API_SECRET_FILE=str(secret_file))
    assert message == f"api_secret (file {secret_file}): not valid base64 (the value is not shown)"


def test_secret_is_masked() -> None:
    secret = Secret("hunter2")
    assert (repr(secret), str(secret), f"{secret}") == ("'***'", "'***'", "'***'")
    assert secret.reveal() == "hunter2"
    assert secret == Secret("hunter2") and secret != Secret("other") and secret != "hunter2"
    assert hash(secret) == hash(Secret("hunter2"))


def test_config_repr_masks_credentials(tmp_path: Path) -> None:
    config = _load(tmp_path, TURRET_API_KEY="demo-key-123", TURRET_API_SECRET=DEMO_SECRET)
    assert "demo-key-123" not in repr(config) and DEMO_SECRET not in repr(config)


def test_config_has_one_field_per_setting() -> None:
    names = [field.name for field in dataclasses.fields(Config)]
    assert names == [s.name for s in SETTINGS] + ["config_file", "secret_files", "sources"]


def test_config_remembers_where_each_value_came_from(tmp_path: Path) -> None:
    """For the daemon's errors about a value found bad only when used (a taken port, a data dir that is a file)."""
    (tmp_path / "f.toml").write_text('log_level = "debug"\n')
    config = load_config({"data_dir": str(tmp_path / "data"), "config": str(tmp_path / "f.toml")},
                         {"FORWARDER_METRICS_ADDR": "127.0.0.1:1"})
    assert config.source_of("data_dir") == "--data-dir"
    assert config.source_of("metrics_addr") == "env FORWARDER_METRICS_ADDR"
    assert config.source_of("log_level") == f"config {tmp_path / 'f.toml'}"
    assert config.source_of("socket") == "default"
    assert config == dataclasses.replace(config, sources={})  # where a value came from is not a change


def test_add_arguments_suppresses_absent_flags_and_hides_secrets() -> None:
    assert _flags() == {}
    assert _flags("--log-emails") == {"log_emails": "true"}
    assert _flags("--log-emails", "false") == {"log_emails": "false"}


@pytest.mark.parametrize("argv", [["--api-key", "demo-key"], ["--api-secret=demo-key"]])
def test_credential_flags_are_refused_unechoed(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _flags(*argv)
    error = capsys.readouterr().err
    assert "is refused: set TURRET_API_" in error and "demo-key" not in error


def test_add_arguments_limited_to_names() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, ["data_dir"])
    shown = [action.dest for action in parser._actions if action.help is not argparse.SUPPRESS]
    assert shown == ["help", "config", "data_dir"]


def test_settings_markdown_lists_every_setting_and_env_var() -> None:
    markdown = settings_markdown()
    rows = markdown.splitlines()[2:]
    assert len(rows) == len(SETTINGS)
    for setting, row in zip(SETTINGS, rows, strict=True):
        assert row.startswith(f"| `{setting.name}` | ")
        assert f"`{setting.env}`" in row


def test_changed_settings_splits_reloadable_from_fixed(tmp_path: Path) -> None:
    old = _load(tmp_path, TURRET_API_KEY="key-1")
    new = _load(tmp_path, TURRET_API_KEY="key-2", FORWARDER_IDLE_TIMEOUT="5s", FORWARDER_CONCURRENCY="4")
    assert changed_settings(old, new) == (["idle_timeout", "api_key"], ["concurrency"])
    assert changed_settings(old, old) == ([], [])
