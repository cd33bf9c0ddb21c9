"""The package's imports point one way: down the layers below, with no cycle.

The layers (lowest first) are the ones of docs/design.md; a module may import from its own
layer or any layer below it, never above. An import inside a function (deferred, to keep the
command line light) obeys the same rule. A new module must be given a layer here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hydralora"
LAYERS = [
    # support: stdlib, yaml, huggingface_hub; every command's options (light: no torch)
    ["errors", "readers", "files", "folders", "dist", "options", "cards", "hub", "commands", "commands.common",
     "commands.evaluate", "commands.export", "commands.analyze", "commands.info", "commands.demo",
     "commands.compare"],
    ["config", "train", "train.config", "train.arguments", "info"],  # HydraLoraConfig, presets; train's options; `info`
    ["routing", "routing.router"],  # core: gates, router losses and statistics
    ["routing.context"],  # core: the routing context of one forward
    ["fused"],  # core: the common configuration's autograd Function
    ["layer"],  # core: the math
    ["model", "__init__", "peft_method"],  # core: inject/remove/save/load; the public API; PEFT's method
    ["data", "data.sources", "data.records", "data.tokenize", "data.builtin", "data.conflict", "data.words",
     "base_models"],
    ["clustering", "clustering.kmeans", "clustering.choose_k", "routing.stats", "routing.labels",
     "routing.requests"],
    ["eval", "eval.loss", "eval.generation", "eval.sandbox", "eval._guard", "eval.metrics",
     "routing.fixed"],
    ["methods", "methods.base", "methods.hydralora", "methods.peft_lora", "methods.lora_split"],
    ["eval.run", "train.output", "train.integration", "train.trainer", "train.run",
     "train.per_domain", "train.sharding", "train.tracking", "analysis", "export", "compare", "compare.runs",
     "compare.report",
     "integrations", "integrations.trl", "integrations.lm_eval"],  # optional: trl, lm_eval
    ["demo"],
    ["cli", "__main__"],
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def resolve(importer: str, path: Path, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules an import statement reaches (`from . import x` may name a module)."""
    known = modules()
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name.split(".")[0] == "hydralora"]
        return [n.removeprefix("hydralora").lstrip(".") or "__init__" for n in names]
    if node.level == 0:
        if not (node.module or "").startswith("hydralora"):
            return []
        base = node.module.removeprefix("hydralora").lstrip(".")
    else:
        package = importer.split(".") if path.name == "__init__.py" and importer != "__init__" else importer.split(".")[:-1]
        if importer == "__init__":
            package = []
        package = package[: len(package) - (node.level - 1)] if node.level > 1 else package
        base = ".".join(package + ([node.module] if node.module else []))
    targets = []
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        targets.append(sub if sub in known else (base or "__init__"))
    return targets


def import_graph() -> dict[str, list[tuple[str, int, bool]]]:
    """{module: [(imported module, line, at module top)]} for imports inside the package,
    deferred ones (inside functions) included."""
    graph = {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))
        top = {id(n) for n in tree.body}
        for n in tree.body:  # `if TYPE_CHECKING:` and try/except at top level count as top
            if isinstance(n, (ast.If, ast.Try)):
                top |= {id(c) for c in ast.walk(n)}
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in resolve(name, path, node):
                    edges.append((target, node.lineno, id(node) in top))
        graph[name] = edges
    return graph


def test_every_module_has_a_layer():
    missing = sorted(set(modules()) - set(LAYER_OF))
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


def test_every_import_names_a_module_of_the_package():
    unknown = [f"{m}:{line} imports {t}" for m, edges in import_graph().items()
               for t, line, _ in edges if t not in modules()]
    assert not unknown, "\n".join(unknown)


def test_command_targets_point_down_from_the_cli():
    """The command line imports what runs a command by name ("module:function") when it runs;
    each such module exists, has the function and lies below the command line."""
    import importlib

    from hydralora.cli import COMMANDS

    targets = [t for _, _, t in COMMANDS] + ["hydralora.data.builtin:run_builtin_data",
                                             "hydralora.train.run:run_training"]
    for target in targets:
        module, _, function = target.partition(":")
        name = module.removeprefix("hydralora.")
        assert LAYER_OF[name] < LAYER_OF["cli"], target
        assert callable(getattr(importlib.import_module(module), function)), target


def test_imports_point_down_the_layers():
    upward = [f"{m} (layer {LAYER_OF[m]}) imports {t} (layer {LAYER_OF[t]}), line {line}"
              for m, edges in import_graph().items() for t, line, _ in edges
              if t in LAYER_OF and m in LAYER_OF and LAYER_OF[t] > LAYER_OF[m]]
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    graph = {m: sorted({t for t, _, _ in edges if t != m}) for m, edges in import_graph().items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph,expected", [
    ({"a": ["b"], "b": ["c"], "c": ["a"]}, True),
    ({"a": ["b"], "b": ["c"], "c": []}, False),
])
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert (find_cycle(graph) is not None) == expected


def test_no_module_is_too_long():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these modules (over 400 lines): {long}"


HEAVY = ("torch", "transformers", "peft", "sklearn", "matplotlib")


def imported_modules(*argv: str) -> set[str]:
    """The top-level modules that `python -X importtime -m hydralora ARGV` imported."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "hydralora", *argv],
                         capture_output=True, text=True, timeout=120)
    names = set()
    for line in run.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"],
                                  ["export", "--help"], ["compare", "--help"], ["data", "builtin", "--help"]],
                         ids=" ".join)
def test_help_imports_no_heavy_library(argv):
    """`hydralora --help` and every `hydralora COMMAND --help` answer without torch,
    transformers, PEFT, scikit-learn or matplotlib (python -X importtime shows each import)."""
    from hydralora.cli import build_parser

    if argv[0] not in {a for a in build_parser()._subparsers._group_actions[0].choices} | {"--help"}:
        pytest.skip(f"no {argv[0]} command")
    names = imported_modules(*argv)
    assert names and not names & set(HEAVY), sorted(names & set(HEAVY))


def test_info_and_route_import_only_what_they_use(tmp_path):
    """`hydralora info` reads an adapter folder with JSON and numpy; `hydralora route` needs
    scikit-learn's TF-IDF, not torch, transformers or PEFT."""
    import json

    from torch import nn

    from hydralora import HydraLoraConfig, add_hydralora, save_adapter
    from hydralora.clustering.kmeans import ClusterModel

    model = nn.Sequential()
    model.add_module("proj", nn.Linear(8, 8))
    add_hydralora(model, HydraLoraConfig(r=2, num_heads=2, target_modules=["proj"], init_heads="random"))
    save_adapter(model, tmp_path / "adapter")
    names = imported_modules("info", str(tmp_path / "adapter"))
    assert "numpy" in names and not names & {"torch", "transformers", "peft", "sklearn", "matplotlib"}

    folder = tmp_path / "split"
    ClusterModel.fit(["add two numbers", "sum of digits", "write a poem", "a song about rain"] * 3,
                     2, seed=0).save(folder)
    (folder / "lora_split.json").write_text(json.dumps({"adapters": ["math", "poems"]}))
    names = imported_modules("route", "--adapter", str(folder), "--prompt", "add 2 and 3")
    assert "sklearn" in names and not names & {"torch", "transformers", "peft", "matplotlib"}
