"""``lg-rotate`` that SIGKILLs itself at a given step boundary (for crash-resume tests).

Usage: python tests/crashrun.py STEP lg-rotate-args...   (STEP: minted, stored, delivered, ...)
The real CLI runs unchanged; only the rotator's step callback is wrapped.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from rotator import cli, rotation


def main() -> int:
    kill_at = rotation.Step(sys.argv[1])
    original_init = rotation.Rotator.__init__

    def init(self: rotation.Rotator, **kwargs: Any) -> None:
        def on_step(step: rotation.Step) -> None:
            if step is kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        original_init(self, **kwargs, on_step=on_step)

    rotation.Rotator.__init__ = init  # type: ignore[method-assign]
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
