"""Print pip constraints that pin every direct dependency of fcconv (and of its `test` extra) to its declared floor.

CI installs the project under these constraints and runs the suite once more, so each `>=` in pyproject.toml is a
version the tests have passed on.
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
floors = {}
for requirement in requirements:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)\s*", requirement)
    if match:
        floors[match[1].lower()] = match[2]
    elif not requirement.startswith("fcconv"):
        sys.exit(f"floors.py: {requirement!r} has no plain `>=` floor")
print("\n".join(f"{name}=={version}" for name, version in sorted(floors.items())))
