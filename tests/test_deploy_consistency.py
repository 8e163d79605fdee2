"""The deployment files agree with the code: env names, values, ports, paths, uid/gid and commands.

docker-compose.yml, deploy/kubernetes/ and the Dockerfile are documentation that users copy; this test
makes them fail the build when they drift from ``forwarder.config.SETTINGS``, from the CLI's subcommands,
from the paths where the health endpoints answer, or from each other (the app and the forwarder must see
the same socket; Prometheus must scrape the port the forwarder listens on).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from forwarder import cli
from forwarder.config import CONFIG_ENV, SETTINGS
from tests.support.daemon import DaemonProcess

ROOT = Path(__file__).resolve().parent.parent
SETTING_BY_ENV = {s.env: s for s in SETTINGS if s.env}
CREDENTIAL_VALUES = ("TURRET_API_KEY", "TURRET_API_SECRET")  # files only in deployment examples


def load_yaml(path: str | Path) -> list[Any]:
    """Every document of a YAML file; ``path`` is relative to the repository (or absolute)."""
    with (ROOT / path).open(encoding="utf-8") as file:
        return list(yaml.safe_load_all(file))


def dockerfile_final_stage() -> dict[str, list[str]]:
    """The final stage's instructions, continuation lines joined: {"ENV": [args, ...], "USER": [...], ...}."""
    logical, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\")
        if not line.rstrip().endswith("\\"):
            logical.append(pending.strip())
            pending = ""
    stage: dict[str, list[str]] = {}
    for instruction in logical:
        keyword, _, arguments = instruction.partition(" ")
        if keyword.upper() == "FROM":
            stage = {}
        stage.setdefault(keyword.upper(), []).append(arguments.strip())
    return stage


DOCKERFILE = dockerfile_final_stage()
IMAGE_ENV = dict(pair.split("=", 1) for line in DOCKERFILE["ENV"] for pair in shlex.split(line))
IMAGE_UID, IMAGE_GID = (int(part) for part in DOCKERFILE["USER"][0].split(":"))
COMPOSE = load_yaml("docker-compose.yml")[0]
K8S = {doc["kind"]: doc for name in ("secret.example.yaml", "service.yaml", "statefulset.yaml")
       for doc in load_yaml(f"deploy/kubernetes/{name}")}
POD = K8S["StatefulSet"]["spec"]["template"]["spec"]
K8S_FORWARDER = next(c for c in POD["initContainers"] + POD["containers"] if c["name"] == "turret-forwarder")
K8S_APP = next(c for c in POD["containers"] if c["name"] == "app")


def k8s_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def k8s_mounts(container: dict[str, Any]) -> dict[str, str]:
    """Volume name -> mount path in ``container``."""
    return {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}


def compose_mounts(service: str) -> dict[str, str]:
    """Source (named volume or host path) -> target in ``service``, the ``:ro`` suffix dropped."""
    return dict(entry.split(":")[:2] for entry in COMPOSE["services"][service]["volumes"])


def mounted_at(service: str, target: str) -> Path:
    """The repository path that compose bind-mounts at ``target`` in ``service``."""
    return ROOT / next(source for source, at in compose_mounts(service).items() if at == target)


PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"  # the prom/prometheus image's default --config.file
PROMETHEUS = load_yaml(mounted_at("prometheus", PROMETHEUS_CONFIG))[0]


FORWARDER_ENVIRONMENTS = {
    "Dockerfile": IMAGE_ENV,
    "docker-compose.yml": COMPOSE["services"]["forwarder"]["environment"],
    "deploy/kubernetes": k8s_env(K8S_FORWARDER),
}
EFFECTIVE_ENV = {where: {**IMAGE_ENV, **env} for where, env in FORWARDER_ENVIRONMENTS.items()}


def metrics_port(env: dict[str, str]) -> int:
    host, _, port = env["FORWARDER_METRICS_ADDR"].rpartition(":")
    assert host == "0.0.0.0", "a container's metrics must listen beyond its own loopback to be scraped"
    return int(port)


def test_the_files_parse_into_the_expected_objects() -> None:
    assert sorted(COMPOSE["services"]) == ["app", "forwarder", "grafana", "prometheus"]
    assert sorted(K8S) == ["Secret", "Service", "StatefulSet"]
    assert load_yaml("deploy/kubernetes/kustomization.yaml")[0]["resources"] == [
        "secret.example.yaml", "service.yaml", "statefulset.yaml"]


