"""Each module imports only downward: no import circle anywhere in the package, counting imports made inside
functions too (the app and the command line used to import each other that way)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ether_diffusion"


def module_graph() -> dict[str, set[str]]:
    files = {".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): f
             for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, file in files.items():
        package = name.split(".") if file.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = module_graph()
    graph.pop("ether_diffusion")  # the package's __init__ re-exports the public API; nothing imports it back

    def reaches(start: str, goal: str) -> list[str] | None:
        stack, seen = [(start, [start])], {start}
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == goal:
                    return path + [goal]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    circles = [reaches(b, a) for a in graph for b in graph[a] if reaches(b, a)]
    assert not circles, circles[0]
    assert "ether_diffusion.cli" not in graph["ether_diffusion.app"]
