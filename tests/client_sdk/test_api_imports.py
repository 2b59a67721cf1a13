"""The REST client is importable without the heavy stacks."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "statement", ["import hivemart_core.api", "from client_sdk import Client; Client", "import client_sdk"]
)
def test_rest_client_imports_neither_torch_nor_hivemind_nor_django(statement: str) -> None:
    code = (
        f"import sys; {statement}; "
        "print(','.join(m for m in ('torch', 'hivemind', 'django', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_public_names_are_exported() -> None:
    import client_sdk
    import hivemart_core.api as api
    from hivemart_core.errors import APIError, HivemartError

    assert all(hasattr(api, name) for name in api.__all__)
    assert client_sdk.Client is api.Client
    assert issubclass(api.InsufficientCreditsError, APIError) and issubclass(APIError, HivemartError)
    assert issubclass(api.APIConnectionError, APIError)
