"""The losses package stays pure: torch and the standard library only, public names exported."""

import ast
import sys
from pathlib import Path

import prefalign.losses as losses

LOSSES_DIR = Path(losses.__file__).parent


def test_losses_import_only_torch_stdlib_and_themselves():
    allowed_roots = {"torch", "prefalign"}
    for path in sorted(LOSSES_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root == "prefalign":
                    assert name.startswith("prefalign.losses"), f"{path.name} imports {name}"
                else:
                    ok = root in allowed_roots or root in sys.stdlib_module_names
                    assert ok, f"{path.name} imports {name}"


def test_all_names_exist():
    for name in losses.__all__:
        assert hasattr(losses, name), name
