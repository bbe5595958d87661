"""Maps the repository's directories to the `labrun` import names.

`clients/` is the package `labrun`, `agent/` is `labrun.agent`, `protocol/` is
`labrun.protocol`. Subpackages are discovered so a new directory needs no edit here.
"""

from setuptools import find_packages, setup

ROOTS = {"labrun": "clients", "labrun.agent": "agent", "labrun.protocol": "protocol"}

packages, package_dir = [], {}
for name, directory in ROOTS.items():
    package_dir[name] = directory
    packages.append(name)
    for sub in find_packages(directory):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{directory}/{sub.replace('.', '/')}"

# `labrun` is a script, not an entry point (see clients/cli/labrun); `labrund` stays pyproject's entry point.
setup(packages=packages, package_dir=package_dir, package_data={"labrun.protocol": ["PROTOCOL.md"]},
      scripts=["clients/cli/labrun"])
