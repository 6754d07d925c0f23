#!/usr/bin/env bash
# Everything image-shaped CI does: the two stand-in bases, lg-rotate's image for each provider
# extra, each checked as a cluster would run it (.ci/image/check.py), and the end-to-end suite's
# agent double; the archives land in .ci/image/out for the real node to import.
#
#   .ci/image/images.sh [EXTRAS ...]     default: vault all aws gcp (vault first: the e2e image)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=.ci/image/lib.sh
. "$here/lib.sh"
python=${PYTHON:-python3}
[ $# -gt 0 ] || set -- vault all aws gcp

bash "$here/bases.sh"
bash "$here/build.sh" agent
sizes=()
for extras in "$@"; do
  bash "$here/build.sh" "$extras"
  ref=$(cat "$here/out/lg-rotate-${extras//,/-}.ref")
  "$python" "$here/check.py" "$ref" --extras "$extras"
  sizes+=("$extras $(podman image inspect --format '{{.Size}}' "$ref" | awk '{printf "%.0f MB", $1 / 1e6}')")
done
echo "-- image sizes: $(IFS=,; echo "${sizes[*]}" | sed 's/,/, /g')"
