"""The shape of the code: rlhf_core's subpackages are layers (each imports only from the layers
below it, in the order the package docstring and ARCHITECTURE.md give; nothing imports the UI),
every public function says what it does, and no module or class outgrows what one can read."""
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


def test_every_public_function_and_class_says_what_it_does():
    missing = []
    for path in sorted(ROOT.rglob("*.py")):
        def visit(body, prefix=""):
            for node in body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                    if not ast.get_docstring(node):
                        missing.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {prefix}{node.name}")
                    if isinstance(node, ast.ClassDef):
                        visit(node.body, node.name + ".")
        visit(ast.parse(path.read_text()).body)
    assert not missing, "no docstring:\n" + "\n".join(missing)


def test_no_module_or_class_grows_past_its_budget():
    """~400 lines a module and ~250 a class (a little slack), so a newcomer can read one at a time."""
    too_big = []
    for path in sorted([*ROOT.rglob("*.py"), *(ROOT.parent / "ui").glob("*.py")]):
        text = path.read_text()
        if text.count("\n") > 440:
            too_big.append(f"{path.relative_to(ROOT.parent)}: {text.count(chr(10))} lines")
        for node in ast.parse(text).body:
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 290:
                too_big.append(f"{path.relative_to(ROOT.parent)}: class {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert not too_big, "\n".join(too_big)
