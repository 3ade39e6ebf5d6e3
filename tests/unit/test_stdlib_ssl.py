"""The source folder is named `ssl/`: it must never shadow Python's own TLS module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """`python -c code` with the repo root as cwd, so '' (the repo root) is first on sys.path."""
    environment = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=environment
    )


def is_under_repo(path: str) -> bool:
    return Path(path).resolve().is_relative_to(ROOT)


def test_repo_ssl_folder_is_not_a_package() -> None:
    assert (ROOT / "ssl").is_dir()
    assert not (ROOT / "ssl" / "__init__.py").exists()  # a regular package there would win over the stdlib


def test_stdlib_ssl_wins_from_the_repo_root() -> None:
    result = run_python(
        "import ssl, urllib.request\nprint(ssl.__file__)\nprint(ssl.OPENSSL_VERSION)\nssl.create_default_context()\n"
    )
    assert result.returncode == 0, result.stderr
    ssl_file, openssl = result.stdout.splitlines()[:2]
    assert ssl_file and not is_under_repo(ssl_file), ssl_file
    assert Path(ssl_file).name == "ssl.py"
    assert "SSL" in openssl  # the real module: OpenSSL/LibreSSL version string


def test_stdlib_ssl_wins_with_the_repo_on_pythonpath() -> None:
    # Tools (DVC, Ray workers, IDEs) often put the repo root or the source folder on PYTHONPATH.
    paths = os.pathsep.join([str(ROOT), str(ROOT / "ssl")])
    result = run_python("import ssl; print(ssl.__file__); import http.client, ssl as s; s.SSLContext", PYTHONPATH=paths)
    assert result.returncode == 0, result.stderr
    assert not is_under_repo(result.stdout.splitlines()[0])


def test_selfsup_imports_from_the_source_folder() -> None:
    result = run_python("import ssl, selfsup; print(selfsup.__file__); print(selfsup.__version__); print(ssl.__file__)")
    assert result.returncode == 0, result.stderr
    selfsup_file, version, ssl_file = result.stdout.splitlines()[:3]
    assert Path(selfsup_file).resolve() == (ROOT / "ssl" / "selfsup" / "__init__.py").resolve()
    assert version
    assert not is_under_repo(ssl_file)


def test_stdlib_ssl_in_this_process() -> None:
    import ssl

    import selfsup

    assert not is_under_repo(ssl.__file__)
    assert hasattr(ssl, "SSLContext")
    assert is_under_repo(selfsup.__file__)
