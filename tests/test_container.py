"""The Docker image, built and run for real: socket and backlog volumes, secret files, stop, recovery.

Proves what reading the Dockerfile cannot: the daemon runs as the image's fixed non-root user, an app
reaches it through the socket inside a named volume (from the host, and from another container as another
uid in the forwarder's group), the HEALTHCHECK command passes, ``docker stop`` ends it cleanly well before
Docker's SIGKILL, and a new container on the same backlog volume still holds every acked message.

Needs a Docker engine and the offline base image (``.ci/docker-setup.sh`` provides both). Without them the
tests are skipped with what to install, except under ``CI``, where they fail: CI must run them.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forwarder.client import Client
from tests.support import unavailable

pytestmark = pytest.mark.timeout(900)  # a cold build downloads the dependencies from PyPI

ROOT = Path(__file__).resolve().parent.parent
BASE = os.environ.get("TURRET_DOCKER_BASE", "local/python:bookworm")
SETUP_HINT = ("install Docker (Debian: apt-get install docker.io debootstrap), then run .ci/docker-setup.sh, "
              "which starts dockerd and builds the offline base image " + BASE)
IMAGE_UID = IMAGE_GID = 10001
APP_UID = 10002  # the sample app: another user, a member of the forwarder's group
SOCKET_DIR, DATA_DIR, SECRETS_DIR = "/run/turret-forwarder", "/var/lib/turret-forwarder", "/run/secrets"
STOP_LIMIT_SECONDS = 3.0
DOCKER_KILL_AFTER_SECONDS = 10  # docker stop's default; a daemon ignoring SIGTERM would take this long
API_KEY = "demo-key"
API_SECRET = "ZGVtby1zZWNyZXQtYnl0ZXM="  # base64 of b"demo-secret-bytes"; nothing is ever delivered here


def docker(*args: str, timeout: float = 120) -> str:
    """Run ``docker ARGS``; return its stdout, or fail the test with its stderr."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"docker {' '.join(args)} exited {result.returncode}: {result.stderr}"
    return result.stdout


def inspect(kind: str, name: str) -> Any:
    return json.loads(docker(kind, "inspect", name))[0]


def _unavailable(reason: str) -> None:
    unavailable(f"{reason}: {SETUP_HINT}")


@pytest.fixture(scope="module")
def engine() -> None:
    """A reachable Docker engine with the base image, or a skip (a fail under CI) saying what to install."""
    if shutil.which("docker") is None:
        _unavailable("no docker command")
    if os.geteuid() != 0:  # the socket is reached in the volume's mountpoint, under root's /var/lib/docker
        _unavailable("the test must run as root")
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        _unavailable(f"no Docker engine answers ({' '.join(info.stderr.split()[-12:])})")
    if subprocess.run(["docker", "image", "inspect", BASE], capture_output=True, timeout=60).returncode != 0:
        _unavailable(f"the base image {BASE} is missing")


@pytest.fixture(scope="module")
def image(engine: None) -> Iterator[str]:
    """The project's Dockerfile built on the offline base; removed afterwards with its builder stage."""
    tag = f"turret-forwarder-test:{uuid.uuid4().hex[:12]}"
    builder = f"{tag}-builder"  # tagged so that removing it leaves no dangling builder-stage image behind
    try:
        for target, name in (("builder", builder), (None, tag)):
            stage = ["--target", target] if target else []
            docker("build", "--quiet", "--build-arg", f"BASE={BASE}", *stage, "--tag", name, str(ROOT),
                   timeout=800)
        yield tag
    finally:
        subprocess.run(["docker", "image", "rm", "--force", tag, builder], capture_output=True, timeout=120)


class Containers:
    """The containers and volumes of one test, all removed at the end whatever happened."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.prefix = f"tf-test-{uuid.uuid4().hex[:8]}"
        self.volumes: list[str] = []

    def volume(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        docker("volume", "create", name)
        self.volumes.append(name)
        return name

    def run(self, *args: str) -> str:
        return docker("run", "--detach", "--label", self.prefix, *args).strip()

    def remove_all(self) -> None:
        """Remove by label, so that a container whose start failed (no id returned) goes too."""
        listed = docker("container", "ls", "--all", "--quiet", "--filter", f"label={self.prefix}").split()
        for command, names in ((["container", "rm", "--force", "--volumes"], listed),
                               (["volume", "rm", "--force"], self.volumes)):
            if names:
                subprocess.run(["docker", *command, *names], capture_output=True, timeout=120)


@pytest.fixture
def containers(image: str) -> Iterator[Containers]:
    made = Containers(image)
    yield made
    made.remove_all()


@pytest.fixture
def secret_files(tmp_path: Path) -> dict[str, Path]:
    """The credentials as files, readable by the container's user (bind mounts keep the host's mode)."""
    files = {}
    for name, value in (("turret_api_key", API_KEY), ("turret_api_secret", API_SECRET)):
        files[name] = tmp_path / name
        files[name].write_text(value + "\n")
        files[name].chmod(0o444)
    return files


def start_forwarder(containers: Containers, socket_volume: str, backlog_volume: str,
                    secret_files: dict[str, Path]) -> str:
    """A forwarder as compose runs it, but with no network: nothing is delivered, everything stays queued."""
    secrets = [arg for name, path in secret_files.items()
               for arg in ("--volume", f"{path}:{SECRETS_DIR}/{name}:ro")]
    container_id = containers.run(
        "--network", "none", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--volume", f"{socket_volume}:{SOCKET_DIR}", "--volume", f"{backlog_volume}:{DATA_DIR}", *secrets,
        "--env", f"TURRET_API_KEY_FILE={SECRETS_DIR}/turret_api_key",
        "--env", f"TURRET_API_SECRET_FILE={SECRETS_DIR}/turret_api_secret",
        containers.image)
    wait_until_ready(container_id)
    return container_id


def wait_until_ready(container_id: str) -> None:
    """Follow the container's log until the daemon says it is ready (it says so once the socket is bound)."""
    with subprocess.Popen(["docker", "logs", "--follow", container_id], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as follow:
        assert follow.stdout is not None
        seen = []
        for line in follow.stdout:
            seen.append(line)
            if '"msg": "Forwarder ready"' in line:
                follow.terminate()
                return
    pytest.fail("the forwarder exited before it was ready:\n" + "".join(seen))


def socket_on_host(socket_volume: str, image: str) -> Path:
    """Where the daemon's socket is seen from the host: inside the socket volume's mountpoint."""
    env = dict(item.split("=", 1) for item in inspect("image", image)["Config"]["Env"])
    relative = Path(env["FORWARDER_SOCKET"]).relative_to(SOCKET_DIR)
    return Path(inspect("volume", socket_volume)["Mountpoint"]) / relative


def exec_in(container_id: str, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "exec", container_id, *command], capture_output=True, text=True,
                          timeout=60)


