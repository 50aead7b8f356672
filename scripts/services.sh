#!/usr/bin/env bash
# Makes sure PostgreSQL (127.0.0.1:5432) and Mosquitto (127.0.0.1:1883) run, installing
# them from Debian packages where missing. Tests that need them fail loudly if they are
# still down; this script only warns, so that suites that need neither can run.
set -uo pipefail
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=
need() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq >/dev/null 2>&1; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null 2>&1 || echo "warning: could not install $*" >&2
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! port_open 5432; then
  if [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then need postgresql; fi
  if [ -n "$(ls /etc/postgresql 2>/dev/null)" ]; then
    as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start 2>/dev/null || true
  fi
  for _ in $(seq 1 20); do port_open 5432 && break; sleep 0.5; done
  port_open 5432 && echo "postgresql: started" || echo "warning: PostgreSQL is not listening on 127.0.0.1:5432" >&2
else
  echo "postgresql: running"
fi

if ! port_open 1883; then
  command -v mosquitto >/dev/null || need mosquitto
  if command -v mosquitto >/dev/null; then
    if [ -f /etc/mosquitto/mosquitto.conf ]; then as_root mosquitto -d -c /etc/mosquitto/mosquitto.conf; else as_root mosquitto -d; fi
  fi
  for _ in $(seq 1 20); do port_open 1883 && break; sleep 0.5; done
  port_open 1883 && echo "mosquitto: started" || echo "warning: Mosquitto is not listening on 127.0.0.1:1883" >&2
else
  echo "mosquitto: running"
fi
exit 0
