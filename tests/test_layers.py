"""rlhf_core's subpackages are layers: each imports only from the layers below it (the
order the package docstring and ARCHITECTURE.md give), and nothing in it imports the UI."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "rlhf_core"
LAYERS = ["clinical", "model", "rollout", "storage", "training", "reward"]  # bottom up; top level above all


def _layer(module: str) -> int:
    """Position of a dotted ``rlhf_core`` module name's layer (top-level modules: above all)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def _imports(path: Path) -> list[str]:
    """Every rlhf_core module (or package) ``path`` imports, as absolute dotted names."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            targets = [name] if node.module else [f"{name}.{a.name}" for a in node.names]
            found += [t for t in targets if t.startswith("rlhf_core") or t.startswith("ui")]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith(("rlhf_core", "ui"))]
    return found


def test_each_layer_imports_only_from_below():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        for target in _imports(path):
            if target.startswith("ui"):
                wrong.append(f"{module} imports the UI ({target})")
            elif target.count(".") >= 1 and _layer(target) > _layer(module):
                wrong.append(f"{module} imports {target}, a layer above it")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_imports():
    """The walker resolves relative imports (so the layer test cannot pass by seeing nothing)."""
    found = _imports(ROOT / "rollout" / "generation.py")
    assert "rlhf_core.clinical.cases" in found and "rlhf_core.rollout.records" in found
    assert any(t.startswith("rlhf_core.training") for t in _imports(ROOT / "reward" / "reward_model.py"))
