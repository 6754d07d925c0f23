"""The end-to-end suite (marker ``node``): lg-rotate as its users run it, on a real node.

Prerequisites, each checked before anything starts:

* root (the node runs containerd, a CNI bridge and iptables rules);
* ``../shared/envtest`` beside the repository (or ``$LG_ROTATE_ENVTEST``): the control-plane and
  node scripts and their binaries, plus Debian's containerd, runc, containernetworking-plugins
  and iptables (``node up`` names what is missing);
* the images, built by ``.ci/image/build.sh vault`` and ``.ci/image/build.sh agent`` into
  ``.ci/image/out`` (or ``$LG_ROTATE_E2E_IMAGES``).

Without them every test here is skipped with the one command that provides them all,
``sudo bash .ci/e2e``; with ``CI`` set a skip fails the run (tests/fixtures/cluster.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import docblocks
from fixtures.openbao import running_openbao
from fixtures.sandbox import wait_until_ready
from realnode import API_KEY, BRIDGE, ROOT, RealNode, running_envtest
from rotator.sandbox import SandboxServer

ENABLE = "sudo bash .ci/e2e  (builds the images, then runs pytest -m node)"
ARCHIVES = ("lg-rotate-vault", "agent")
# The namespaces the suite deploys into: Vault's role admits lg-rotate's ServiceAccounts there.
NAMESPACES = ("e2e-shared", "e2e-no-watch", "linuxguard", "e2e-certs", "e2e-helm3", "e2e-helm4")


def _prerequisites() -> tuple[Path, dict[str, Path]] | str:
    """``(envtest folder, image archives)``, or why they are not there."""
    envtest = Path(os.environ.get("LG_ROTATE_ENVTEST", ROOT.parent / "shared" / "envtest"))
    images = Path(os.environ.get("LG_ROTATE_E2E_IMAGES", ROOT / ".ci" / "image" / "out"))
    if os.geteuid() != 0:
        return "needs root"
    if not (envtest / "node").is_file() or not (envtest / "control-plane").is_file():
        return f"no control-plane and node scripts in {envtest} (LG_ROTATE_ENVTEST)"
    archives = {name: images / f"{name}.tar" for name in ARCHIVES}
    missing = [str(path) for path in archives.values() if not path.is_file()]
    if missing:
        return f"no image archives {', '.join(missing)}"
    return envtest, archives


def _configure_vault(node: RealNode, root_token: str) -> None:
    """Kubernetes auth as docs/DEPLOYMENT.md sets it up: TokenReview against this API server
    by a reviewer bound to system:auth-delegator, the documented policy, role lg-rotate."""
    import hvac

    node.kubectl("create", "namespace", "vault-auth")
    node.kubectl("-n", "vault-auth", "create", "serviceaccount", "vault")
    node.kubectl(
        "create",
        "clusterrolebinding",
        "vault-reviewer",
        "--clusterrole=system:auth-delegator",
        "--serviceaccount=vault-auth:vault",
    )
    reviewer = node.kubectl("-n", "vault-auth", "create", "token", "vault", "--duration=2h")
    server = node.kubectl("config", "view", "-o", "jsonpath={.clusters[0].cluster.server}")
    client = hvac.Client(url=node.vault_addr, token=root_token, timeout=10)
    client.sys.enable_auth_method("kubernetes")
    client.auth.kubernetes.configure(
        kubernetes_host=server,
        kubernetes_ca_cert=(node.cp / "ca.crt").read_text(),
        token_reviewer_jwt=reviewer.strip(),
        disable_local_ca_jwt=True,
    )
    client.sys.create_or_update_policy(
        name="lg-rotate", policy=docblocks.vault_policies()["lg-rotate"]
    )
    client.auth.kubernetes.create_role(
        name="lg-rotate",
        bound_service_account_names=["lg-rotate", "lg-rotate-watch", "lg-rotate-webhook"],
        bound_service_account_namespaces=list(NAMESPACES),
        policies=["lg-rotate"],
        ttl="10m",
    )


@pytest.fixture(scope="session")
def real_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    found = _prerequisites()
    if isinstance(found, str):
        pytest.skip(f"needs a real node ({found}): {ENABLE}")
    envtest, archives = found
    workdir = tmp_path_factory.mktemp("node")
    images = {
        name: (path.with_suffix(".ref")).read_text().strip() for name, path in archives.items()
    }
    with running_envtest(envtest, workdir, list(archives.values())):
        # The bridge exists from `node up` on: the host's servers for the pods bind it.
        sandbox = SandboxServer(host=BRIDGE, port=0, api_keys={API_KEY: None})
        sandbox.start()
        try:
            wait_until_ready(sandbox)
            (workdir / "openbao").mkdir()
            with running_openbao(workdir / "openbao", host=BRIDGE) as bao:
                node = RealNode(
                    workdir=workdir,
                    envtest=envtest,
                    images=images,
                    sandbox=sandbox,
                    vault_addr=bao.addr,
                )
                _configure_vault(node, bao.root_token)
                yield node
        finally:
            sandbox.stop()
