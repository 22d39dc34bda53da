"""What pyproject.toml promises holds: the Python and torch floors, and timeouts that agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_python_floor_agrees_with_readme_and_tomllib_fallback():
    floor = PYPROJECT["project"]["requires-python"]
    assert floor == ">=3.10"
    assert "Python >= 3.10" in (ROOT / "README.md").read_text()
    # tomllib is 3.11+: 3.10 gets tomli, declared for exactly those Pythons
    assert "tomli>=1.1; python_version < '3.11'" in PYPROJECT["project"]["dependencies"]


def test_without_torch_optim_muon_everything_but_the_muon_baselines_works():
    """torch < 2.9 has no torch.optim.Muon: the trainer, planner and baselines still import, and
    asking for Muon says what is needed (simulated by removing the class)."""
    code = """
import torch
del torch.optim.Muon
import launch.trainer.loop, launch.plan, launch.studies.compare
from torch import nn
from mano_dist.baselines import build_optimizer
from launch.config import ConfigError, load_config
model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))
for name in ("mano", "adamw", "muonmax", "momo-mano", "momo-muonmax"):
    build_optimizer(name, model)
for name in ("muon", "momo-muon"):
    try:
        build_optimizer(name, model)
    except ImportError as e:
        assert "torch >= 2.9" in str(e), e
    else:
        raise AssertionError(name)
    try:
        load_config(None, [f"optim.name={name}"])
    except ConfigError as e:
        assert "torch >= 2.9" in str(e), e
    else:
        raise AssertionError(name)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_pytest_timeout_is_above_every_timeout_a_test_sets():
    """A test's own timeout (clear message: which process, its traceback) must fire before
    pytest-timeout kills the worker."""
    limit = PYPROJECT["tool"]["pytest"]["ini_options"]["timeout"]
    own = {f"{p.name}: timeout={n}": int(n) for p in (ROOT / "tests").glob("*.py")
           for n in re.findall(r"\btimeout=(\d+)", p.read_text())}
    assert own and max(own.values()) < limit, (limit, own)
