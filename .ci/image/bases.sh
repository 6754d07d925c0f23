#!/usr/bin/env bash
# Make the Dockerfile's two base images from Debian packages, for machines that reach a Debian
# mirror but no container registry (CI here). Upstream builds use the official images instead
# (debian:12 and gcr.io/distroless/python3-debian12); these stand in for them, by build argument:
#
#   build base    localhost/lg-rotate-base/build:bookworm    Debian 12 minbase + python3,
#                 python3-venv, ca-certificates, plus the CAs this machine's HTTPS proxy needs
#                 (pip in the build stage goes through it). Never a base of the runtime image.
#   runtime base  localhost/lg-rotate-base/runtime:bookworm  distroless-like: Debian 12's
#                 python3.11 (the interpreter of gcr.io/distroless/python3-debian12, at the same
#                 /usr/bin/python3), its libraries and the Mozilla CA bundle; no shell, no
#                 package manager, no coreutils; user nonroot 65532 as in distroless.
#
#   .ci/image/bases.sh [--mirror URL]      ~25 s; needs mmdebstrap and podman (root)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=.ci/image/lib.sh
. "$here/lib.sh"

mirror=http://deb.debian.org/debian
[ "${1:-}" = --mirror ] && mirror=$2
suite=bookworm
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "-- build base ($BUILD_BASE)"
# Extra CAs (a TLS-intercepting proxy's) go into the build base only, where pip needs them.
extra_cas=(/usr/local/share/ca-certificates/*.crt)
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
  --customize-hook='for ca in '"${extra_cas[*]}"'; do [ -f "$ca" ] && cp "$ca" "$1/usr/local/share/ca-certificates/"; done; chroot "$1" update-ca-certificates >/dev/null 2>&1' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
  "$suite" "$work/build.tar" "$mirror"
podman import --quiet \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["/bin/bash"]' \
  "$work/build.tar" "$BUILD_BASE" >/dev/null

echo "-- runtime base ($RUNTIME_BASE)"
# extract: unpack these packages and their dependencies, run no maintainer scripts (and no
# customize hooks: mmdebstrap skips them for this variant). runtime-root.sh then does what
# distroless' build does: CA bundle, python3 link, users, and no tools.
mmdebstrap --quiet --variant=extract \
  --include=python3.11-minimal,libpython3.11-stdlib,ca-certificates,tzdata \
  "$suite" "$work/runtime" "$mirror"
bash "$here/runtime-root.sh" "$work/runtime"
tar -C "$work/runtime" --numeric-owner -cf "$work/runtime.tar" .
podman import --quiet \
  --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'USER 65532:65532' \
  --change 'WORKDIR /home/nonroot' \
  --change 'ENTRYPOINT ["/usr/bin/python3"]' \
  "$work/runtime.tar" "$RUNTIME_BASE" >/dev/null

podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep lg-rotate-base
