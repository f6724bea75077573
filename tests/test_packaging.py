"""Every module the library imports is declared in pyproject.toml.

The fast check of what `.ci/run` checks for real (the demo in a fresh virtual environment without
extras): a top-level import of `sftrl_jax` that only an extra happens to install breaks the main command.
Imports inside functions may name an extra's package when the function says so (the `tfds` source).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "orbax": "orbax-checkpoint", "math_verify": "math-verify",
                "tensorflow_datasets": "tensorflow-datasets", "jaxlib": "jax"}
# imported lazily inside a function, from the named extra only
LAZY_FROM_EXTRA = {"tensorflow-datasets": "tfds", "libtpu": "aot", "jax-cuda12-plugin": "aot",
                   "tensorboardx": "tensorboard", "wandb": "wandb",  # metric sinks named in logging.sinks
                   "torch": "crosscheck", "trl": "crosscheck"}  # `sftrl-jax crosscheck run`


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level) for every absolute import in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(name.split(".")[0], id(node) in top_level) for name in names]
    return found


def test_every_imported_package_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(d) for d in project["dependencies"]}
    extras = {extra: {_name(d) for d in deps} for extra, deps in project["optional-dependencies"].items()}
    undeclared = []
    for path in sorted((ROOT / "sftrl_jax").rglob("*.py")):
        for module, at_module_level in _imports(path):
            if module in sys.stdlib_module_names or module in ("sftrl_jax", "__future__"):
                continue
            dist = DISTRIBUTION.get(module, module).lower().replace("_", "-")
            if dist in declared:
                continue
            extra = LAZY_FROM_EXTRA.get(dist)
            if not at_module_level and extra is not None and dist in extras.get(extra, set()):
                continue
            undeclared.append(f"{path.relative_to(ROOT)}: {module}")
    assert not undeclared, "imported but not in [project] dependencies: " + ", ".join(undeclared)
