#!/bin/sh
# Send from the shell with the CLI. Anywhere the image runs, prefix the commands with
# `docker compose exec forwarder` (the image carries the CLI and sets FORWARDER_SOCKET).
set -eu
export FORWARDER_SOCKET="${FORWARDER_SOCKET:-/run/turret-forwarder/forwarder.sock}"

# One user update; prints {"ok": true, "id": "..."} once it is on disk. --key makes a retry safe.
turret-forwarder send --email alice@example.com --attr plan=pro --prop source=shell --key shell-alice

# Request lines from stdin, one reply line each; the exit status is 1 if any line was refused.
printf '%s\n' \
  '{"op":"set","email":"bob@example.com","attributes":{"plan":"free"}}' \
  '{"op":"post","path":"/latest/target/vip","body":{"attributes":[{"name":"plan","value":"pro"}]}}' \
  | turret-forwarder send
