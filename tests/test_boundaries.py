"""The package's boundaries: no import circle between its modules, and library code never imports the test helpers
(`blip2_hf.testing_utils`) or the training scripts' helpers (`blip2_hf.training_scripts`)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import blip2_hf

PACKAGE_DIR = Path(blip2_hf.__file__).parent
# Modules that library code must not import: they exist for the tests and for training/*.py.
NOT_FOR_LIBRARY = ("blip2_hf.testing_utils", "blip2_hf.training_scripts")


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in known and c not in (name, "blip2_hf"))
    return found


def test_no_import_circle_between_modules():
    modules = module_names()
    graph = {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                if nxt == goal:
                    return True
                seen.add(nxt)
                todo.append(nxt)
        return False

    circles = sorted((a, b) for a in graph for b in graph[a] if reaches(b, a))
    assert not circles, f"import circles (module, imported module that leads back): {circles}"


def test_library_modules_never_import_test_or_script_helpers():
    library = [name for name in module_names() if name not in NOT_FOR_LIBRARY]
    script = (
        "import importlib, json, sys\n"
        f"for name in {library!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(name for name in sys.modules if name.split('.')[0] in "
        "('blip2_hf', 'tests', 'training', 'evaluation', 'utils', 'conftest'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert set(library) <= loaded
    assert not loaded & {*NOT_FOR_LIBRARY, "utils", "conftest"}, loaded - set(library)
