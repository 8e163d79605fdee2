"""Observability of the real daemon: promtool on its scrape and on the alert rules, a real Prometheus
evaluating every dashboard panel and every alert through an outage, scrapes beside a locked database, and
a series count that does not grow with 50,000 messages.

Needs Debian's ``prometheus`` package (``promtool`` and the server). Without it these tests skip, except
under CI (``CI`` set), where a missing tool is a failure: ``.ci/run`` installs it.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import re
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forwarder.client import Client
from forwarder.fakeapi import FakeTurretIO, Respond
from forwarder.store.schema import DB_FILE
from tests.support import unavailable
from tests.support.daemon import DaemonProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "turret-forwarder.json"
RULES = GRAFANA / "alerts" / "turret-forwarder.rules.yml"
JOB = "turret-forwarder"  # the job name the alert rules and grafana/prometheus.yml use
OUTAGE_SECONDS = 3.0
# Grafana expands $__rate_interval itself; a window longer than the whole run makes every panel see all of
# the test's traffic. Template variables take their "All" value, which is how the dashboard opens.
RUN_WINDOW = "1m"
SERIES = tuple[str, tuple[tuple[str, str], ...]]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not found: install Debian's prometheus package (apt-get install prometheus)")
    assert path is not None
    return path


# -- traffic ---------------------------------------------------------------------------------------------

INVALID_AND_PING = [b'{"op":"nope"}\n', b'{"op":"ping"}\n']


def _set_line(email: str, n: int) -> bytes:
    return json.dumps({"op": "set", "email": email, "attributes": {"n": str(n)}}).encode() + b"\n"


def _send(socket_path: Path, lines: list[bytes], connections: int = 1) -> list[dict[str, Any]]:
    """Pipeline ``lines`` over several connections (one writer thread each); replies in ``lines`` order."""
    shares = [lines[i::connections] for i in range(connections)]
    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        answered = list(pool.map(lambda share: _pipeline(socket_path, share), shares))
    replies: list[dict[str, Any]] = [{}] * len(lines)
    for i, share in enumerate(answered):
        replies[i::connections] = share
    return replies


def _pipeline(socket_path: Path, lines: list[bytes]) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(120)
        sock.connect(str(socket_path))
        writer = threading.Thread(target=sock.sendall, args=(b"".join(lines),))
        writer.start()  # writing while we read: the daemon stops reading a connection that does not read
        with sock.makefile("rb") as replies:
            answered = [json.loads(replies.readline()) for _ in lines]
        writer.join()
    return answered


# -- scrapes ---------------------------------------------------------------------------------------------

def _scrape(daemon: DaemonProcess) -> str:
    with urllib.request.urlopen(daemon.metrics_url + "/metrics", timeout=10) as response:
        assert response.status == 200
        text: str = response.read().decode()
    return text


def _samples(text: str) -> dict[SERIES, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict[SERIES, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _wait_for_scrape(daemon: DaemonProcess, predicate: Callable[[dict[SERIES, float]], bool],
                     timeout: float) -> dict[SERIES, float]:
    """Scrape until ``predicate`` holds: the daemon's own counters are the event."""
    deadline = time.monotonic() + timeout
    while not predicate(samples := _samples(_scrape(daemon))):
        if time.monotonic() > deadline:
            outbox = {k: v for k, v in samples.items() if k[0].startswith("forwarder_outbox")}
            raise TimeoutError(f"scrape never matched; last outbox figures {outbox}\n{daemon.log()[-3000:]}")
        time.sleep(0.2)
    return samples


# -- Prometheus ------------------------------------------------------------------------------------------

