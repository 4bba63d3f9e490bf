"""Layering rules of the attestation package.

- It never imports aiohttp (nor the agent, the proxy or the ``cube`` command), so clients and the
  proxy can use it without a web stack. Checked in a fresh interpreter over every module.
- Parse modules do no cryptography and no I/O. Importing one always runs its package's
  ``__init__`` (which pulls in the verifiers), so this is checked on the parse modules' own
  code instead: they import no verify module and call no verification function.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import attestation
import cube_client

MODULES = sorted(m.name for m in pkgutil.walk_packages(attestation.__path__, "attestation."))
FORBIDDEN = ("aiohttp", "agent", "proxy", "cube")


def test_modules_were_found() -> None:
    # A broken walk would make the checks below vacuous.
    assert len(MODULES) > 30
    for name in ("attestation.evidence", "attestation.cli", "attestation.snp.report"):
        assert name in MODULES


def test_attestation_never_imports_the_web_stack() -> None:
    code = "\n".join(
        [
            "import importlib, sys",
            f"for name in {MODULES!r}:",
            "    importlib.import_module(name)",
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})",
            "assert not bad, bad",
            "print(len(sys.modules))",
        ]
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_attestation_does_not_reference_the_web_stack() -> None:
    """Also lazily: no import statement anywhere in the package names a forbidden module."""
    offenders = []
    for name in MODULES:
        for imported in _imports(name):
            if imported.split(".")[0] in FORBIDDEN:
                offenders.append((name, imported))
    assert not offenders


# -- parse modules -------------------------------------------------------------------------------

PARSE_MODULES = (
    "attestation.snp.report",
    "attestation.snp.certs",
    "attestation.tdx._quote",
    "attestation.tdx._pck",
    "attestation.tpm.parse",
    "attestation.tpm._wire",
    "attestation._der",
    "attestation._json",
)
VERIFY_MODULES = ("attestation.snp.verify", "attestation.tdx._verify", "attestation.tpm.verify")
#: cryptography names that check signatures.
VERIFYING_NAMES = ("InvalidSignature", "ECDSA", "PSS", "PKCS1v15", "load_der_x509_crl")
IO_CALLS = ("open", "read_bytes", "read_text", "write_bytes", "write_text", "ioctl", "urlopen")


def _source(name: str) -> tuple[Path, ast.Module]:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, name
    path = Path(spec.origin)
    return path, ast.parse(path.read_text(), filename=str(path))


def _imports(name: str) -> list[str]:
    _, tree = _source(name)
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            out.append(node.module)
            out.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _called_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                names.add(func.id)
            elif isinstance(func, ast.Attribute):
                names.add(func.attr)
    return names


@pytest.mark.parametrize("name", PARSE_MODULES)
def test_parse_modules_import_no_verifier(name: str) -> None:
    imported = _imports(name)
    assert not [m for m in imported if m in VERIFY_MODULES or m.startswith(VERIFY_MODULES)]
    assert not [m for m in imported if m.split(".")[-1] in VERIFYING_NAMES]


@pytest.mark.parametrize("name", PARSE_MODULES)
def test_parse_modules_verify_nothing_and_do_no_io(name: str) -> None:
    _, tree = _source(name)
    called = _called_names(tree)
    assert not {c for c in called if c.startswith("verify") or c == "verify"}
    assert not called & set(IO_CALLS)


def test_the_static_checks_can_fail() -> None:
    # The verify modules break the rules the parse modules keep.
    called = set().union(*(_called_names(_source(m)[1]) for m in VERIFY_MODULES))
    assert {c for c in called if c.startswith("verify") or c == "verify"}


# -- cube_client ----------------------------------------------------------------------------------

CLIENT_MODULES = sorted(
    {"cube_client"} | {m.name for m in pkgutil.walk_packages(cube_client.__path__, "cube_client.")}
)
#: The client stands on the attestation library alone: no web server stack, no agent, no proxy,
#: no CLI (so any application can embed it, and nothing there can weaken what it checks).
CLIENT_FORBIDDEN = ("aiohttp", "agent", "proxy", "cube")


def test_client_modules_were_found() -> None:
    assert {"cube_client", "cube_client.e2e", "cube_client._transport"} <= set(CLIENT_MODULES)


def test_cube_client_imports_neither_agent_nor_proxy() -> None:
    code = "\n".join(
        [
            "import importlib, sys",
            f"for name in {CLIENT_MODULES!r}:",
            "    importlib.import_module(name)",
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {CLIENT_FORBIDDEN!r})",
            "assert not bad, bad",
        ]
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    offenders = [
        (name, imported)
        for name in CLIENT_MODULES
        for imported in _imports(name)
        if imported.split(".")[0] in CLIENT_FORBIDDEN
    ]
    assert not offenders


def test_the_agent_uses_only_the_clients_wire_format() -> None:
    """The agent shares the ``cube-e2e/1`` codec with clients, nothing else of cube_client."""
    import agent

    used = {
        imported
        for name in sorted(m.name for m in pkgutil.walk_packages(agent.__path__, "agent."))
        for imported in _imports(name)
        if imported.split(".")[0] == "cube_client"
    }
    assert used  # agent.e2e uses the codec
    assert {m.rsplit(".", 1)[0] if m.count(".") > 1 else m for m in used} == {"cube_client.e2e"}
