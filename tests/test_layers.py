"""The package's layers, read from its imports: core/ is torch only, models/ never reaches up into
the runtime, and the shapes world is imported only inside dmdcli/shapes/ (the registry lists the
family modules by name, models/families.py, and imports them by that string)."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dmdcli"


def imported_modules(source: str, module: str) -> set[str]:
    """Every module `source` (the code of dotted `module`) imports, at any depth, as absolute names;
    `from a import b` counts as importing both a and a.b (b may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package upwards
                parent = module.split(".")[: -node.level]
                base = ".".join(parent + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def _is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layer_violations(path: str, imports: set[str]) -> set[tuple[str, str]]:
    """(rule, module) for each import a module at `path` (e.g. dmdcli/core/x.py) must not make."""
    wrong = set()
    if path.startswith("dmdcli/core/"):
        allowed = lambda name: (
            name.split(".")[0] in sys.stdlib_module_names or _is_under(name, "torch") or _is_under(name, "dmdcli.core")
        )
        wrong |= {("core: torch only", name) for name in imports if not allowed(name)}
    if path.startswith("dmdcli/models/"):
        upward = ("dmdcli.train", "dmdcli.cli", "dmdcli.eval")
        wrong |= {("models: no runtime", name) for name in imports if any(_is_under(name, p) for p in upward)}
    if not path.startswith("dmdcli/shapes/"):
        wrong |= {("shapes: its own package", name) for name in imports if _is_under(name, "dmdcli.shapes")}
    return wrong


def _modules():
    for file in sorted(PACKAGE.rglob("*.py")):
        rel = file.relative_to(PACKAGE.parent)
        yield rel.as_posix(), ".".join(rel.with_suffix("").parts)


@pytest.mark.parametrize("path,module", list(_modules()), ids=lambda v: v if v.endswith(".py") else "")
def test_a_module_keeps_to_its_layer(path, module):
    imports = imported_modules((PACKAGE.parent / path).read_text(), module)
    assert layer_violations(path, imports) == set()


@pytest.mark.parametrize(
    "path,source,broken",
    [
        ("dmdcli/core/x.py", "import numpy", "core: torch only"),
        ("dmdcli/core/x.py", "def f():\n    from diffusers import DDPMScheduler", "core: torch only"),
        ("dmdcli/core/x.py", "import math\nimport torch.nn\nfrom . import schedule", None),
        ("dmdcli/models/x.py", "from dmdcli.train import rundir", "models: no runtime"),
        ("dmdcli/models/x.py", "from ..eval.run import BENCHMARKS", "models: no runtime"),
        ("dmdcli/models/x.py", "from dmdcli.files import read_json", None),
        ("dmdcli/cli/x.py", "from dmdcli import shapes", "shapes: its own package"),
        ("dmdcli/train/x.py", "import dmdcli.shapes.data", "shapes: its own package"),
        ("dmdcli/shapes/x.py", "from dmdcli.shapes import world\nfrom dmdcli.train import checkpoint", None),
    ],
)
def test_the_layer_check_sees_each_kind_of_import(path, source, broken):
    module = ".".join(Path(path).with_suffix("").parts)
    rules = {rule for rule, _ in layer_violations(path, imported_modules(source, module))}
    assert rules == ({broken} if broken else set())
