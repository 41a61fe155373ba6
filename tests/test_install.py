"""What pip installs (issue 11): declared dependencies, the supported torch range, types.

The plain install itself (a fresh venv, no extras, two ranks) is .ci/run's venv step with
tests/install_check.py.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from moodist import distributed

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = {"zmq": "pyzmq"}  # import name -> distribution name, where they differ
NOT_AT_RUNTIME = {"bench"}  # the benchmark command (module or package), extra "bench"


@pytest.fixture
def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dependencies(pyproject: dict) -> dict[str, Requirement]:
    requirements = [Requirement(d) for d in pyproject["project"]["dependencies"]]
    return {r.name: r for r in requirements}


def _third_party_imports(path: Path) -> set[str]:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    return {m for m in imported if m not in sys.stdlib_module_names and m != "moodist"}


def test_every_module_the_runtime_imports_is_a_declared_dependency(pyproject):
    """``pip install moodist`` (no extras) brings all that ``import moodist`` needs."""
    declared = _dependencies(pyproject)
    package = ROOT / "moodist"
    for path in sorted(package.rglob("*.py")):
        if Path(path.relative_to(package).parts[0]).stem in NOT_AT_RUNTIME:
            continue
        for module in _third_party_imports(path):
            assert DISTRIBUTION.get(module, module) in declared, (path.name, module)


def test_the_torch_range_of_pyproject_is_the_one_checked_at_import(pyproject):
    (low_major, low_minor), (high_major, high_minor) = distributed.TORCH_VERSIONS
    checked = SpecifierSet(f">={low_major}.{low_minor},<{high_major}.{high_minor}")
    assert _dependencies(pyproject)["torch"].specifier == checked


@pytest.mark.parametrize("version", ["2.13.0", "2.13.0+cpu", "2.14.0a0+git1234", "2.99.1"])
def test_supported_torch_versions_pass_the_check(version):
    distributed.check_torch_version(version)


@pytest.mark.parametrize("version", ["2.1.0", "2.12.1+cu121", "3.0.0", "1.13.1", "nonsense"])
def test_unsupported_torch_versions_fail_naming_the_range(version):
    with pytest.raises(ImportError) as raised:
        distributed.check_torch_version(version)
    message = str(raised.value)
    assert "torch>=2.13,<3.0" in message and version in message, message


def test_import_moodist_fails_clearly_on_an_unsupported_torch():
    code = (
        "import torch\n"
        "torch.__version__ = torch.torch_version.TorchVersion('2.1.0')\n"
        "try:\n"
        "    import moodist\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
        "else:\n"
        "    print('imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ImportError: moodist supports torch>=2.13,<3.0"), out.stdout
    assert "2.1.0 is installed" in out.stdout, out.stdout


def test_the_package_says_it_is_typed(pyproject):
    assert (ROOT / "moodist" / "py.typed").is_file()
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["moodist"]
