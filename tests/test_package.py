"""The package's layering, checked on the source: which parts may import which.

Ground floor (`dist`, `devices`, `mappings`, `progress`, `seeding`) imports no other piip6b code; models, weights and tasks
are independent leaves on it; the engine builds on the ground floor and the weights module and
never imports model or task code; nothing in the package imports the launcher (`launch/` is a
script that imports piip6b, one way). Imports under `if TYPE_CHECKING:` are annotations only.
"""

from __future__ import annotations

import ast

from piip6b.testing import REPO

PACKAGE = REPO / "piip6b"
GROUND = {"piip6b.dist", "piip6b.devices", "piip6b.mappings", "piip6b.progress", "piip6b.seeding"}
ALLOWED = {
    "ground": GROUND,
    "models": GROUND | {"piip6b.models"},
    "weights": GROUND | {"piip6b.weights"},
    "tasks": GROUND | {"piip6b.tasks"},
    "engine": GROUND | {"piip6b.engine", "piip6b.weights", "piip6b"},  # `piip6b` for __version__
}


def _runtime_imports(path) -> set[str]:
    """Absolute piip6b modules (and the bare `launch`) that `path` imports at run time."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "piip6b":
            found |= {f"piip6b.{alias.name}" for alias in node.names}  # `from piip6b import dist`
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return {name for name in found if name == "launch" or name.startswith(("launch.", "piip6b"))}


def _area(path) -> str | None:
    relative = path.relative_to(PACKAGE)
    if relative.parts[0] in ("models", "weights", "tasks", "engine"):
        return relative.parts[0]
    if f"piip6b.{relative.with_suffix('').as_posix()}" in GROUND:
        return "ground"
    return None  # the application layer (train, evaluate, config, cli, commands, ...)


def test_imports_respect_the_layers():
    problems = []
    for path in sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts):
        imports = _runtime_imports(path)
        where = path.relative_to(REPO)
        problems += [f"{where} imports the launcher ({name})" for name in imports
                     if name == "launch" or name.startswith("launch.")]
        area = _area(path)
        if area is None:
            continue
        allowed = ALLOWED[area]
        # The bare package (`import piip6b`) is allowed only by name, not as a prefix of everything.
        problems += [f"{where} ({area}) imports {name}" for name in sorted(imports)
                     if name.startswith("piip6b") and name not in allowed
                     and not any(name.startswith(ok + ".") for ok in allowed - {"piip6b"})]
    assert not problems, "\n".join(problems)
