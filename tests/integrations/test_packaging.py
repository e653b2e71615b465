"""The wheel installs the package and its adapters; imports work from outside the repository."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_and_every_adapter_imports_outside_the_repo(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True,
                   cwd=tmp_path)
    wheel = next(wheels.glob("archopt_plugins-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, cwd=tmp_path)
    script = (
        "import archopt_plugins, importlib, pathlib\n"
        f"assert pathlib.Path(archopt_plugins.__file__).is_relative_to({str(site)!r}), archopt_plugins.__file__\n"
        "for sub in ('integrations', 'integrations.hf', 'integrations.deepspeed', 'integrations.megatron',\n"
        "            'integrations.accelerate', 'roles', 'planner', 'update', 'shard', 'optim', 'monitor', 'recipe',\n"
        "            'cli'):\n"
        "    importlib.import_module('archopt_plugins.' + sub)\n"
        "print(archopt_plugins.available_optimizers())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={"PYTHONPATH": str(site)},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "muon" in out.stdout


def test_pyproject_lists_every_subpackage():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "archopt_plugins").rglob("__init__.py")}
    found |= {"archopt_plugins." + ".".join(p.parent.relative_to(ROOT).parts)
              for p in (ROOT / "integrations").rglob("__init__.py")}
    assert found == listed
