"""Static checks on the gateway: no ML imports, and generated gRPC code that matches nsd.proto."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parent.parent / "nsd" / "gateway"
FORBIDDEN = {"torch", "transformers", "neural_compressor", "nsd.quant", "nsd.worker", "nsd.broker"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_gateway_sources_import_no_ml_library_and_no_broker_or_worker_internals():
    sources = sorted(GATEWAY.glob("*.py"))
    assert len(sources) >= 8
    for path in sources:
        bad = {n for n in _imports(path) if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)}
        assert not bad, f"{path.name} imports {bad}"


def test_a_running_gateways_modules_pull_in_no_torch():
    pytest.importorskip("fastapi")
    code = ("import sys, nsd.cli, nsd.gateway.server, nsd.gateway.app, nsd.gateway.grpc_service;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'neural_compressor')];"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_checked_in_grpc_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    root = GATEWAY.parent.parent
    (tmp_path / "nsd" / "gateway").mkdir(parents=True)
    done = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", f"--python_out={tmp_path}",
                           f"--grpc_python_out={tmp_path}", "nsd/gateway/nsd.proto"],
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    for name in ("nsd_pb2.py", "nsd_pb2_grpc.py"):
        assert (tmp_path / "nsd" / "gateway" / name).read_text() == (GATEWAY / name).read_text(), (
            f"{name} is stale: regenerate it (command at the top of nsd.proto)")


def test_the_light_install_stays_light_and_the_gateway_extra_is_pinned():
    import tomllib

    project = tomllib.loads((GATEWAY.parent.parent / "pyproject.toml").read_text())["project"]
    heavy = ("fastapi", "uvicorn", "grpcio", "protobuf", "starlette", "websockets")
    assert not [d for d in project["dependencies"] if d.split("=")[0].split(">")[0].strip() in heavy]
    extra = project["optional-dependencies"]["gateway"]
    assert {d.split("==")[0] for d in extra} >= {"fastapi", "uvicorn", "grpcio", "protobuf"}
    assert all("==" in d for d in extra)
    code = ("import sys, nsd.cli, nsd.client.api;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('fastapi', 'grpc', 'uvicorn', 'starlette')];"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr  # the CLI loads the gateway only for `nsd gateway`
