"""The package's shape: lazy top level, dependencies pointing one way, small functions."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "switchkd"
# Each layer may import only the layers listed for it (ops ← decoding ← training ← cli).
ALLOWED = {"ops": {"ops", "kernels"}, "decoding": {"ops", "decoding", "kernels", "_C"},
           "training": {"ops", "decoding", "training"}}


def _imported_switchkd_modules(path: Path) -> set[str]:
    """First component under ``switchkd`` of every import in a module of ``switchkd/<layer>/``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found.add(path.parent.name)
            elif node.level == 2:
                found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif node.module and node.module.startswith("switchkd."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("switchkd."))
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_depend_one_way(layer):
    for path in sorted((PACKAGE / layer).glob("*.py")):
        imported = _imported_switchkd_modules(path)
        assert imported <= ALLOWED[layer], f"{path.relative_to(ROOT)} imports {sorted(imported - ALLOWED[layer])}"


def test_kernels_import_nothing_above_the_spec():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        text = path.read_text()
        for banned in ("switchkd.decoding", "switchkd.training", "transformers"):
            assert banned not in text, f"{path.name} imports {banned}"


def test_kd_loss_needs_neither_transformers_nor_the_extension():
    code = ("import sys, switchkd; switchkd.kd_loss; switchkd.fused_switch_step; switchkd.SwitchPolicy; "
            "print(sorted(m for m in ('transformers', 'switchkd._C') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _code_lines(fn: ast.FunctionDef) -> int:
    """Lines of a function without its docstring."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    return 0 if not body else body[-1].end_lineno - body[0].lineno + 1


def test_no_function_over_50_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > 50:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({_code_lines(node)} lines)")
    assert not long, long
