"""The repo's own promises: the README's commands are what CI and the Dockerfile run."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def readme_command_lines() -> list[str]:
    """Every command line of the README's bash blocks, trailing comments and comment lines left out."""
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    lines = (re.sub(r"\s+#.*$", "", line).strip() for block in blocks for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def the_one(lines: list[str], what: str) -> str:
    assert len(lines) == 1, f"the README should have one {what} command, found {lines}"
    return lines[0]


def readme_install_command() -> str:
    """The line that installs (`pip install -e`) and runs the pipeline (` && dvc repro`)."""
    lines = [line for line in readme_command_lines() if "pip install -e" in line and line.endswith(" && dvc repro")]
    return the_one(lines, "install")


def readme_test_command() -> str:
    """The line that runs the full suite: `python -m pytest` with no marker selection (`-m`)."""
    lines = [
        line
        for line in readme_command_lines()
        if "python -m pytest" in line and "-m" not in line.split("python -m pytest", 1)[1].split()
    ]
    return the_one(lines, "full-suite test")


def test_dockerfile_installs_the_way_the_readme_does():
    install = readme_install_command()
    assert install.endswith(" && dvc repro")
    install_only = install.removesuffix(" && dvc repro")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"RUN {install_only}\n" in dockerfile
    assert 'CMD ["dvc", "repro"]' in dockerfile
    assert re.search(r"^ARG BASE=", dockerfile, flags=re.M)  # the GPU variant swaps the base image


def test_ci_runs_the_readme_test_command():
    test_command = readme_test_command().split("&& ", 1)[1]
    assert "python -m pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_source_folder_is_not_a_package():
    assert not (ROOT / "ssl" / "__init__.py").exists()  # it would shadow the standard ssl module
