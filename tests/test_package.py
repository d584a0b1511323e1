"""What importing acm_d2 does: the layers without Detectron2, registration with it; config.py is a leaf."""

import ast
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

WITHOUT_DETECTRON2 = """
import sys
sys.modules["detectron2"] = None  # `import detectron2` now raises ImportError, as where it is not installed
import torch
from acm_d2.layers import AttendAndCompare, SqueezeExcite
acm = AttendAndCompare(64, num_groups=8).train()
y = acm(torch.randn(2, 64, 6, 7))
assert y.shape == (2, 64, 6, 7) and acm.orth_term.shape == (2,)
assert not any(m.startswith("detectron2") for m in sys.modules if sys.modules[m] is not None)
import acm_d2
try:
    acm_d2.add_acm_config
except ImportError as e:
    assert "needs Detectron2" in str(e)
else:
    raise AssertionError("add_acm_config without Detectron2")
print("LAYERS-OK")
"""


def test_layers_work_without_detectron2():
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_DETECTRON2],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0 and "LAYERS-OK" in proc.stdout, proc.stderr[-3000:]


def test_import_registers_everything_with_detectron2():
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    import acm_d2  # noqa: F401
    from acm_d2.modeling import CONTEXT_BACKBONES, CONTEXT_MODULE_REGISTRY

    assert set(CONTEXT_BACKBONES) <= {name for name, _ in BACKBONE_REGISTRY}
    assert len(CONTEXT_BACKBONES) == 3
    assert "ACMGeneralizedRCNN" in {name for name, _ in META_ARCH_REGISTRY}
    assert {name for name, _ in CONTEXT_MODULE_REGISTRY} == {"none", "ACM", "SE", "GC", "NL", "CC"}


def test_config_imports_no_modeling_code():
    """config.py is the bottom of the stack: it imports the layers' constants, never acm_d2.modeling."""
    tree = ast.parse((REPO / "acm_d2" / "config.py").read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    ]
    assert not [m for m in imported if "modeling" in m], imported


def test_unknown_context_module_fails_at_build_naming_the_registered_ones():
    import pytest
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    from acm_d2 import add_acm_config

    cfg = get_cfg()
    add_acm_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_acm_resnet_backbone"
    cfg.MODEL.CONTEXT_MODULE = "SK"
    with pytest.raises(
        ValueError,
        match=r"CONTEXT_MODULE = 'SK' is invalid; allowed: \['ACM', 'CC', 'GC', 'NL', 'SE', 'none'\]",
    ):
        build_backbone(cfg)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    """acm_d2 module -> the acm_d2 modules it imports anywhere in it (at the top or inside a function),
    read from the source. `from pkg import name` counts as importing pkg.name when that is a module."""
    paths = sorted((REPO / "acm_d2").rglob("*.py"))
    modules = {_module_name(p): p for p in paths}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    targets.add(
                        f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    )
        graph[name] = sorted(t for t in targets if t in modules and t != name)
    return graph


def import_cycles(graph: dict) -> list:
    """Each cycle in `graph` once, as the list of modules along it (depth-first search)."""
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycle_among_acm_d2_modules():
    graph = import_graph()
    assert "acm_d2.modeling.checks" in graph["acm_d2.modeling.meta_arch"]  # the graph sees imports
    assert import_cycles(graph) == []


def test_import_cycles_finds_a_cycle():
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    assert import_cycles(graph) == [["a", "b", "c", "a"]]
