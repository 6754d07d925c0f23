# syntax=docker/dockerfile:1
#
# lg-rotate container image (docs/DEPLOYMENT.md, "The image").
#
#   docker build -t lg-rotate .                        # every provider (EXTRAS=all)
#   docker build --build-arg EXTRAS=vault -t lg-rotate:vault .
#
# The bases are the official images unless BUILD_BASE / RUNTIME_BASE name stand-ins: where no
# registry is reachable, .ci/image/bases.sh makes both from Debian packages and
# .ci/image/build.sh passes them in (docs/DEPLOYMENT.md, "Building the image").
#
# Two stages:
# - build: Debian 12 with Debian's own python3.11. It builds the project's wheel and installs
#   it, with the chosen provider extras, into a virtual environment at /opt/lg-rotate.
# - runtime: gcr.io/distroless/python3-debian12, which ships that same Debian 12 python3.11 at
#   /usr/bin/python3 and nothing else: no shell, no package manager, no compiler. The venv's
#   interpreter link (/opt/lg-rotate/bin/python -> /usr/bin/python3) therefore resolves to the
#   same interpreter build, and compiled wheels (grpcio, google-crc32c) match its ABI.
#   That is why the build stage is debian:12 and not python:3.11-slim (whose interpreter lives
#   in /usr/local and would not exist in the runtime stage).
#
# CI builds this file for real (.ci/image/build.sh, buildah) and checks the result as a cluster
# runs it (.ci/image/check.py): uid 65532, read-only root, no shell or package manager.

ARG BUILD_BASE=debian:12.11-slim
ARG RUNTIME_BASE=gcr.io/distroless/python3-debian12:nonroot

FROM ${BUILD_BASE} AS build

# Debian's interpreter: the runtime stage has exactly this one (see above).
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV VENV=/opt/lg-rotate \
    WHEELHOUSE=/tmp/wheelhouse \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rotator/ rotator/
COPY providers/ providers/

# Provider extras: all (default), or a comma list such as "vault" or "aws,gcp".
ARG EXTRAS=all

# Build the wheel, install it with its extras, prove it imports and runs, then remove pip and
# setuptools from the venv: the runtime image must hold no package manager. Debian 12's pip
# (23.0) backtracks for minutes through boto3/botocore releases: upgrade it first. pip's cache
# is a build cache mount, so rebuilding (another EXTRAS, a code change) downloads nothing again
# and the image holds no cache.
#
# kubernetes/aio goes, and the aiohttp stack only it imports: kubernetes 37 ships an asyncio
# copy of its whole client (68 MB, a third of the image) that lg-rotate never imports
# (rotator/kube/api.py uses the synchronous ApiClient). .ci/image/check.py proves them gone and
# lg-rotate working without them; the end-to-end suite runs the image on a real node.
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv "$VENV" \
    && "$VENV/bin/python" -m pip install --upgrade pip \
    && "$VENV/bin/python" -m pip wheel --no-deps --wheel-dir "$WHEELHOUSE" . \
    && set -- "$WHEELHOUSE"/linuxguard_rotator-*.whl \
    && "$VENV/bin/python" -m pip install "$1[$EXTRAS]" \
    && "$VENV/bin/python" -m pip check \
    && rm -rf "$VENV"/lib/python3*/site-packages/kubernetes/aio \
    && "$VENV/bin/python" -m pip uninstall --yes aiohttp aiohttp-retry aiosignal \
        aiohappyeyeballs frozenlist multidict propcache yarl \
    && "$VENV/bin/lg-rotate" --version \
    && "$VENV/bin/python" -m pip uninstall --yes pip setuptools \
    && rm -rf "$WHEELHOUSE"


FROM ${RUNTIME_BASE} AS runtime
ARG RUNTIME_BASE

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="lg-rotate" \
      org.opencontainers.image.description="Keeps LinuxGuard agents supplied with fresh, single-use enrolment tokens" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${RUNTIME_BASE}"

COPY --from=build /opt/lg-rotate /opt/lg-rotate

# Read-only root filesystem in Kubernetes: bytecode was compiled at install time.
ENV PATH=/opt/lg-rotate/bin:/usr/local/bin:/usr/bin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# distroless' "nonroot" user, numeric so that Kubernetes can verify runAsNonRoot.
USER 65532:65532

# Exec form: lg-rotate is PID 1, no shell in between (there is none in the image anyway).
ENTRYPOINT ["lg-rotate"]
CMD ["--help"]
