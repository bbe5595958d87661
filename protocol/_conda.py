"""Conda environment specifications (``environment.yml``): the subset Azure ML's ``CondaDependencies`` writes.

Shared by the client (``CondaDependencies``) and the agent (building the environment), so both read
the same text the same way. Pure: no YAML library, no I/O. Understood: ``name``, ``channels``,
``dependencies`` (conda packages, and a ``pip:`` list of pip requirements), ``variables``;
comments and blank lines. Anything else raises ``ValueError`` naming the line.
"""

from __future__ import annotations

_SECTIONS = ("name", "channels", "dependencies", "variables", "prefix")
# ``re`` is imported where text is read: a client that only builds a default ``CondaDependencies`` (every
# ``ScriptRunConfig``, and so every CLI submit) never needs it.
_PYTHON_PATTERN = r"^python\s*(?:[=<>!~]=?\s*)?([0-9][0-9.*]*)?\s*$"


def _scalar(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _strip_comment(line: str) -> str:
    import re

    # A '#' starts a comment only at the start or after a space (conda's "pkg=1.0=py#build" keeps it).
    match = re.search(r"(^|\s)#", line)
    return line[:match.start()].rstrip() if match else line.rstrip()


def parse(text: str) -> dict:
    """``{"name", "channels", "conda": [...], "pip": [...], "variables": {...}}`` from a conda YAML text."""
    spec = {"name": None, "channels": [], "conda": [], "pip": [], "variables": {}}
    section = None
    in_pip = False
    pip_indent = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        if indent == 0 and not body.startswith("-"):
            key, sep, value = body.partition(":")
            if not sep or key not in _SECTIONS:
                raise ValueError(f"line {number}: expected one of {', '.join(_SECTIONS)}, got {body[:60]!r}")
            section, in_pip = key, False
            value = value.strip()
            if key == "name":
                spec["name"] = _scalar(value) or None
            elif value.startswith("[") and value.endswith("]") and key in ("channels", "dependencies"):
                items = [_scalar(v) for v in value[1:-1].split(",") if v.strip()]
                spec["conda" if key == "dependencies" else key].extend(items)
            elif value and key != "prefix":
                raise ValueError(f"line {number}: {key} must be a list")
            continue
        if section == "variables":
            key, sep, value = body.partition(":")
            if not sep:
                raise ValueError(f"line {number}: variables must be KEY: VALUE, got {body[:60]!r}")
            spec["variables"][key.strip()] = _scalar(value)
            continue
        if not body.startswith("-"):
            raise ValueError(f"line {number}: expected a '- item' list entry, got {body[:60]!r}")
        item = body[1:].strip()
        if in_pip and pip_indent is not None and indent > pip_indent:
            spec["pip"].append(_scalar(item))
            continue
        in_pip = False
        if section == "channels":
            spec["channels"].append(_scalar(item))
        elif section == "dependencies":
            if item.rstrip(":").strip() == "pip" and item.endswith(":"):
                in_pip, pip_indent = True, indent
            else:
                spec["conda"].append(_scalar(item))
        else:
            raise ValueError(f"line {number}: a list entry outside channels or dependencies")
    return spec


def _quoted(item: str) -> str:
    return f"'{item}'" if any(c in item for c in ":#{}[]&*!|>'\"%@`") or item != item.strip() else item


def dump(spec: dict) -> str:
    """The conda YAML text of a ``parse``-shaped dict (Azure ML's layout)."""
    lines = ["# Conda environment specification. The dependencies defined in this file will",
             "# be automatically provisioned for runs with userManagedDependencies=False.", ""]
    lines.append(f"name: {spec.get('name') or 'project_environment'}")
    lines.append("dependencies:")
    for package in spec.get("conda", []):
        lines.append(f"- {_quoted(package)}")
    if spec.get("pip"):
        if not any(_package_name(p) == "pip" for p in spec.get("conda", [])):
            lines.append("- pip")
        lines.append("")
        lines.append("- pip:")
        for package in spec["pip"]:
            lines.append(f"  - {_quoted(package)}")
    if spec.get("channels"):
        lines.append("channels:")
        for channel in spec["channels"]:
            lines.append(f"- {_quoted(channel)}")
    if spec.get("variables"):
        lines.append("variables:")
        for key, value in spec["variables"].items():
            lines.append(f"  {key}: {_quoted(str(value))}")
    return "\n".join(lines) + "\n"


def _package_name(requirement: str) -> str:
    """The package name of a conda or pip requirement (``numpy=1.21``, ``scikit-learn>=1``, ``conda-forge::x``)."""
    import re

    name = requirement.split("::")[-1]
    return re.split(r"[\s=<>!~\[;@]", name, maxsplit=1)[0].strip().lower()


package_name = _package_name


def python_version(spec: dict) -> str | None:
    """The Python version a spec pins (``"3.8"`` from ``python=3.8.13``), or None."""
    import re

    for package in spec["conda"]:
        match = re.match(_PYTHON_PATTERN, package.strip())
        if match and match.group(1):
            return ".".join(match.group(1).replace("*", "").strip(".").split(".")[:2])
    return None


def conda_to_pip(requirement: str) -> str:
    """A conda requirement as pip would read it: ``numpy=1.21`` -> ``numpy==1.21.*``, ``x==1`` kept."""
    import re

    requirement = requirement.split("::")[-1].strip()
    match = re.match(r"^([A-Za-z0-9_.\-]+)\s*=\s*([^=<>!~\s]+)(?:=\S+)?$", requirement)
    if match:   # conda's single '=' is a version prefix; a third part is a build string pip has no use for
        name, version = match.groups()
        return f"{name}=={version}" if version.endswith("*") or version.count(".") >= 2 else f"{name}=={version}.*"
    return requirement