@pytest.mark.parametrize("where", FORWARDER_ENVIRONMENTS)
def test_every_forwarder_variable_is_a_setting_with_a_valid_value(where: str) -> None:
    env = {name: value for name, value in FORWARDER_ENVIRONMENTS[where].items()
           if name.startswith(("FORWARDER_", "TURRET_"))}
    assert sorted(env.keys() - SETTING_BY_ENV.keys() - {CONFIG_ENV}) == []
    for name, value in env.items():
        SETTING_BY_ENV[name].parse(value)  # raises ValueError on a value the daemon would refuse
    assert sorted(env.keys() & set(CREDENTIAL_VALUES)) == [], "credentials go in files, not in variables"


def credential_files(where: str) -> list[PurePosixPath]:
    env = EFFECTIVE_ENV[where]
    return [PurePosixPath(env["TURRET_API_KEY_FILE"]), PurePosixPath(env["TURRET_API_SECRET_FILE"])]


def test_compose_gives_the_credentials_as_secrets_mounted_at_run_secrets() -> None:
    paths = credential_files("docker-compose.yml")
    service_secrets = COMPOSE["services"]["forwarder"]["secrets"]
    assert [str(path.parent) for path in paths] == ["/run/secrets", "/run/secrets"]
    assert sorted(path.name for path in paths) == sorted(service_secrets) == sorted(COMPOSE["secrets"])


