"""The lock (constraints.txt) adapted to the torch already installed in this Python: prints it
with torch pinned to the installed build and without the packages that build requires.

    python scripts/constraints_for_torch.py constraints.txt > .venv/constraints.txt

Why: the lock never names torch, so a CUDA build a user installed first (`make setup TORCH=`) is
kept, but pip would still be free to replace that torch to satisfy some other pin (a CPU or
CUDA wheel of several GB); the exact pin forbids it. And that build's own requirements (e.g. torch
2.6 pins sympy==1.13.1) win over the lock's, which were frozen beside another torch: the install
then fails or succeeds on what the user's torch needs, never swaps the torch.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def torch_constraints(lock_text: str) -> str:
    """`lock_text` less torch's own requirements, plus `torch==<installed version>`."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("torch is not installed in this Python: install your build first "
                         "(make setup TORCH=... installs one)") from None
    required = {canonical(m.group(1)) for r in importlib.metadata.requires("torch") or []
                if (m := _NAME.match(r))}
    kept = [line for line in lock_text.splitlines()
            if not ((m := _NAME.match(line)) and canonical(m.group(1)) in required)]
    return "\n".join([*kept, f"torch=={version}", ""])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    sys.stdout.write(torch_constraints(Path(sys.argv[1]).read_text()))
