"""The repo's own promises: the README's commands are what CI and the Dockerfile run."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_dockerfile_installs_the_way_the_readme_does():
    install = readme_commands()[0]
    assert install.endswith(" && dvc repro")
    install_only = install.removesuffix(" && dvc repro")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"RUN {install_only}\n" in dockerfile
    assert 'CMD ["dvc", "repro"]' in dockerfile
    assert re.search(r"^ARG BASE=", dockerfile, flags=re.M)  # the GPU variant swaps the base image


def test_ci_runs_the_readme_test_command():
    test_command = readme_commands()[1].split("&& ", 1)[1]
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_source_folder_is_not_a_package():
    assert not (ROOT / "ssl" / "__init__.py").exists()  # it would shadow the standard ssl module
