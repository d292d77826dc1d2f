"""The shape of the package: reference docstrings that run, one-way imports, short functions, and
the same compression flags on every command."""

import ast
import contextlib
import doctest
import importlib
import inspect
import io
import pkgutil
from pathlib import Path

import pytest

import actprune
from actprune.cli import build_parser, prune_configs
from actprune.config import PRESETS, PruneConfig

SRC = Path(actprune.__file__).parent
# Modules that import triton at import time, or run the CLI when imported.
NOT_IMPORTED = {"actprune.kernels.triton_blocks", "actprune.__main__"}
MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages([str(SRC)], prefix="actprune.")
    if m.name not in NOT_IMPORTED
)
# Modules registering an optional library's layers: tested where the library is installed.
OPTIONAL = {"actprune.integrations.hf": "transformers", "actprune.integrations.timm": "timm"}
# The library proper: nothing here may import a model, the data, the training loop or the CLI.
CORE = {
    "actprune.attention",
    "actprune.bitpack",
    "actprune.checkpoint",
    "actprune.blocksparse",
    "actprune.config",
    "actprune.convert",
    "actprune.derivative_code",
    "actprune.dropout",
    "actprune.kernels",
    "actprune.kernels.reference",
    "actprune.kernels.triton_blocks",
    "actprune.layers",
    "actprune.memory",
    "actprune.norm_input",
    "actprune.norms",
    "actprune.ops",
    "actprune.rng",
    "actprune.rowcode",
    "actprune.storage",
    "actprune.swiglu",
}


@pytest.mark.parametrize("name", ["actprune", *MODULES])
def test_doctests_pass(name):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name], reason=f"optional {OPTIONAL[name]} not installed")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False, report=True)
    assert result.failed == 0


def test_doctests_exist():
    finder = doctest.DocTestFinder()
    count = sum(
        len(t.examples)
        for name in MODULES
        if name not in OPTIONAL
        for t in finder.find(importlib.import_module(name))
    )
    assert count >= 60  # the reference docstrings' examples are collected, not silently skipped


@pytest.mark.parametrize("name", actprune.__all__)
def test_public_names_have_reference_docstrings(name):
    obj = getattr(actprune, name)
    doc = inspect.getdoc(obj) or ""
    assert "Example:" in doc, f"{name}: no Example section"
    if inspect.isclass(obj):
        assert "Args:" in doc or "Attributes:" in doc, f"{name}: no Args or Attributes section"
        return
    assert "Returns:" in doc, f"{name}: no Returns section"
    params = [p for p in inspect.signature(obj).parameters.values() if p.name != "self"]
    assert not params or "Args:" in doc, f"{name}: no Args section"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every module's imports of actprune modules, at any depth in the file (lazy ones too)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                for alias in node.names:  # `from . import submodule` imports the submodule
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in modules else target)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("actprune"):
                edges.add(node.module)
        edges.discard(name)
    return graph


def test_no_import_cycle():
    graph = _imports()
    assert graph["actprune.layers"] and graph["actprune.kernels"]  # the walk sees imports
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_core_imports_no_model_data_or_app():
    graph = _imports()
    for name in CORE:
        outside = {m for m in graph[name] if m not in CORE}
        assert not outside, f"{name} imports {sorted(outside)}"


def test_no_function_longer_than_60_lines():
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(SRC)}:{node.name} ({lines} lines)")
    assert not long


COMMANDS = [["train"], ["compare"], ["bench", "memory"], ["bench", "kernels"], ["plan"]]
FLAGS = {"--preset", "--exclude"} | {
    "--" + name.replace("_", "-") for name in PruneConfig.__dataclass_fields__
}


def _subparser(command):
    parser = build_parser()
    for word in command:
        action = next(a for a in parser._actions if a.choices and word in a.choices)
        parser = action.choices[word]
    return parser


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_takes_the_same_compression_flags_and_defaults(command):
    parser = _subparser(command)
    group = next(g for g in parser._action_groups if g.title == "compression (PruneConfig)")
    assert {s for a in group._group_actions for s in a.option_strings} == FLAGS
    help_text = parser.format_help()
    assert all(flag in help_text for flag in FLAGS)
    args = build_parser().parse_args(command)
    assert prune_configs(args) == [PruneConfig.preset("recommended")]
    assert args.exclude == "head"


def test_presets_and_the_cli_preset_flag():
    assert PruneConfig.preset("paper") == PruneConfig(0.9, 32, selection="global")
    assert PruneConfig.preset("blocks") == PruneConfig(0.9, 32, scope="all", remainder_bits=4)
    assert PruneConfig.preset("uniform") == PruneConfig(1.0, 32, scope="all", remainder_bits=4)
    assert PruneConfig.preset("recommended") == PruneConfig.preset("uniform")
    assert PruneConfig.preset("transformer") == PruneConfig.preset(
        "uniform", remainder_bits=8, norm_bits=8, attention_bits=8, swiglu_bits=8
    )
    assert set(PRESETS) == {"paper", "blocks", "uniform", "recommended", "transformer"}
    with pytest.raises(ValueError, match="unknown preset 'fast'; available: paper, blocks"):
        PruneConfig.preset("fast")
    args = build_parser().parse_args(["compare", "--preset", "paper", "--sparsity", "0.8", "0.5"])
    assert prune_configs(args) == [PruneConfig.preset("paper", sparsity=s) for s in (0.8, 0.5)]
    args = build_parser().parse_args(["bench", "kernels", "--preset", "recommended", "paper"])
    assert prune_configs(args) == [PruneConfig.preset(n) for n in ("recommended", "paper")]
    args = build_parser().parse_args(
        ["bench", "memory", "--preset", "blocks", "--int8", "--block-size", "16x32"]
    )
    assert prune_configs(args) == [PruneConfig.preset("blocks", int8=True, block_size=(16, 32))]
    args = build_parser().parse_args(
        ["plan", "--preset", "blocks", "--int8", "false", "true", "--scope", "linear"]
    )
    assert [c.int8 for c in prune_configs(args)] == [False, True]
    args = build_parser().parse_args(
        ["train", "--sparsity", "0.9", "--int8", "--remainder-bits", "0"]
    )
    assert prune_configs(args) == [PruneConfig(0.9, 32, scope="all", int8=True)]


def test_help_runs_for_every_command():
    for command in [[], *COMMANDS]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit:
            build_parser().parse_args([*command, "--help"])
        assert exit.value.code == 0 and "usage: actprune" in out.getvalue()


def test_config_serialisation_round_trips():
    for config in (
        PruneConfig(0.7, (8, 16), "max", "batch-major", "global", int8=True),
        PruneConfig.preset("recommended"),
    ):
        assert PruneConfig.from_dict(config.to_dict()) == config
        assert PruneConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown PruneConfig fields: speed"):
        PruneConfig.from_dict({"sparsity": 0.5, "speed": 2})
    grid = [
        PruneConfig(s, b, scope=sc, int8=q, remainder_bits=r, selection=sel)
        for s in (0.5, 0.9)
        for b in (16, 32)
        for sc in ("linear", "all")
        for q in (False, True)
        for r in (0, 4)
        for sel in ("column", "global")
    ]
    assert len({c.label() for c in grid}) == len(grid)  # a label names one configuration
