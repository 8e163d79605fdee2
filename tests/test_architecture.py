"""The house rules, checked: import directions, one door per dependency, module size, documentation."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from forwarder.config import SETTINGS, settings_markdown
from forwarder.errors import REFUSALS

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "forwarder"
README = (ROOT / "README.md").read_text()

# What each module may import from the package (the house style's layer table). ``store`` is a package;
# its modules may import each other. turretio may use backoff's pure Retry-After parser: both are
# leaves, and the alternative (parsing HTTP dates in two places) would be a twin.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "message": set(),
    "backoff": {"errors", "message"},
    "protocol": {"errors", "message"},
    "config": {"errors", "message", "config"},
    "logs": {"errors", "message"},
    "metrics": {"errors", "message"},
    "store": {"errors", "message", "store", "logs"},  # logs: the repeat-limited line for a failing disk
    "turretio": {"errors", "message", "backoff"},
    "reload": {"errors", "message"},
    "ingest": {"errors", "message", "protocol", "metrics", "store", "config", "logs"},
    "delivery": {"errors", "message", "backoff", "config", "metrics", "store", "turretio", "logs"},
    "client": {"errors", "message", "protocol"},
    "fakeapi": {"errors", "message"},
    "daemon": {"errors", "message", "protocol", "config", "logs", "metrics", "backoff", "store", "turretio",
               "ingest", "delivery", "reload"},
}
TOP = {"cli", "admin", "demo", "__main__", "__init__"}  # may import anything; nothing imports cli
# One door per third-party dependency (and sqlite3: the only SQL is in the store).
DOORS = {"persistqueue": {"store"}, "requests": {"delivery"}, "watchdog": {"reload"},
         "prometheus_client": {"metrics"}, "sqlite3": {"store"}, "urllib3": set()}
MAX_LINES = 400


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found.append((parts[0], path))  # forwarder/store/writer.py belongs to "store"
    return found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize(("module", "path"), _modules(), ids=lambda v: str(v))
def test_imports_follow_the_layers(module: str, path: Path) -> None:
    own = {name.split(".")[1] for name in _imports(path) if name.startswith("forwarder.")}
    assert "cli" not in own or module in {"__main__"}, f"{path.name} imports the CLI"
    if module in TOP:
        return
    assert module in ALLOWED, f"{module} is missing from the layer table"
    assert own <= ALLOWED[module] | {module}, f"{path} imports {sorted(own - ALLOWED[module] - {module})}"


@pytest.mark.parametrize(("module", "path"), _modules(), ids=lambda v: str(v))
def test_each_dependency_has_one_door(module: str, path: Path) -> None:
    third_party = {name.split(".")[0] for name in _imports(path)}
    for dependency, doors in DOORS.items():
        if dependency in third_party:
            assert module in doors, f"{path} imports {dependency}; only {sorted(doors)} may"


def test_ingest_and_delivery_meet_only_in_the_store() -> None:
    assert "delivery" not in ALLOWED["ingest"] and "ingest" not in ALLOWED["delivery"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_modules_stay_small_and_say_what_they_do(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"{path} has {len(lines)} lines; split it by concern"
    assert ast.get_docstring(ast.parse("\n".join(lines))), f"{path} has no module docstring"


def test_readme_settings_table_is_generated_from_the_settings() -> None:
    table = README.split("<!-- settings-table:start -->\n")[1].split("<!-- settings-table:end -->")[0]
    assert table.strip() == settings_markdown().strip()


def test_every_setting_and_error_code_is_documented() -> None:
    for setting in SETTINGS:
        assert f"`{setting.name}`" in README
        if setting.env:
            assert f"`{setting.env}`" in README
    for refusal in REFUSALS:
        assert f"`{refusal.code}`" in README, f"error code {refusal.code} is not in the README"


def test_no_pickle_and_tls_verification_never_off() -> None:
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"import pickle|serializer\s*=\s*pickle", text), path
        assert not re.search(r"verify\s*=\s*False|CERT_NONE|check_hostname\s*=\s*False", text), path
