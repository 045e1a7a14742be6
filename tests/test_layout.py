"""The house rules a newcomer relies on, checked: every module is named in the README's architecture
section, no hand-written module is over 450 lines, the package has no import cycles, the arrows
between its floors point down, and the broker, client and gateway never import torch."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nsd"
GENERATED = {"nsd/gateway/nsd_pb2.py", "nsd/gateway/nsd_pb2_grpc.py"}  # protoc's output, checked elsewhere
LONG = 450  # lines; past this a module holds more than one job: split it where a reader would look


def modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                  if p.name != "__init__.py" and "__pycache__" not in p.parts and str(p.relative_to(ROOT)) not in GENERATED)


def test_every_module_is_named_in_the_readme_architecture_section():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Architecture"):]
    section = section[:section.index("\n## ", 4)] if "\n## " in section[4:] else section
    named = set(re.findall(r"nsd/[\w/]+\.py", section))
    missing = [m for m in modules() if m not in named]
    assert missing == [], f"README's architecture section does not name: {missing}"


# bench/inc_vs_nsd.py is lane `lazy`'s (#18) to split: it is rewriting it now.
LONG_FOR_NOW = {"bench/inc_vs_nsd.py"}


def test_no_module_is_over_450_lines():
    """Anywhere: the package, the tests, the benchmarks (protoc's output is not written by hand)."""
    written = [*modules(), *(str(p.relative_to(ROOT)) for folder in ("tests", "bench") for p in (ROOT / folder).rglob("*.py"))]
    long = [f"{m} ({n} lines)" for m in written if m not in LONG_FOR_NOW
            and (n := (ROOT / m).read_text().count("\n")) > LONG]
    assert long == [], f"over {LONG} lines: {long}"


def _top_level_imports(path: Path) -> set[str]:
    """nsd modules imported when this module is imported (module level, not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nsd"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nsd") and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_the_package_has_no_import_cycles():
    names = {m[:-3].replace("/", "."): m for m in modules()}
    names.update({str(p.parent.relative_to(ROOT)).replace("/", "."): str(p.relative_to(ROOT))
                  for p in PACKAGE.rglob("__init__.py")})
    graph = {name: {d for d in _top_level_imports(ROOT / path) if d in names and d != name}
             for name, path in names.items()}
    cycles = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        for dep in graph[node]:
            visit(dep, stack + [node], done)
        done.add(node)

    done: set[str] = set()
    for name in graph:
        visit(name, [], done)
    assert cycles == [], f"import cycles: {cycles}"


def _all_imports(path: Path) -> set[str]:
    """nsd modules imported anywhere in this module, function bodies included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nsd"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nsd") and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from nsd import cli`
    return found


# The house's arrows point down: cli -> client / gateway / local / broker / worker -> protocol, spec, ...
# The client library is only the client library: it never reaches up to what is built on it.
ABOVE_THE_CLIENT = ("nsd.cli", "nsd.gateway", "nsd.local")


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)  # nsd.client is not within nsd.cli


def test_the_client_library_never_imports_the_floors_above_it():
    upward = [f"{path.relative_to(ROOT)} imports {name}" for path in sorted((PACKAGE / "client").rglob("*.py"))
              for name in _all_imports(path) if _within(name, ABOVE_THE_CLIENT)]
    assert upward == [], f"the client library reaches up: {upward}"


def test_nothing_but_the_entry_point_imports_the_cli():
    upward = [f"{path.relative_to(ROOT)} imports {name}" for path in sorted(PACKAGE.rglob("*.py"))
              if "cli" not in path.relative_to(PACKAGE).parts and path.name != "__main__.py"
              for name in _all_imports(path) if _within(name, ("nsd.cli",))]
    assert upward == [], f"the CLI is the top floor; these reach up into it: {upward}"


def test_broker_client_and_gateway_never_import_torch():
    import subprocess
    import sys

    code = ("import sys, nsd.broker.daemon, nsd.cli, nsd.client.api, nsd.protocol, nsd.spec; "
            "import nsd.gateway.app, nsd.gateway.grpc_service; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'neural_compressor')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_test_module_imports_another():
    """Shared helpers live in tests/conftest.py, tests/peers.py and the other helper modules (not test_*.py);
    shared fixtures in conftest.py (and its plugin tests/gateway_fixtures.py), so no test imports a fixture."""
    tests = ROOT / "tests"
    leaning = [f"{path.name} imports {name}" for path in sorted(tests.glob("test_*.py"))
               for name in _all_imports_any(path) if name.startswith("tests.test_")]
    assert leaning == [], f"test modules importing other test modules: {leaning}"


def _all_imports_any(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from tests import test_x`
    return found
