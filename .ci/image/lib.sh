# Shared by the .ci/image scripts (sourced): image names and the container tools' settings.
# shellcheck shell=bash
CONTAINERS_CONF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/containers.conf"
export CONTAINERS_CONF
BUILD_BASE=${BUILD_BASE:-localhost/lg-rotate-base/build:bookworm}
RUNTIME_BASE=${RUNTIME_BASE:-localhost/lg-rotate-base/runtime:bookworm}
IMAGE_REPO=${IMAGE_REPO:-localhost/lg-rotate}