def test_image_runs_as_a_fixed_non_root_user_with_volumes_and_no_compilers(image: str) -> None:
    config = inspect("image", image)["Config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_GID}"
    assert sorted(config["Volumes"]) == [SOCKET_DIR, DATA_DIR]
    assert sorted(config["ExposedPorts"]) == ["9464/tcp"]
    assert config["Entrypoint"] == ["turret-forwarder"]
    assert config["Cmd"] == ["serve"]
    assert config["Healthcheck"]["Test"] == ["CMD", "turret-forwarder", "health"]
    probe = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c",
         f"id -u; id -g; stat -c '%a %u %g' {SOCKET_DIR} {DATA_DIR}; "
         "for tool in gcc cc c++ make; do command -v $tool; done; true"],
        capture_output=True, text=True, timeout=120)
    assert probe.stdout.split("\n") == [str(IMAGE_UID), str(IMAGE_GID), f"2770 {IMAGE_UID} {IMAGE_GID}",
                                        f"750 {IMAGE_UID} {IMAGE_GID}", ""], probe.stderr


def test_socket_volume_health_clean_stop_and_backlog_recovery(
        containers: Containers, secret_files: dict[str, Path]) -> None:
    socket_volume, backlog_volume = containers.volume("socket"), containers.volume("backlog")
    first = start_forwarder(containers, socket_volume, backlog_volume, secret_files)

    # The host reaches the daemon through the socket volume, as an app container does.
    socket_path = socket_on_host(socket_volume, containers.image)
    mode = socket_path.stat()
    assert (stat.S_ISSOCK(mode.st_mode), stat.S_IMODE(mode.st_mode), mode.st_uid, mode.st_gid) == (
        True, 0o660, IMAGE_UID, IMAGE_GID)
    with Client(str(socket_path)) as client:
        acked = [client.set(f"user{n}@example.com", {"plan": "pro"}, key=f"container-{n}") for n in range(5)]
        acked.append(client.post("/latest/target/vip", {"attributes": [{"name": "plan", "value": "pro"}]}))
    assert acked == ["1", "2", "3", "4", "5", "6"]

    # The sample app: its own container and uid, in the forwarder's group, the socket volume read-only.
    app = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--user", f"{APP_UID}:{APP_UID}",
         "--group-add", str(IMAGE_GID), "--volume", f"{socket_volume}:{SOCKET_DIR}:ro",
         "--volume", f"{ROOT / 'examples' / 'app' / 'app.py'}:/app/app.py:ro",
         "--env", f"FORWARDER_SOCKET={SOCKET_DIR}/{socket_path.name}",
         BASE, "python3", "/app/app.py", "--count", "2", "--every", "0"],
        capture_output=True, text=True, timeout=120)
    assert (app.returncode, [json.loads(line) for line in app.stdout.splitlines()]) == (
        0, [{"ok": True, "id": "7"}, {"ok": True, "id": "8"}]), app.stderr

    # The image's own HEALTHCHECK command, run as Docker runs it: inside the container, its user and env.
    healthcheck = inspect("image", containers.image)["Config"]["Healthcheck"]["Test"]
    health = exec_in(first, *healthcheck[1:])
    assert (health.returncode, health.stdout) == (0, "ok\n"), health.stderr
    endpoints = exec_in(first, "python3", "-c", "import urllib.request as u; print(*(u.urlopen("
                        "f'http://127.0.0.1:9464/{p}', timeout=5).status for p in ('healthz', 'readyz')))")
    assert endpoints.stdout == "200 200\n", endpoints.stderr

    started = time.monotonic()
    docker("stop", "--time", str(DOCKER_KILL_AFTER_SECONDS), first)
    elapsed = time.monotonic() - started
    state = inspect("container", first)["State"]
    assert (state["Running"], state["ExitCode"], state["OOMKilled"]) == (False, 0, False)
    assert elapsed < STOP_LIMIT_SECONDS, f"docker stop took {elapsed:.1f} s: SIGTERM was not handled promptly"

    # A new container on the same volumes recovers the whole backlog.
    second = start_forwarder(containers, socket_volume, backlog_volume, secret_files)
    status = exec_in(second, "turret-forwarder", "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert (report["backlog"], report["dead_letters"], report["daemon"], report["credentials"]) == (
        8, 0, "running", "present")
    listing = exec_in(second, "turret-forwarder", "queue", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    assert [str(row["id"]) for row in json.loads(listing.stdout)] == [*acked, "7", "8"]  # the very messages
