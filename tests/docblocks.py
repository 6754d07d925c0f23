"""Blocks of the docs that tests run as written, so that what a reader copies is what works.

* :func:`vault_policies`: every ``vault policy write NAME - <<'EOF' ... EOF`` in the README and
  docs/ (docs/DEPLOYMENT.md's ``lg-rotate`` policy), name -> HCL;
* :func:`without_cert_manager`: docs/PER-POD.md, "Without cert-manager": the overlay patches
  (YAML) and the shell script that makes the CA, the serving pair and the ``caBundle``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PER_POD = ROOT / "docs" / "PER-POD.md"
POLICY_BLOCK = re.compile(r"^(?:vault|bao) policy write (\S+) - <<'EOF'\n(.*?)\nEOF$", re.S | re.M)
WITHOUT_CERT_MANAGER = "<!-- without-cert-manager -->"


def vault_policies() -> dict[str, str]:
    policies = {}
    for path in (README, *DOCS):
        for name, hcl in POLICY_BLOCK.findall(path.read_text(encoding="utf-8")):
            assert name not in policies, f"two policies named {name}"
            policies[name] = hcl
    return policies


def without_cert_manager() -> tuple[list[dict[str, Any]], str]:
    """``(patches, script)`` of docs/PER-POD.md's section (the first yaml and sh blocks)."""
    section = PER_POD.read_text(encoding="utf-8").split(WITHOUT_CERT_MANAGER)[1]
    patches = yaml.safe_load(section.split("```yaml")[1].split("```")[0])["patches"]
    script = section.split("```sh")[1].split("```")[0]
    return patches, script