def test_k8s_gives_the_credentials_as_the_files_of_a_secret_volume() -> None:
    paths = credential_files("deploy/kubernetes")
    volume = next(v for v in POD["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == K8S["Secret"]["metadata"]["name"]
    assert [str(path.parent) for path in paths] == [k8s_mounts(K8S_FORWARDER)[volume["name"]]] * 2
    assert sorted(path.name for path in paths) == sorted(K8S["Secret"]["stringData"])


def test_the_metrics_port_agrees_everywhere() -> None:
    port = metrics_port(IMAGE_ENV)
    service_port = K8S["Service"]["spec"]["ports"][0]
    annotations = K8S["StatefulSet"]["spec"]["template"]["metadata"]["annotations"]
    assert {
        "EXPOSE": DOCKERFILE["EXPOSE"],
        "compose": metrics_port(EFFECTIVE_ENV["docker-compose.yml"]),
        "prometheus.yml": PROMETHEUS["scrape_configs"][0]["static_configs"][0]["targets"],
        "k8s env": metrics_port(EFFECTIVE_ENV["deploy/kubernetes"]),
        "k8s containerPort": K8S_FORWARDER["ports"],
        "k8s Service": (service_port["port"], service_port["targetPort"]),
        "k8s annotation": annotations["prometheus.io/port"],
    } == {
        "EXPOSE": [str(port)],
        "compose": port,
        "prometheus.yml": [f"forwarder:{port}"],
        "k8s env": port,
        "k8s containerPort": [{"name": "metrics", "containerPort": port}],
        "k8s Service": (port, "metrics"),
        "k8s annotation": str(port),
    }


def test_the_probes_use_the_metrics_port_and_answer_on_a_real_daemon(daemon: DaemonProcess) -> None:
    kinds = ("startupProbe", "livenessProbe", "readinessProbe")
    probes = {kind: K8S_FORWARDER[kind]["httpGet"] for kind in kinds}
    assert {kind: (probe["port"], probe["path"]) for kind, probe in probes.items()} == {
        "startupProbe": ("metrics", "/healthz"), "livenessProbe": ("metrics", "/healthz"),
        "readinessProbe": ("metrics", "/readyz")}
    for probe in probes.values():
        with urllib.request.urlopen(daemon.metrics_url + probe["path"], timeout=5) as response:
            assert response.status == 200


def test_compose_app_and_forwarder_share_the_socket_on_a_named_volume() -> None:
    forwarder, app = compose_mounts("forwarder"), compose_mounts("app")
    socket = PurePosixPath(EFFECTIVE_ENV["docker-compose.yml"]["FORWARDER_SOCKET"])
    volume = next(source for source, target in forwarder.items() if target == str(socket.parent))
    assert volume in COMPOSE["volumes"], "a named volume: host bind mounts of sockets fail on Docker Desktop"
    app_socket = PurePosixPath(COMPOSE["services"]["app"]["environment"]["FORWARDER_SOCKET"])
    assert (app[volume], app_socket.name) == (str(app_socket.parent), socket.name)
    assert str(socket.parent) in json.loads(DOCKERFILE["VOLUME"][0])


def test_k8s_app_and_forwarder_share_the_socket_on_an_empty_dir() -> None:
    socket = PurePosixPath(EFFECTIVE_ENV["deploy/kubernetes"]["FORWARDER_SOCKET"])
    volume = next(name for name, path in k8s_mounts(K8S_FORWARDER).items() if path == str(socket.parent))
    assert "emptyDir" in next(v for v in POD["volumes"] if v["name"] == volume)
    app_socket = PurePosixPath(k8s_env(K8S_APP)["FORWARDER_SOCKET"])
    assert (k8s_mounts(K8S_APP)[volume], app_socket.name) == (str(app_socket.parent), socket.name)


def test_the_backlog_lives_on_a_persistent_volume() -> None:
    compose_dir = EFFECTIVE_ENV["docker-compose.yml"]["FORWARDER_DATA_DIR"]
    compose_volume = next(source for source, target in compose_mounts("forwarder").items()
                          if target == compose_dir)
    assert compose_volume in COMPOSE["volumes"]
    k8s_dir = EFFECTIVE_ENV["deploy/kubernetes"]["FORWARDER_DATA_DIR"]
    k8s_volume = next(name for name, path in k8s_mounts(K8S_FORWARDER).items() if path == k8s_dir)
    claims = [claim["metadata"]["name"] for claim in K8S["StatefulSet"]["spec"]["volumeClaimTemplates"]]
    assert claims == [k8s_volume]
    assert IMAGE_ENV["FORWARDER_DATA_DIR"] in json.loads(DOCKERFILE["VOLUME"][0])


def test_the_app_joins_the_forwarders_group_and_the_forwarder_runs_as_the_image_user() -> None:
    app = COMPOSE["services"]["app"]
    assert app["group_add"] == [str(IMAGE_GID)]
    assert int(app["user"].split(":")[0]) != IMAGE_UID  # another user: the group alone grants the socket
    security = K8S_FORWARDER["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (IMAGE_UID, IMAGE_GID)
    assert K8S_APP["securityContext"]["runAsUser"] != IMAGE_UID
    assert (POD["securityContext"]["fsGroup"], POD["securityContext"]["supplementalGroups"]) == (
        IMAGE_GID, [IMAGE_GID])


def test_the_commands_are_real() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert json.loads(DOCKERFILE["ENTRYPOINT"][0]) == ["turret-forwarder"]
    assert "turret-forwarder" in scripts
    healthcheck = DOCKERFILE["HEALTHCHECK"][0]
    assert json.loads(healthcheck[healthcheck.index("CMD") + len("CMD"):]) == ["turret-forwarder", "health"]
    commands = [json.loads(DOCKERFILE["CMD"][0]), COMPOSE["services"]["forwarder"]["command"],
                K8S_FORWARDER["args"]]
    assert commands == [["serve"]] * 3
    for subcommand in ("serve", "health"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([subcommand, "--help"])
        assert exit_info.value.code == 0, f"turret-forwarder has no {subcommand} subcommand"


def test_every_file_compose_mounts_from_the_repository_exists() -> None:
    sources = [source for service in COMPOSE["services"].values() for source in
               (entry.split(":")[0] for entry in service.get("volumes", [])) if source.startswith("./")]
    assert sorted(source for source in sources if not (ROOT / source).exists()) == []


def test_prometheus_loads_the_shipped_rules_and_grafana_finds_prometheus_and_the_dashboards() -> None:
    config_dir = PurePosixPath(PROMETHEUS_CONFIG).parent  # rule_files are relative to the config file
    rules = [PurePosixPath(config_dir, pattern) for pattern in PROMETHEUS["rule_files"]]
    rule_files = [found for rule in rules
                  for found in mounted_at("prometheus", str(rule.parent)).glob(rule.name)]
    assert rule_files, f"no file in the repository matches the rule_files {PROMETHEUS['rule_files']}"
    provisioning = mounted_at("grafana", "/etc/grafana/provisioning")
    datasources = [source for path in sorted(provisioning.glob("datasources/*.yml"))
                   for source in load_yaml(path)[0]["datasources"]]
    assert [source["url"] for source in datasources] == ["http://prometheus:9090"]
    providers = [provider for path in sorted(provisioning.glob("dashboards/*.yml"))
                 for provider in load_yaml(path)[0]["providers"]]
    dashboards = [mounted_at("grafana", provider["options"]["path"]) for provider in providers]
    assert [bool(sorted(path.glob("*.json"))) for path in dashboards] == [True]


def test_every_variable_the_deployment_docs_and_examples_name_is_a_setting() -> None:
    files = [ROOT / "Dockerfile", ROOT / "docker-compose.yml", ROOT / "docs" / "deployment.md",
             ROOT / "docs" / "migration.md", *sorted((ROOT / "deploy").rglob("*.yaml")),
             *sorted(path for path in (ROOT / "examples").rglob("*") if path.is_file())]
    variable = re.compile(r"\b(?:FORWARDER|TURRET)_[A-Z_]+\b")
    unknown = sorted({(path.relative_to(ROOT).as_posix(), name) for path in files
                      for name in variable.findall(path.read_text(encoding="utf-8"))
                      if name not in SETTING_BY_ENV and name != CONFIG_ENV})
    assert unknown == []
