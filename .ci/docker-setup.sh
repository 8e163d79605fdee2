#!/usr/bin/env bash
# Get a Docker engine and the offline base image ready for tests/test_container.py.
#
#   bash .ci/docker-setup.sh        install docker.io and debootstrap if missing, start dockerd unless an
#                                   engine already answers, build local/python:bookworm if it is missing
#   bash .ci/docker-setup.sh stop   stop the dockerd that this script started, by the PID it recorded
#
# dockerd runs detached: it gets its own session and every stream goes to a log file, so it holds none of
# the caller's pipes and CI cannot hang waiting for it. An engine this script did not start is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE_DIR=${TURRET_CI_STATE_DIR:-/tmp/turret-forwarder-ci}
PIDFILE=$STATE_DIR/dockerd.pid
LOG=$STATE_DIR/dockerd.log
BASE_IMAGE=local/python:bookworm

ours() {  # the PID recorded by this script, if that process is still a dockerd (PIDs get reused)
  [ -f "$PIDFILE" ] && [ "$(cat "/proc/$(cat "$PIDFILE")/comm" 2>/dev/null)" = dockerd ]
}

stop_engine() {
  if ours; then
    pid=$(cat "$PIDFILE")
    kill -TERM "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
  fi
  rm -f "$PIDFILE"
}

has() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ]; }

if [ "${1:-}" = stop ]; then
  stop_engine
  exit 0
fi

missing=()
has dockerd || missing+=(docker.io)
has debootstrap || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "docker-setup: installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  mkdir -p "$STATE_DIR"
  setsid /usr/sbin/dockerd >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 60); do
    if docker info >/dev/null 2>&1 || ! ours; then break; fi
    sleep 1
  done
  if ! docker info >/dev/null 2>&1; then
    echo "docker-setup: dockerd did not come up; the end of $LOG:" >&2
    tail -n 20 "$LOG" >&2
    stop_engine
    exit 1
  fi
  echo "docker-setup: started dockerd (PID $(cat "$PIDFILE"), log $LOG)"
fi

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  # In CI a copy of shared/ lies beside the clone; on a developer's machine it is at /work/shared.
  script=
  for shared in ${TURRET_SHARED_DIR:+"$TURRET_SHARED_DIR"} ../shared /work/shared; do
    if [ -f "$shared/docker/make-offline-base.sh" ]; then script=$shared/docker/make-offline-base.sh; break; fi
  done
  if [ -z "$script" ]; then
    echo "docker-setup: no shared/docker/make-offline-base.sh beside the clone or in /work/shared" >&2
    exit 1
  fi
  echo "docker-setup: building $BASE_IMAGE with $script (about a minute)"
  bash "$script" "$BASE_IMAGE"
fi
