"""The package's shape: imports point one way (cli -> tasks -> tools -> core), no cycles."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_grpo"

# What each part may import from the package, besides itself.
ALLOWED = {
    "mlx_grpo": {"core"},  # the public API: train, TrainConfig
    "core": set(),
    "tools": {"core"},
    "tasks": {"core", "tools"},
    "cli": {"mlx_grpo", "core", "tools", "tasks"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mlx_grpo"


def imports_of(path: Path) -> set[str]:
    """Package modules that `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mlx_grpo")}
        elif (
            isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlx_grpo")
        ):
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:  # `from mlx_grpo.core import lora` imports a module
                sub = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file()
                found.add(sub if is_module else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_is_in_one_part_of_the_layout():
    graph = import_graph()
    assert {part_of(m) for m in graph} == set(ALLOWED)
    assert "mlx_grpo.core.objective" in graph and "mlx_grpo.tools.evaluate" in graph


def test_imports_point_from_cli_to_tasks_to_tools_to_core():
    wrong = []
    for module, imported in import_graph().items():
        for target in imported:
            source, dest = part_of(module), part_of(target)
            if target == "mlx_grpo.cli" or (dest != source and dest not in ALLOWED[source]):
                if not (module == "mlx_grpo.cli" and target == "mlx_grpo"):
                    wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_objective_imports_nothing_of_the_package():
    assert import_graph()["mlx_grpo.core.objective"] == set()


def test_no_import_cycles():
    graph = import_graph()
    # A package's __init__ runs before its modules; an edge to it is not a dependency cycle.
    edges = {m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()}
    done, cycles = set(), []

    def visit(node, path):
        if node in path:
            cycles.append(" -> ".join(path[path.index(node) :] + [node]))
            return
        if node in done:
            return
        for target in sorted(edges[node]):
            visit(target, path + [node])
        done.add(node)

    for node in sorted(edges):
        visit(node, [])
    assert cycles == []


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "mlx_grpo"
    (fake / "core").mkdir(parents=True)
    (fake / "tools").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "core" / "__init__.py").write_text("")
    (fake / "tools" / "__init__.py").write_text("")
    (fake / "tools" / "plot.py").write_text("")
    (fake / "core" / "a.py").write_text("def f():\n    from mlx_grpo.tools import plot\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert import_graph()["mlx_grpo.core.a"] == {"mlx_grpo.tools.plot"}
    try:
        test_imports_point_from_cli_to_tasks_to_tools_to_core()
    except AssertionError as exc:
        assert "mlx_grpo.core.a imports mlx_grpo.tools.plot" in str(exc)
    else:
        raise AssertionError("an import from core into tools went unnoticed")


LOOP = {"mlx_grpo.core.trainer._loop"}  # the loop may read as one piece
MAX_FUNCTION_LINES = 60


def long_functions(package: Path, limit: int) -> list[str]:
    """Functions (docstring included) of core longer than `limit` lines, the loop aside."""
    found = []
    for path in sorted((package / "core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
                name = f"{module}.{node.name}"
                if lines > limit and name not in LOOP:
                    found.append(f"{name}: {lines} lines")
    return found


def test_no_function_in_core_is_longer_than_a_screen():
    assert long_functions(PACKAGE, MAX_FUNCTION_LINES) == []


def test_the_length_rule_sees_a_long_function(tmp_path):
    (tmp_path / "core").mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "core" / "long.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}")
    assert long_functions(tmp_path, MAX_FUNCTION_LINES) == [
        f"{tmp_path.name}.core.long.long: {MAX_FUNCTION_LINES + 1} lines"
    ]


def test_every_module_opens_with_a_one_line_summary():
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        lines = doc.splitlines() or [""]
        if not lines[0].strip() or (len(lines) > 1 and lines[1].strip()):
            missing.append(module_name(path))
    assert missing == []
