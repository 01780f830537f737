"""The repository explains itself: every cited doc exists, modules stay small, no import cycles."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for p in REPO.rglob("*.py") if not any(part in {".venv", "build", ".git", "stand_ins"}
                                                           for part in p.relative_to(REPO).parts))


def test_every_cited_file_exists():
    cited = re.compile(r"\b((?:docs|loop|simulator|benchmark|serve|training|scripts|configs)/[\w/.-]+\.(?:md|py|yaml))")
    missing = []
    for path in SOURCES + sorted(REPO.glob("docs/*.md")) + [REPO / "README.md"]:
        for match in cited.finditer(path.read_text(encoding="utf-8")):
            name = match.group(1).rstrip(".")
            if "*" not in name and "<" not in name and not (REPO / name).exists():
                missing.append(f"{path.relative_to(REPO)} cites {name}")
    assert not missing, "\n".join(missing)



def test_no_citation_of_a_spec_outside_the_repository():
    outside = re.compile(r"(?<![\w/])(STEP_SPEC|DESIGN|BENCHMARK|OPEN_MODE)\.md|/work/shared|\.\./shared")
    found = [f"{p.relative_to(REPO)}:{i}" for p in SOURCES + sorted(REPO.glob("docs/*.md")) + [REPO / "README.md"]
             if p != Path(__file__).resolve()
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if outside.search(line)]
    assert not found, "cite the docs/ files instead: " + ", ".join(found)


def test_no_source_module_over_500_lines_and_no_class_over_300():
    too_long = []
    for path in SOURCES:
        rel = path.relative_to(REPO)
        if rel.parts[0] == "tests":
            continue
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 500:
            too_long.append(f"{rel}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300:
                too_long.append(f"{rel}: class {node.name} has {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "\n".join(too_long)


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = ["stepforge", *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_between_modules():
    """Module-level imports only (imports inside functions are deliberate lazy loads)."""
    modules = {_module_name(p): p for p in SOURCES if p.relative_to(REPO).parts[0] not in ("tests", "scripts")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = name.rsplit(".", node.level if path.name != "__init__.py" else node.level - 1)[0]
                mod = f"{base}.{node.module}" if node.module else base
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
