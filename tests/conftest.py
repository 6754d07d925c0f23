"""Test configuration: every server fixture lives in tests/fixtures/<server>.py.

Servers (OpenBao, moto, the Kubernetes emulator, the LinuxGuard sandbox, the GCP gRPC
fake) are started by session fixtures on free loopback ports and stopped by their own
process or server handle. A server that fails to start fails the tests that need it.
"""

from __future__ import annotations

from pathlib import Path

pytest_plugins = sorted(
    f"fixtures.{path.stem}"
    for path in (Path(__file__).parent / "fixtures").glob("*.py")
    if not path.name.startswith("_") and path.stem != "ports"  # ports: a helper, not a plugin
)
