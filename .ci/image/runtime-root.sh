#!/usr/bin/env bash
# mmdebstrap customize hook for the runtime base (.ci/image/bases.sh): $1 is the unpacked root.
# Turns a package extract into what gcr.io/distroless/python3-debian12:nonroot is.
set -euo pipefail
root=$1

# The CA bundle update-ca-certificates would write (extract runs no maintainer scripts).
mkdir -p "$root/etc/ssl/certs"
cat "$root"/usr/share/ca-certificates/mozilla/*.crt >"$root/etc/ssl/certs/ca-certificates.crt"

# distroless' interpreter path: a venv made by /usr/bin/python3 links back to it.
ln -sf python3.11 "$root/usr/bin/python3"

# Users as distroless has them; nonroot is the one images run as.
cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
GROUP
install -d -m 0700 -o 65532 -g 65532 "$root/home/nonroot"
install -d -m 0700 "$root/root"
install -d -m 1777 "$root/tmp"
ln -sf /usr/share/zoneinfo/Etc/UTC "$root/etc/localtime"

# No shell, no package manager, no interpreters but python, no archivers: nothing an intruder
# or a hostile manifest could drive. dpkg, debconf, perl and tar come in as dependencies.
rm -rf "$root"/bin/sh "$root"/bin/bash "$root"/bin/dash "$root"/usr/bin/sh "$root"/usr/bin/dash \
  "$root"/usr/bin/dpkg* "$root"/usr/bin/debconf* "$root"/usr/sbin/dpkg* "$root"/usr/share/debconf \
  "$root"/usr/bin/perl* "$root"/usr/lib/x86_64-linux-gnu/perl* "$root"/usr/share/perl* \
  "$root"/bin/tar "$root"/usr/bin/tar "$root"/usr/sbin/tarcat "$root"/usr/sbin/rmt-tar \
  "$root"/usr/bin/*awk "$root"/usr/bin/openssl "$root"/usr/sbin/update-ca-certificates \
  "$root"/usr/bin/update-alternatives "$root"/sbin/start-stop-daemon \
  "$root"/var/lib/dpkg "$root"/var/cache/apt "$root"/var/lib/apt "$root"/etc/apt \
  "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/info "$root"/usr/share/lintian
