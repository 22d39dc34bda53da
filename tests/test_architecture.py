"""The shape of the code, checked: no import cycle among ``mano_dist`` and ``launch`` modules
(function-local imports included: they hide cycles, they do not remove them), and the product
never imports the studies or the one-off measurements, which the wheel does not ship."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mano_dist", "launch")
OUTSIDE_PRODUCT = ("launch.studies", "launch.measure")


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


MODULES = _modules()


def _known(name: str | None) -> str | None:
    """The module (or package) an import of ``name`` loads, within our packages."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    path, is_package = MODULES[module]
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(filter(None, (_known(alias.name) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:  # ``from pkg import submodule`` loads the submodule
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                found.update(filter(None, [_known(target)]))
    found.discard(module)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_cycle_finder_finds_a_hidden_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    # and it reads function-local and relative imports: the real graph has known edges
    assert "launch.trainer.loop" in GRAPH["launch.train"]
    assert "launch.config" in GRAPH["launch.studies.update_rms"] and "launch.trainer.loop" in GRAPH["launch.studies.update_rms"]


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_the_product_imports_no_study_or_measurement():
    def outside(module):
        return module.startswith(OUTSIDE_PRODUCT)

    wrong = {m: sorted(t for t in targets if outside(t)) for m, targets in GRAPH.items() if not outside(m)}
    assert {m: t for m, t in wrong.items() if t} == {}


def test_the_data_pipeline_does_not_import_the_trainer():
    assert {m: sorted(t for t in GRAPH[m] if t.startswith("launch.trainer")) for m in GRAPH
            if m.startswith("launch.data")} == {m: [] for m in GRAPH if m.startswith("launch.data")}


@pytest.mark.slow
def test_the_wheel_ships_the_product_without_studies_or_measurements(tmp_path):
    source = tmp_path / "src"  # a copy: building in the checkout would leave build/ there
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("mano_dist", "launch"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("mano_dist-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "launch/train.py" in names and "launch/trainer/loop.py" in names and "launch/data/loader.py" in names
    assert "mano_dist/optimizer.py" in names
    assert [n for n in names if n.startswith(("launch/studies/", "launch/measure/"))] == []
