"""Print the oldest versions pyproject.toml allows of learnax's dependencies, as pip
pins, one a line (``jax==0.4.30``), with jaxlib pinned to jax's version (old jax does
not install jaxlib itself). .ci/run installs exactly these to run
.ci/smoke_min_versions.py, so the declared floor is the one tested.

Only the standard library, and no tomllib (Python 3.10 has none): the dependencies
are a list of "name>=version" strings on one line of pyproject.toml.
"""

from __future__ import annotations

import re
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def minimum_pins(text: str) -> list[str]:
    """``name==version`` for each ``name>=version`` in ``[project] dependencies``."""
    match = re.search(r"^dependencies = \[(.*?)\]", text, re.MULTILINE | re.DOTALL)
    if match is None:
        raise SystemExit(f"no dependencies list in {PYPROJECT}")
    pins = []
    for requirement in re.findall(r'"([^"]+)"', match.group(1)):
        name, sep, version = requirement.partition(">=")
        if not sep or not re.fullmatch(r"[0-9][0-9.]*", version):
            raise SystemExit(f"{PYPROJECT}: {requirement!r} is not of the form name>=version")
        pins.append(f"{name.strip()}=={version}")
        if name.strip() == "jax":
            pins.append(f"jaxlib=={version}")
    return pins


if __name__ == "__main__":
    print("\n".join(minimum_pins(PYPROJECT.read_text(encoding="utf-8"))))
