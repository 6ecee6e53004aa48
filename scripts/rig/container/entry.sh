#!/bin/sh
# The main process of a rig host or plane container (tini, from `docker run --init`, is PID 1 above it): with
# AUBE_RIG_ENGINE=1 an inner Docker engine first, then the container's Aube services (services.py).
set -eu

if [ "${AUBE_RIG_ENGINE:-0}" = 1 ]; then
  # cgroup v1: Docker mounts the container's own cgroups read-only; the inner engine makes its containers' groups
  # below them, so they must be writable (the container's capabilities allow the remount).
  for mount_point in $(awk '$3 == "cgroup" {print $2}' /proc/self/mounts); do
    mount -o remount,rw,bind "$mount_point"
  done
  # A host killed and started again (a fault test's `docker kill`, then `up`) keeps its overlay filesystem, with the
  # killed engine's pid files: dockerd then took a stale containerd.pid for a live containerd (its pid is reused in
  # the new pid namespace), waited for its socket and never started. Nothing of a previous engine is running here.
  rm -rf /var/run/docker.pid /var/run/docker/containerd/containerd.pid /run/containerd/containerd.pid
  # /var/lib/docker is a volume (not the container's overlay filesystem): the inner engine runs overlay2 there.
  dockerd --log-level=warn >/var/log/dockerd.log 2>&1 &
  tries=0
  until docker info >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -ge 300 ]; then
      echo "the inner Docker engine did not start:" >&2
      tail -20 /var/log/dockerd.log >&2
      exit 1
    fi
    sleep 0.2
  done
  echo "[$(hostname)] inner Docker engine ready"
fi

exec python "$(dirname "$0")/services.py" /etc/aube-rig/services.json
