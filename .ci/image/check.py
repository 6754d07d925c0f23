"""Check a built lg-rotate image the way a user's cluster runs it.

    python .ci/image/check.py IMAGE --extras EXTRAS [--json FILE]

What it proves, each a failure when not so:

- config: USER 65532:65532 (numeric, so ``runAsNonRoot`` can verify it), exec-form
  ``ENTRYPOINT ["lg-rotate"]``, the OCI revision label of this checkout;
- filesystem (``podman export``): no shell, no package manager (apt, dpkg, pip in the venv),
  no perl, no archiver; no CA of this machine's HTTPS proxy (that one belongs to the build base
  only); the provider SDKs of EXTRAS and no others (a vault image carries no gRPC);
- the installed wheel is the one just built from this checkout: every file of ``rotator/`` and
  ``providers/`` in git has the SHA-256 the installed distribution's RECORD lists, and the
  RECORD holds no file of the packages that is not in the checkout;
- runs: ``--version`` and ``providers`` with a read-only root, no writable tmpfs at all, every
  capability dropped, no network; ``demo`` likewise with an in-memory ``/tmp`` (the manifests
  mount one); the process runs as uid/gid 65532.

It prints one line per check and the image's size; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
VENV = "opt/lg-rotate"
SITE = f"{VENV}/lib/python3.11/site-packages"
# Paths (relative to the image root) that must not exist: shells, package managers, tools an
# intruder would use to install or unpack more.
FORBIDDEN = [
    *(
        f"{d}/{tool}"
        for d in ("bin", "usr/bin", "sbin", "usr/sbin")
        for tool in (
            "sh",
            "bash",
            "dash",
            "ash",
            "busybox",
            "apt",
            "apt-get",
            "dpkg",
            "perl",
            "tar",
            "awk",
            "mawk",
            "curl",
            "wget",
        )
    ),
    f"{VENV}/bin/pip",
    f"{VENV}/bin/pip3",
    f"{SITE}/pip",
    f"{SITE}/setuptools",
    # removed by the Dockerfile: kubernetes' asyncio client and what only it needs
    f"{SITE}/kubernetes/aio",
    f"{SITE}/aiohttp",
    f"{SITE}/yarl",
    f"{SITE}/multidict",
    "var/lib/dpkg",
]
# The import root of each extra's SDK: present exactly when the extra is installed.
SDKS = {
    "vault": [f"{SITE}/hvac"],
    "aws": [f"{SITE}/boto3", f"{SITE}/botocore"],
    "gcp": [f"{SITE}/google/cloud/secretmanager", f"{SITE}/grpc"],
}
PODMAN = shutil.which("podman") or "podman"
GIT = shutil.which("git") or "git"
RUN = [
    PODMAN,
    "run",
    "--rm",
    "--read-only",
    "--cap-drop",
    "ALL",
    "--network",
    "none",
    "--security-opt",
    "no-new-privileges",
]


class CheckFailedError(Exception):
    pass


def podman(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([PODMAN, *args], input=stdin, capture_output=True, check=False)


def run_image(image: str, *args: str, tmpfs: bool = False, entrypoint: str | None = None) -> str:
    command = [*RUN, "--read-only-tmpfs=false"]
    if tmpfs:
        command += ["--tmpfs", "/tmp:rw,size=16m,mode=1777"]  # noqa: S108 - the container's /tmp
    if entrypoint:
        command += ["--entrypoint", entrypoint]
    done = subprocess.run([*command, image, *args], capture_output=True, check=False)
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace")[-800:]
        raise CheckFailedError(f"{' '.join(args)} exited {done.returncode}: {stderr}")
    return done.stdout.decode()


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def image_files(image: str) -> tuple[set[str], dict[str, bytes]]:
    """Every path in the image, and the contents of the few files the checks read."""
    created = podman("create", image)
    if created.returncode != 0:
        raise CheckFailedError(f"podman create: {created.stderr.decode()}")
    container = created.stdout.decode().strip()
    wanted: dict[str, bytes] = {}
    paths: set[str] = set()
    try:
        with subprocess.Popen([PODMAN, "export", container], stdout=subprocess.PIPE) as export:
            assert export.stdout is not None
            with tarfile.open(fileobj=export.stdout, mode="r|") as archive:
                for member in archive:
                    name = member.name.lstrip("./").rstrip("/")
                    paths.add(name)
                    keep = (
                        name.endswith(".dist-info/RECORD") and "linuxguard_rotator" in name
                    ) or name in {"etc/ssl/certs/ca-certificates.crt", "etc/passwd"}
                    if keep and member.isfile():
                        handle = archive.extractfile(member)
                        assert handle is not None
                        wanted[name] = handle.read()
    finally:
        podman("rm", container)
    return paths, wanted


def check_config(image: str) -> dict[str, object]:
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    if config.get("User") != "65532:65532":
        raise CheckFailedError(f"USER is {config.get('User')!r}, not 65532:65532")
    if config.get("Entrypoint") != ["lg-rotate"]:
        raise CheckFailedError(f"ENTRYPOINT is {config.get('Entrypoint')!r}")
    revision = config.get("Labels", {}).get("org.opencontainers.image.revision", "")
    head = subprocess.run(
        [GIT, "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if head and not revision.startswith(head):
        raise CheckFailedError(f"revision label {revision!r} is not this checkout's {head}")
    return {"size_bytes": int(inspected["Size"]), "revision": revision}


def check_filesystem(paths: set[str], files: dict[str, bytes], extras: set[str]) -> None:
    present = [path for path in FORBIDDEN if path in paths]
    if present:
        raise CheckFailedError(f"the image holds {', '.join(present)}")
    if any(p.startswith("usr/local/share/ca-certificates/") for p in paths):
        raise CheckFailedError("the image holds extra CAs under /usr/local/share/ca-certificates")
    bundle = files.get("etc/ssl/certs/ca-certificates.crt", b"")
    for ca in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        body = b"".join(ca.read_bytes().split(b"-----")[2].split())
        if body and body in b"".join(bundle.split()):
            raise CheckFailedError(f"the image's CA bundle trusts this machine's {ca.name}")
    for extra, roots in SDKS.items():
        for root in roots:
            installed = root in paths
            if installed != (extra in extras):
                state = "carries" if installed else "lacks"
                raise CheckFailedError(f"image for extras {sorted(extras)} {state} /{root}")


def check_wheel(files: dict[str, bytes]) -> int:
    records = [name for name in files if name.endswith("/RECORD")]
    if len(records) != 1:
        raise CheckFailedError(f"expected one linuxguard_rotator RECORD, found {records}")
    listed: dict[str, str] = {}
    for line in files[records[0]].decode().splitlines():
        path, digest, _ = line.rsplit(",", 2)
        if path.startswith(("rotator/", "providers/")) and "__pycache__" not in path:
            listed[path] = digest
    tracked = subprocess.run(
        [GIT, "-C", str(ROOT), "ls-files", "rotator", "providers"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    source = {path: record_hash((ROOT / path).read_bytes()) for path in tracked}
    if set(listed) != set(source):
        only_installed = sorted(set(listed) - set(source))
        only_in_git = sorted(set(source) - set(listed))
        raise CheckFailedError(
            f"installed files differ from the checkout: only installed {only_installed}, "
            f"only in git {only_in_git}"
        )
    stale = [path for path, digest in listed.items() if digest != source[path]]
    if stale:
        raise CheckFailedError(f"installed files are not this checkout's: {stale}")
    return len(listed)


def check_runs(image: str, extras: set[str]) -> None:
    version = run_image(image, "--version")
    expected = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"][
        "version"
    ]
    if expected not in version:
        raise CheckFailedError(f"--version printed {version!r}, expected {expected}")
    providers = {
        p["name"]: p["installed"] for p in json.loads(run_image(image, "providers", "-o", "json"))
    }
    for extra in SDKS:
        if providers.get(extra) != (extra in extras):
            raise CheckFailedError(f"`providers` says {extra} installed={providers.get(extra)}")
    ids = run_image(
        image,
        "-c",
        "import os; print(os.getuid(), os.getgid())",
        entrypoint="/opt/lg-rotate/bin/python",
    ).split()
    if ids != ["65532", "65532"]:
        raise CheckFailedError(f"runs as uid/gid {ids}, not 65532")
    demo = run_image(image, "demo", tmpfs=True)
    if "OK: every pod enrolled" not in demo:
        raise CheckFailedError(f"demo did not end OK: {demo[-400:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--extras", default="all")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    extras = set(SDKS) if args.extras == "all" else set(args.extras.split(","))
    try:
        figures = check_config(args.image)
        print(
            f"ok  config: USER 65532:65532, ENTRYPOINT [lg-rotate], revision {figures['revision']}"
        )
        paths, files = image_files(args.image)
        check_filesystem(paths, files, extras)
        print(
            f"ok  filesystem: no shell, package manager or proxy CA; SDKs of {sorted(extras)} only"
        )
        count = check_wheel(files)
        print(f"ok  wheel: {count} installed files of rotator/ and providers/ equal the checkout's")
        check_runs(args.image, extras)
        print("ok  runs: --version, providers, demo; read-only root, no capabilities, uid 65532")
    except CheckFailedError as failure:
        print(f"FAILED {args.image}: {failure}", file=sys.stderr)
        return 1
    size_mb = int(figures["size_bytes"]) / 1e6  # type: ignore[call-overload]
    print(f"ok  {args.image}: {size_mb:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps({"image": args.image, "extras": args.extras, **figures}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
