#!/usr/bin/env bash
# Build images from this checkout with buildah (no Docker engine needed), on the local stand-in
# bases of .ci/image/bases.sh (run that first), and save each as an OCI archive for a node to
# import (envtest's `node up --image`).
#
#   .ci/image/build.sh [EXTRAS]   lg-rotate's Dockerfile; EXTRAS: all (default), vault, aws, gcp
#                                 or a list ("aws,gcp") -> localhost/lg-rotate:<version>-<extras>
#   .ci/image/build.sh agent      the end-to-end suite's agent double (tests/e2e/agent/Dockerfile)
#                                 -> localhost/linuxguard-agent-double:e2e
#
# Each writes .ci/image/out/<name>.tar and <name>.ref (the image's name, for the tests).
# `docker build --build-arg BUILD_BASE=... --build-arg RUNTIME_BASE=... .` builds the same.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=.ci/image/lib.sh
. "$here/lib.sh"
cd "$here/../.."

what=${1:-all}
version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain -- rotator providers pyproject.toml README.md Dockerfile 2>/dev/null)" ] \
  || revision="$revision-dirty"
if [ "$what" = agent ]; then
  name=agent tag=localhost/linuxguard-agent-double:e2e
  args=(--file tests/e2e/agent/Dockerfile)
else
  name="lg-rotate-${what//,/-}" tag="$IMAGE_REPO:$version-${what//,/-}"
  args=(--file Dockerfile --build-arg "EXTRAS=$what" --build-arg "VERSION=$version"
    --build-arg "REVISION=$revision" --build-arg "BUILD_BASE=$BUILD_BASE")
fi
out="$here/out"
mkdir -p "$out"

start=$(date +%s)
# --network host: pip in the build stage reaches the package index the way this machine does.
buildah build --quiet --pull=never --isolation oci --runtime runc --network host --layers \
  --build-arg "RUNTIME_BASE=$RUNTIME_BASE" --tag "$tag" "${args[@]}" . >/dev/null
rm -f "$out/$name.tar"
podman save --quiet --format oci-archive -o "$out/$name.tar" "$tag"
echo "$tag" >"$out/$name.ref"
size=$(podman image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1 / 1e6}')
echo "built $tag in $(($(date +%s) - start)) s: $size; $out/$name.tar"