class _Prometheus:
    """A real Prometheus server on loopback scraping one target every second, with the shipped rules."""

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        workdir.mkdir()
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(RULES)],
                  "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}]}
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
                stdout=log, stderr=log)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass  # not listening yet
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prometheus did not become ready:\n{self.log_path.read_text()}")
            time.sleep(0.1)

    def _api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as error:
            with error:
                answer = json.load(error)
            raise AssertionError(f"Prometheus refused {params}: {answer.get('error')}") from None
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; only vectors are expected (every panel and rule yields one)."""
        data = self._api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Query until ``expr`` returns something: Prometheus's own view of the event."""
        deadline = time.monotonic() + timeout
        while not (result := self.query(expr)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Prometheus never returned data for {expr}")
            time.sleep(0.2)
        return result

    def alerting_rules(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Every alerting rule, once each has been evaluated at least once."""
        deadline = time.monotonic() + timeout
        while True:
            rules = [rule for group in self._api("rules")["groups"] for rule in group["rules"]]
            if rules and all(rule["health"] != "unknown" for rule in rules):
                return rules
            if time.monotonic() > deadline:
                raise TimeoutError(f"rules never evaluated: {rules}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[DaemonProcess], _Prometheus]]:
    servers: list[_Prometheus] = []

    def start(daemon: DaemonProcess) -> _Prometheus:
        server = _Prometheus(_tool("prometheus"), tmp_path / f"prometheus{len(servers)}",
                             f"127.0.0.1:{daemon.metrics_port}")
        servers.append(server)
        server.wait_ready()
        # Traffic starts after the first scrape, so every counter's increase shows in rate() and increase().
        server.wait_for(f'up{{job="{JOB}"}} == 1')
        return server

    yield start
    for server in servers:
        server.stop()


# -- expressions -----------------------------------------------------------------------------------------

def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expression) of every query target, template variables expanded as the board opens."""
    dashboard = _dashboard()
    values = {f"${v['name']}": v["allValue"] for v in dashboard["templating"]["list"]}
    values["$__rate_interval"] = RUN_WINDOW
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in sorted(values, key=len, reverse=True):
                expr = expr.replace(name, values[name])
            assert "$" not in expr, f"{panel['title']}: unexpanded variable in {expr}"
            found.append((panel["title"], expr))
    return found


_OPERATOR = re.compile(r"\s*(?:\b(?:and|or|unless)\b|==|!=|>=|<=|>|<)\s*(?:bool\b\s*)?")
_MODIFIERS = re.compile(r"^(?:(?:on|ignoring)\s*\([^)]*\)\s*)?(?:group_(?:left|right)\s*(?:\([^)]*\))?\s*)?")


def _operands(expr: str) -> list[str]:
    """The non-literal operands of the comparisons and set operators at the top level of ``expr``.

    An alert is ``measure <cmp> threshold``, possibly combined with ``and``/``unless``: when all is well
    the whole expression is rightly empty, but each measure must still return data, or the alert could
    never fire. Splitting only at depth 0, outside strings, leaves label matchers and arguments whole.
    """
    parts, depth, start, i, quote = [], 0, 0, 0, ""
    while i < len(expr):
        char = expr[i]
        if quote:
            i += 2 if char == "\\" else 1
            quote = "" if char == quote else quote
            continue
        if char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and (match := _OPERATOR.match(expr, i)) and match.group().strip():
            parts.append(expr[start:i])
            start = i = match.end()
            continue
        i += 1
    parts.append(expr[start:])
    operands = [_MODIFIERS.sub("", part.strip()) for part in parts]
    return [operand for operand in operands if not _is_number(operand)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset", "inf", "nan"}


def _metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords or label names."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)  # label matchers and range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][\w:]*", text):
        if match.group().lower() not in _KEYWORDS and not text[match.end():].lstrip().startswith("("):
            names.add(match.group())
    return names


def test_operand_and_name_extraction_follow_promql_structure() -> None:
    expr = ('sum by (instance, job) (forwarder_outbox_messages) > 0 and on (instance, job) '
            'sum by (instance, job) (increase(forwarder_delivery_delivered_messages_total[10m])) == 0 '
            'unless on (instance, job) max by (instance, job) (forwarder_delivery_state{state=~"a|b",x!="<"})'
            ' == 1')
    assert _operands(expr) == [
        "sum by (instance, job) (forwarder_outbox_messages)",
        "sum by (instance, job) (increase(forwarder_delivery_delivered_messages_total[10m]))",
        'max by (instance, job) (forwarder_delivery_state{state=~"a|b",x!="<"})']
    assert _metric_names(expr) == {"forwarder_outbox_messages", "forwarder_delivery_delivered_messages_total",
                                   "forwarder_delivery_state"}
    assert _metric_names("histogram_quantile(0.99, sum by (le) (rate(a_bucket[1m]))) * 1e3 + time()") == {
        "a_bucket"}


def _drained(delivered: int) -> str:
    """True in Prometheus once ``delivered`` messages went out and the outbox is empty."""
    return f"forwarder_delivery_delivered_messages_total == {delivered} and forwarder_outbox_messages == 0"


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


# -- tests -----------------------------------------------------------------------------------------------

def test_promtool_accepts_the_alert_rules_and_the_example_config() -> None:
    promtool = _tool("promtool")
    for args in (["check", "rules", str(RULES)], ["check", "config", str(GRAFANA / "prometheus.yml")]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_the_dashboard_and_its_datasource() -> None:
    datasources = (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    providers = (GRAFANA / "provisioning" / "dashboards" / "turret-forwarder.yml").read_text()
    assert re.findall(r"^\s+url: (\S+)$", datasources, re.M) == ["http://prometheus:9090"]
    (uid,) = re.findall(r"^\s+uid: (\S+)$", datasources, re.M)
    assert re.findall(r"^\s+path: (\S+)$", providers, re.M) == ["/var/lib/grafana/dashboards"]
    dashboard = _dashboard()
    panels = dashboard["panels"]
    used = {target["datasource"]["uid"] for panel in panels for target in panel.get("targets", [])}
    used |= {panel["datasource"]["uid"] for panel in panels if "datasource" in panel}
    assert used == {uid}


def test_a_real_scrape_after_traffic_passes_promtool_check_metrics(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    promtool = _tool("promtool")
    daemon = make_daemon("--backoff-base", "100ms", "--backoff-cap", "500ms", api=fake_api).start()
    fake_api.script(Respond(400, b"no such user"), Respond(500), Respond(429))
    lines = [_set_line(f"user{n}@example.com", n) for n in range(20)] + INVALID_AND_PING
    assert [reply["ok"] for reply in _send(daemon.socket, lines)] == [True] * 20 + [False, True]
    _wait_for_scrape(daemon, lambda s: _value(s, "forwarder_delivery_delivered_messages_total") == 19, 30)
    result = subprocess.run([promtool, "check", "metrics"], input=_scrape(daemon), capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_prometheus_evaluates_every_panel_and_alert_and_sees_an_outage(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess],
        start_prometheus: Callable[[DaemonProcess], _Prometheus]) -> None:
    daemon = make_daemon("--backoff-base", "100ms", "--backoff-cap", "500ms", api=fake_api).start()
    prometheus = start_prometheus(daemon)

    # Assorted answers first: a dead letter, a 5xx and a rate limit; one invalid request; one ping.
    fake_api.script(Respond(400, b"no such user"), Respond(500), Respond(429), Respond(503))
    lines = [_set_line(f"before{n}@example.com", n) for n in range(40)] + INVALID_AND_PING
    assert [reply["ok"] for reply in _send(daemon.socket, lines)] == [True] * 40 + [False, True]
    prometheus.wait_for(_drained(39))

    fake_api.set_mode("refuse")
    during = _send(daemon.socket, [_set_line(f"during{n}@example.com", n) for n in range(40)])
    assert all(reply["ok"] for reply in during)
    prometheus.wait_for('forwarder_delivery_state{state="backing_off"} == 1')
    prometheus.wait_for(f"forwarder_outbox_oldest_age_seconds >= {OUTAGE_SECONDS}")  # seen during the outage
    fake_api.set_mode("up")
    prometheus.wait_for(_drained(79))

    samples = _samples(_scrape(daemon))
    bounds = [dict(labels)["le"] for name, labels in samples
              if name == "forwarder_delivery_end_to_end_latency_seconds_bucket"]
    below = max((le for le in bounds if le != "+Inf" and float(le) <= OUTAGE_SECONDS), key=float)
    e2e = "forwarder_delivery_end_to_end_latency_seconds"
    (slower,) = prometheus.query(f'{e2e}_count - ignoring(le) {e2e}_bucket{{le="{below}"}}')
    assert float(slower["value"][1]) >= 40  # every message of the outage waited for it
    (p99,) = prometheus.query(f"histogram_quantile(0.99, sum by (le) (rate({e2e}_bucket[{RUN_WINDOW}])))")
    assert float(p99["value"][1]) >= float(below)
    (oldest,) = prometheus.query(f"max_over_time(forwarder_outbox_oldest_age_seconds[{RUN_WINDOW}])")
    assert float(oldest["value"][1]) >= OUTAGE_SECONDS

    empty = [(title, expr) for title, expr in _dashboard_exprs() if not _finite(prometheus.query(expr))]
    assert empty == [], "dashboard panels without data"

    rules = prometheus.alerting_rules()
    assert [(r["name"], r["health"], r["lastError"]) for r in rules if r["health"] != "ok"] == []
    assert [r["name"] for r in rules if not (r["annotations"].get("summary") and
                                             r["annotations"].get("description"))] == []
    firing, silent = set(), []
    for rule in rules:
        if prometheus.query(rule["query"]):  # parses and evaluates; empty is right while all is well
            firing.add(rule["name"])
        silent += [(rule["name"], operand) for operand in _operands(rule["query"])
                   if not prometheus.query(operand)]
    assert silent == [], "alert measures without data: these alerts could never fire"
    assert firing == {"TurretForwarderDeadLettersGrowing", "TurretForwarderRejectingInvalidMessages"}

    exposed = {name for name, _ in samples}
    used = set().union(*(_metric_names(expr) for _, expr in _dashboard_exprs()),
                       *(_metric_names(rule["query"]) for rule in rules))
    assert used - exposed == {"up"}  # up is the only series Prometheus writes itself


def _script_assorted(fake_api: FakeTurretIO, count: int) -> int:
    """Script ``count`` answers, one in 50 an error (400, 429, 500, 503 in turn); returns how many 400s.

    Each 400 dead-letters one message; the others only cost retries, which take later answers, so the whole
    script is used up before the batch is done.
    """
    retry = [Respond(429), Respond(500), Respond(503, headers={"Retry-After": "0"})]
    answers = [Respond(400, f'{{"error": "list {i} does not exist"}}'.encode()) if i % 200 == 0 else
               retry[i // 50 % 4 - 1] if i % 50 == 0 else Respond(200, b'{"status": "ok"}')
               for i in range(count)]
    fake_api.script(*answers)
    return sum(answer.status == 400 for answer in answers)


def _batch(daemon: DaemonProcess, fake_api: FakeTurretIO, first: int, count: int) -> tuple[int, int]:
    """Send ``count`` distinct requests (one in 100 invalid) with assorted answers; returns (stored, dead)."""
    stored = count - count // 100
    dead = _script_assorted(fake_api, stored)
    lines = [_set_line(f"user{n}@example.com", n) if n % 100 else
             json.dumps({"op": "set", "email": f"not an address {n}"}).encode() + b"\n"
             for n in range(first, first + count)]
    assert sum(reply["ok"] for reply in _send(daemon.socket, lines, connections=4)) == stored
    return stored, dead


def test_series_count_does_not_grow_with_50000_messages(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon("--concurrency", "64", "--backoff-base", "10ms", "--backoff-cap", "50ms",
                         api=fake_api).start()
    stored = dead = 0
    series: list[set[SERIES]] = []
    for first, count in ((0, 5_000), (5_000, 45_000)):
        batch_stored, batch_dead = _batch(daemon, fake_api, first, count)
        stored, dead = stored + batch_stored, dead + batch_dead
        done = _wait_for_scrape(daemon, lambda s: (
            _value(s, "forwarder_delivery_delivered_messages_total") == stored - dead  # noqa: B023
            and _value(s, "forwarder_outbox_dead_letters") == dead  # noqa: B023
            and _value(s, "forwarder_outbox_messages") == 0), timeout=240)
        series.append(set(done))
        fake_api.clear()
    assert _value(done, "forwarder_ingest_refused_messages_total", reason="invalid") == 500
    assert _value(done, "forwarder_delivery_attempts_total", result="rate_limited") > 0
    assert series[1] == series[0]


def _probe(daemon: DaemonProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(daemon.metrics_url + path, timeout=10) as response:
            return response.status, json.loads(response.read())["detail"]
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["detail"]


def _wait_for_probe(daemon: DaemonProcess, path: str, status: int, timeout: float = 30.0) -> str:
    """Poll a probe until it answers ``status`` (the daemon's own view is the event); its detail."""
    deadline = time.monotonic() + timeout
    while (answer := _probe(daemon, path))[0] != status:
        assert time.monotonic() < deadline, f"{path} still answers {answer}"
        time.sleep(0.05)
    return answer[1]


def test_readyz_fails_while_messages_wait_on_a_reachable_api_that_delivers_nothing(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    """Healthy but not forwarding must not look green: the API takes the request and answers 200 late."""
    daemon = make_daemon("--stall-after", "1s", api=fake_api).start()
    assert _probe(daemon, "/readyz") == (200, "ready (running)")
    fake_api.script(Respond(200, delay=4.0))  # in flight, the endpoint fine: the state stays running
    with Client(str(daemon.socket)) as client:
        client.set("slow@example.com", {"plan": "pro"})
    detail = _wait_for_probe(daemon, "/readyz", 503)
    assert re.fullmatch(r"1 message\(s\) wait, the API is reachable, and nothing was delivered for \d+ s", detail)
    assert _probe(daemon, "/healthz") == (200, "alive")  # alive all along: only readiness says "stuck"
    fake_api.wait_for_count(1, timeout=30)
    assert _wait_for_probe(daemon, "/readyz", 200) == "ready (running)"
    assert daemon.status()["backlog"] == 0


def test_scrapes_probes_and_the_socket_answer_while_the_writer_waits_on_another_process_s_lock(
        daemon: DaemonProcess, client: Client) -> None:
    """Another process holds SQLite's write lock, so the writer cannot commit: everything else answers.

    The writer commits on the event loop that serves the socket, so it must wait for the lock without
    blocking that loop (a status request on another connection is answered meanwhile).
    """
    for n in range(3):
        client.set(f"user{n}@example.com", {"n": str(n)})
    lock = sqlite3.connect(daemon.data_dir / DB_FILE, isolation_level=None, timeout=30)
    acked: list[str] = []
    blocked = threading.Thread(target=lambda: acked.append(client.set("late@example.com", {"n": "3"})))
    try:
        lock.execute("BEGIN EXCLUSIVE")
        blocked.start()
        samples = _wait_for_scrape(  # each scrape answers within urlopen's timeout, or the test fails
            daemon, lambda s: _value(s, "forwarder_ingest_received_messages_total", op="set") == 4.0, 30)
        assert acked == []  # its commit waits on the lock, so the writer is blocked during these scrapes
        with Client(str(daemon.socket), timeout=10.0) as other:
            assert other.request({"op": "status"})["backlog"] == 3
        assert _probe(daemon, "/healthz") == (200, "alive")
        assert _probe(daemon, "/readyz")[0] == 200
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    blocked.join(30)
    assert acked == ["4"]
    assert _value(samples, "forwarder_outbox_messages") == 3.0
    assert _value(samples, "forwarder_outbox_oldest_age_seconds") > 0.0
    assert _value(samples, "forwarder_metrics_scrape_errors_total") == 0.0
