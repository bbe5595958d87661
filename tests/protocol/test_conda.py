"""Conda specifications: the subset CondaDependencies writes, read back the same by client and agent."""

import pytest

from labrun.protocol import _conda

SPEC = """# comment
name: project_environment
dependencies:
  # The python interpreter version.
- python=3.10.18
- numpy=1.26
- conda-forge::scipy
- pip

- pip:
  - azureml-defaults
  - "scikit-learn>=1.3"
  - --extra-index-url https://example.org/simple
channels:
- anaconda
- conda-forge
variables:
  MY_VAR: "1"
"""


def test_parse_and_dump_round_trip():
    spec = _conda.parse(SPEC)
    assert spec == {"name": "project_environment", "channels": ["anaconda", "conda-forge"],
                    "conda": ["python=3.10.18", "numpy=1.26", "conda-forge::scipy", "pip"],
                    "pip": ["azureml-defaults", "scikit-learn>=1.3", "--extra-index-url https://example.org/simple"],
                    "variables": {"MY_VAR": "1"}}
    assert _conda.parse(_conda.dump(spec)) == spec
    assert _conda.python_version(spec) == "3.10"


def test_conda_requirements_for_pip():
    assert [_conda.conda_to_pip(r) for r in ("numpy=1.26", "numpy=1.26.4", "numpy=1.26.4=py310h", "scipy",
                                              "conda-forge::x>=2", "torch==2.1")] == \
        ["numpy==1.26.*", "numpy==1.26.4", "numpy==1.26.4", "scipy", "x>=2", "torch==2.1"]
    assert [_conda.package_name(r) for r in ("Scikit-Learn>=1", "a[b]==1", "conda-forge::c=1")] == \
        ["scikit-learn", "a", "c"]


@pytest.mark.parametrize("text", ["name: x\nfoo: bar\n", "dependencies: numpy\n", "dependencies:\n  numpy\n"])
def test_anything_else_is_refused_naming_the_line(text):
    with pytest.raises(ValueError, match="line "):
        _conda.parse(text)
