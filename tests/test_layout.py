"""The package layout as utils/__init__.py states it: its module list and which utils modules
models/ and datasets/ import."""
import ast
import re
from pathlib import Path

import utils

ROOT = Path(__file__).resolve().parent.parent

# What utils/__init__.py says models/ and datasets/ import, besides errors, files and logs.
EXTRA = {"models/distill.py": {"device", "distributed"}, "datasets/loader.py": {"distributed"},
         "datasets/poison.py": {"fingerprint"}, "datasets/demo.py": {"cli"}, "datasets/attack.py": {"cli"}}


def utils_imports(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("utils."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("utils."))
    return names


def test_utils_docstring_lists_exactly_its_modules():
    listed = set(re.findall(r"^    (\w+)  ", utils.__doc__, flags=re.M))
    present = {p.stem for p in (ROOT / "utils").glob("*.py")} - {"__init__"}
    assert listed == present


def test_models_and_datasets_import_only_what_utils_docstring_says():
    found = {}
    for package in ("models", "datasets"):
        for path in sorted((ROOT / package).glob("*.py")):
            extra = utils_imports(path) - {"errors", "files", "logs"}
            if extra:
                found[f"{package}/{path.name}"] = extra
    assert found == EXTRA
    for name, modules in EXTRA.items():
        assert name in utils.__doc__ and all(m in utils.__doc__ for m in modules)
