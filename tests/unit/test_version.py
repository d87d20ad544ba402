"""One version in one place: `[workspace.package] version` of Cargo.toml. The native module is
built with it, maturin writes it into the distribution's metadata (pyproject.toml declares the
version dynamic), and `commandbus.__version__` is the native module's."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import commandbus
from commandbus import _native

ROOT = Path(__file__).resolve().parents[2]


def test_version_of_the_package_the_native_module_and_the_metadata_agree() -> None:
    assert commandbus.__version__ == _native.__version__
    assert commandbus.__version__ == metadata.version("reliable-commands")


def test_the_version_is_written_only_in_cargo_toml() -> None:
    if not (ROOT / "Cargo.toml").is_file():
        pytest.skip("no source tree next to the tests (run against an installed wheel)")
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    for member in ("rust/core", "rust/py"):
        package = tomllib.loads((ROOT / member / "Cargo.toml").read_text())["package"]
        assert package["version"] == {"workspace": True}, member
    assert commandbus.__version__ == cargo["workspace"]["package"]["version"]
