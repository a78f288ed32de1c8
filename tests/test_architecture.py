"""The code's shape: imports point one way (scripts -> common -> lower modules of common), no cycle, no script
imports another (bench.py runs method scripts' main()), no module over its size budget; and a checkpoint file is a
function of its tensors alone."""
import ast
import hashlib
import re
from pathlib import Path

import pytest
import torch

import common
from conftest import ROOT

SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py"))
MODULES = [line.split()[0].removesuffix(".py") for line in common.__doc__.splitlines()
           if line.startswith("    ") and line.split()[0].endswith(".py")]


def _imports(path: Path, package: str | None) -> set[str]:
    """The project modules a file imports anywhere in it: scripts by name, common's modules as common.NAME."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: inside the package
                names = [f"{package}.{base}" if base else f"{package}.{a.name}" for a in node.names]
            else:
                names = [base]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in SCRIPTS:
                found.add(top)
            elif top == "common":
                found.add(name if name.startswith("common.") and name.split(".")[1] in MODULES else "common")
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {script: _imports(ROOT / f"{script}.py", None) for script in SCRIPTS}
    graph["common"] = _imports(ROOT / "common" / "__init__.py", "common")
    for module in MODULES:
        graph[f"common.{module}"] = _imports(ROOT / "common" / f"{module}.py", "common")
    return graph


def test_every_module_of_the_package_is_in_its_map():
    on_disk = {p.stem for p in (ROOT / "common").glob("*.py")} - {"__init__"}
    assert on_disk == set(MODULES)


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_modules_of_the_package_import_only_modules_listed_above_them():
    graph = import_graph()
    for rank, module in enumerate(MODULES):
        imported = graph[f"common.{module}"]
        assert "common" not in imported and not imported & set(SCRIPTS), (module, imported)
        higher = {f"common.{m}" for m in MODULES[rank:]}
        assert not imported & higher, f"common.{module} imports {sorted(imported & higher)}, at or above it in the map"


def test_scripts_import_only_common_and_bench_only_method_scripts():
    graph = import_graph()
    for script in SCRIPTS:
        scripts = graph[script] & set(SCRIPTS)
        if script == "bench":
            assert "common" in graph[script] and not scripts & {"reproduce", "audit", "evaluate", "bench"}, scripts
            # It runs their main(); a script's constants read here would mean a pipeline rebuilt beside the script's.
            used = set(re.findall(r"\b([a-z_]+)\.([A-Z][A-Z_0-9]*)\b", (ROOT / "bench.py").read_text()))
            assert not {(name, constant) for name, constant in used if name in scripts}, used
        else:
            assert not scripts, f"{script}.py imports {sorted(scripts)}"
            assert graph[script] <= {"common"}, f"{script}.py imports {sorted(graph[script] - {'common'})}"


@pytest.mark.parametrize("folder, limit", [("common", 400), (".", 600), ("tests", 600)])
def test_no_file_is_over_its_size_budget(folder, limit):
    for path in (ROOT / folder).glob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= limit * 1.1, f"{path.relative_to(ROOT)} has {lines} lines (budget about {limit})"


def test_a_checkpoint_file_depends_on_its_tensors_alone(tmp_path, data_dir):
    """Equal weights give equal files (and weights_sha256): safetensors' header keys would otherwise come out in
    an order that varies from run to run."""
    info = common.DATASETS["fashion-mnist"]
    torch.manual_seed(0)
    model = common.build_model("resnet_tiny", info)
    data = common.make_data("fashion-mnist", data_dir, train_subset=100, forget_class=3)
    hashes = set()
    for i in range(8):
        out = tmp_path / f"m{i}.safetensors"
        meta = common.save_checkpoint(model, out, arch="resnet_tiny", method="original", data=data, config={},
                                      result=None, trainable_params=0)
        assert meta["weights_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
        hashes.add(meta["weights_sha256"])
    assert len(hashes) == 1
