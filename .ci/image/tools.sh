#!/usr/bin/env bash
# Debian packages the image builds and the real node need (../shared/TESTING.md, "Images" and
# "A real node"), installed only when missing: CI starts on a clean machine. Needs root.
set -euo pipefail
need=()
for pair in buildah:buildah podman:podman mmdebstrap:mmdebstrap fuse-overlayfs:fuse-overlayfs \
  newuidmap:uidmap containerd:containerd runc:runc ip:iproute2 iptables:iptables xz:xz-utils \
  curl:curl openssl:openssl; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "as root: apt-get install ${need[*]}" >&2; exit 1; }
  echo "-- apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
