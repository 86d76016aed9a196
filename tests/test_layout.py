"""The layout stays honest (DESIGN.md, module map): light modules stay light, imports point one
way (down the layers), no import cycle, no private name reached across modules, no module over
600 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "farm"
HEAVY = ("torch", "diffusers", "transformers")
# The layers of DESIGN.md, bottom up; a module imports only modules of its own layer or below.
# errors.py sits under everything: the one error base, importing nothing.
LAYERS: dict[str, int] = {
    "errors": 0,
    **dict.fromkeys(("storage", "images", "video", "motion", "schedules", "metrics"), 1),  # tools
    **dict.fromkeys(("models", "presets", "compiled"), 2),  # references (their torch half is imported inside functions)
    "spec": 3,  # values
    **dict.fromkeys(("layout", "columns", "manifest", "lock"), 4),  # records
    **dict.fromkeys(
        (
            "noise",
            "text",
            "conditioning",
            "embeddings",
            "losses",
            "samplers",
            "loras",
            "controlnets",
            "safety",
            "render",
        ),
        5,
    ),  # model
    **dict.fromkeys(("actor", "inputs", "outputs"), 6),  # work
    **dict.fromkeys(("driver", "cluster", "pool", "sink"), 7),  # run
    **dict.fromkeys(("reproduce", "stitch", "sheets", "report", "verify"), 8),  # results
    "cli": 9,  # face
}
# The one call upward: at the end of an animation job the driver has stitch write its videos;
# stitch returns what it wrote and never imports the driver (DESIGN.md, "Where the pieces go").
UPWARD = {("driver", "stitch")}


def modules() -> dict[str, Path]:
    """farm's modules by dotted name (farm.spec.job, ...)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> dict[str, list[str]]:
    """Every farm module ``name`` imports (at module level or inside functions) -> the names it takes."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "farm":
                    found.setdefault(alias.name, [])
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .task import X
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "farm":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:  # from farm import storage: a module, not a name
                    found.setdefault(sub, [])
                else:
                    found.setdefault(base, []).append(alias.name)
    found.pop(name, None)
    return found


def graph() -> dict[str, dict[str, list[str]]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


@pytest.mark.parametrize("module", ["farm.driver", "farm.spec", "farm.manifest", "farm.cli", "farm.layout"])
def test_light_modules_import_no_model_stack(module: str):
    code = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"importing {module} loads {loaded}"


def test_no_import_cycle_inside_farm():
    edges = {name: set(targets) for name, targets in graph().items()}
    # A package's __init__ imports its submodules; a submodule importing the package back is a cycle.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target not in edges:
                continue
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_every_module_has_a_layer_and_imports_only_downward():
    problems = []
    for name, targets in graph().items():
        own = layer(name)
        if name == "farm":
            continue
        if own is None:
            problems.append(f"{name}: no layer (add it to LAYERS and to docs/architecture.md)")
            continue
        for target in targets:
            theirs = layer(target)
            pair = (name.split(".")[1], target.split(".")[1] if "." in target else target)
            if theirs is not None and theirs > own and pair not in UPWARD:
                problems.append(f"{name} (layer {own}) imports {target} (layer {theirs})")
    assert not problems, "\n".join(problems)


def test_no_private_name_is_imported_across_modules():
    crossings = [
        f"{name} imports {target}.{taken}"
        for name, targets in graph().items()
        for target, names in targets.items()
        for taken in names
        if taken.startswith("_") and not taken.startswith("__")
    ]
    assert not crossings, "\n".join(crossings)


def test_no_module_over_600_lines():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert not long, f"split these (DESIGN.md: a module over ~600 lines usually has two jobs): {long}"


def test_the_layer_checks_can_fail(tmp_path: Path):
    """The graph reader sees function-level and relative imports, so the checks above are not vacuous."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from farm.cli import main\n    from .task import _hidden\n")
    found = imports_of("farm.spec.probe", source, {"farm.cli", "farm.spec.task"})
    assert found == {"farm.cli": ["main"], "farm.spec.task": ["_hidden"]}
