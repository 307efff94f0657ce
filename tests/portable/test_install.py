"""`install_command`: the hint every "not installed" message carries follows how dsv4 was installed
(dsv4 is not on a package index, so `pip install 'dsv4[mlx]'` would fail)."""

import json
import shlex
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from dsv4.portable import install
from dsv4.portable.install import install_command

REQUIRES = ['numpy>=1.26', 'mlx[cpu]>=0.25; sys_platform == "linux" and extra == "mlx"',
            'mlx>=0.25; sys_platform == "darwin" and extra == "mlx"', 'torch>=2.4; extra == "cuda"',
            'fastapi>=0.110; extra == "serve"', 'uvicorn>=0.29; extra == "serve"',
            'nothing-here>=1; sys_platform == "no-such-os" and extra == "serve"',
            'dsv4[cuda,serve]; extra == "all"']


class FakeDist:
    def __init__(self, direct_url=None, requires=REQUIRES):
        self.direct_url, self.requires = direct_url, requires

    def read_text(self, name):
        assert name == "direct_url.json"
        return None if self.direct_url is None else json.dumps(self.direct_url)


@pytest.fixture
def installed(monkeypatch):
    """installed(*dists): make these the distributions named dsv4 on the path, in order."""
    def use(*dists):
        monkeypatch.setattr(install.metadata, "distributions", lambda name: list(dists))
    return use


def test_editable_clone_reinstalls_the_clone_with_the_extra(installed):
    installed(FakeDist({"dir_info": {"editable": True}, "url": "file:///home/me/src/dsv4"}))
    assert install_command("mlx") == "pip install -e '/home/me/src/dsv4[mlx]'"


def test_a_path_with_spaces_stays_one_shell_word(installed):
    installed(FakeDist({"dir_info": {"editable": True}, "url": "file:///home/me/my%20code/dsv4"}))
    cmd = install_command("serve")
    assert shlex.split(cmd) == ["pip", "install", "-e", "/home/me/my code/dsv4[serve]"]


def test_directory_install_without_editable(installed):
    installed(FakeDist({"dir_info": {}, "url": "file:///opt/dsv4"}))
    assert install_command("onnx") == "pip install '/opt/dsv4[onnx]'"


def test_wheel_install_gets_the_extras_requirements_for_this_machine(installed):
    installed(FakeDist({"archive_info": {}, "url": "file:///tmp/dsv4-0.1.0-py3-none-any.whl"}))
    assert install_command("serve") == "pip install 'fastapi>=0.110' 'uvicorn>=0.29'"
    mlx = install_command("mlx")
    assert mlx == ("pip install 'mlx[cpu]>=0.25'" if sys.platform == "linux" else
                   "pip install 'mlx>=0.25'" if sys.platform == "darwin" else "pip install ")
    assert install_command("all") == "pip install 'torch>=2.4' 'fastapi>=0.110' 'uvicorn>=0.29'"


def test_a_shadowing_egg_info_does_not_hide_the_recorded_origin(installed):
    """Running from the checkout puts its `dsv4.egg-info` (no direct_url.json) first on the path."""
    installed(FakeDist(None), FakeDist({"dir_info": {"editable": True}, "url": "file:///w/dsv4"}))
    assert install_command("cuda") == "pip install -e '/w/dsv4[cuda]'"


def test_without_installed_metadata_the_source_tree_is_named(installed):
    installed()
    tree = next(p for p in (install.PACKAGE_DIR, *install.PACKAGE_DIR.parents) if (p / "pyproject.toml").is_file())
    assert install_command("mlx") == f"pip install -e {shlex.quote(f'{tree}[mlx]')}"


def test_the_real_installation_gets_a_usable_command():
    """This machine's dsv4, whichever way it was installed: a source directory holding this very package,
    or requirements pip can parse."""
    words = shlex.split(install_command("serve"))
    assert words[:2] == ["pip", "install"] and len(words) > 2
    if words[-1].endswith("[serve]"):
        tree = Path(words[-1][:-len("[serve]")])
        assert (tree / "pyproject.toml").is_file() and tree in (install.PACKAGE_DIR, *install.PACKAGE_DIR.parents)
    else:
        assert {Requirement(w).name for w in words[2:]} >= {"fastapi", "uvicorn"}
