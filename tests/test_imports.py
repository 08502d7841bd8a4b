"""Import hygiene and public surfaces."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

import l4proxy.chunkd
import l4proxy.chunking
import l4proxy.client
import l4proxy.wire


@pytest.mark.parametrize("module", ["l4proxy.wire", "replay", "replay.cli", "l4proxy.chunking"])
def test_sans_io_modules_never_import_trio(module: str) -> None:
    code = (f"import sys, {module}; "
            "assert 'trio' not in sys.modules, sorted(m for m in sys.modules if 'trio' in m)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr


def test_a_module_that_uses_trio_is_seen_by_the_check() -> None:
    # the check above can fail: importing the client does pull in trio
    code = "import sys, l4proxy.client; assert 'trio' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=False)
    assert result.returncode != 0


@pytest.mark.parametrize("package", [l4proxy.wire, l4proxy.client, l4proxy.chunkd])
def test_public_surface_is_explicit(package: types.ModuleType) -> None:
    names = package.__all__
    assert len(names) == len(set(names))
    assert all(hasattr(package, name) for name in names)
    # everything public in the package namespace is exported on purpose
    public = {n for n, v in vars(package).items()
              if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public == set(names)


def test_wire_surface() -> None:
    expected = {"Connection", "Role", "NEED_DATA", "Hello", "Welcome", "Request", "Continue", "Data",
                "Rows", "Response", "Result", "Error", "Cancel", "GoAway", "Notice",
                "ConnectionClosed", "ErrorCode", "LocalProtocolError", "RemoteProtocolError",
                "ProtocolError", "Op", "OPS", "resources", "negotiate_limits"}
    assert expected <= set(l4proxy.wire.__all__)
