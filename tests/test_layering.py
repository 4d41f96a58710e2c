"""The arrows between the three sides run one way: convert -> pudding_mlx, router_coreml ->
pudding_mlx, convert -> router_coreml. The runtime works where torch and convert are absent;
the build's torch steps work where MLX is absent (a GPU machine)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"pudding_mlx": {"convert", "router_coreml", "torch"}, "router_coreml": {"convert"}}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module a file imports (module level or inside functions),
    including `importlib.import_module("...")` with a literal name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value).split(".")[0])
    return names


def test_import_graph_runs_one_way():
    # the scan sees imports at all: convert uses the runtime and the Core ML exporter
    convert_imports = set().union(*(imported_modules(p) for p in (ROOT / "convert").glob("*.py")))
    assert {"pudding_mlx", "router_coreml", "torch"} <= convert_imports
    bad = []
    for package, forbidden in FORBIDDEN.items():
        files = sorted((ROOT / package).rglob("*.py"))  # subpackages too
        assert files
        bad += [(f.relative_to(ROOT).as_posix(), sorted(imported_modules(f) & forbidden))
                for f in files if imported_modules(f) & forbidden]
    assert not bad


def torch_free_path(tmp: Path) -> str:
    """A sys.path folder with every installed package except torch, and this repository's
    pudding_mlx without convert and router_coreml: a machine with only the runtime."""
    import mlx

    site = Path(mlx.__path__[0]).parent
    folder = tmp / "site"
    folder.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("torch", "__editable__", "convert", "router_coreml", "pudding_mlx")):
            continue
        (folder / entry.name).symlink_to(entry)
    (folder / "pudding_mlx").symlink_to(ROOT / "pudding_mlx")
    for dist in site.glob("pudding_mlx-*.dist-info"):  # the `pudding` entry points
        (folder / dist.name).symlink_to(dist)
    return str(folder)


SCRIPT = r"""
import io, json, sys
from pudding_mlx.cli import main

results = {}
for name, argv, stdin in json.loads(sys.argv[1]):
    sys.stdin = io.StringIO(stdin)
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    results[name] = code
for name in ("torch", "convert", "router_coreml"):
    try:
        __import__(name)
        results["import " + name] = "imported"
    except ImportError:
        results["import " + name] = "absent"
results["torch loaded"] = "torch" in sys.modules
print("RESULTS " + json.dumps(results))
"""


def test_runtime_commands_run_without_torch_and_convert(tmp_path):
    from helpers import tiny_bundle, tiny_in_model_bundle
    from test_evaluate import write_data

    import pudding_mlx

    tb = tiny_bundle(tmp_path / "bundle", static=[3, 4])
    in_model = str(tiny_in_model_bundle(tmp_path / "in-model")[0].path)
    data = write_data(tmp_path / "data", n=6)
    b = str(tb.path)
    prompt = "Which gas do plants absorb?"
    commands = [
        ("info", ["info", b], ""),
        ("generate", ["generate", "-b", b, "-p", prompt, "-m", "6"], ""),
        ("chat", ["chat", "-b", b, "-m", "3"], "hello\nhow are you?\n"),
        ("bench", ["bench", "-b", b, "--prompt-lengths", "8", "--gen-lengths", "4",
                   "--trials", "1", "--warmup", "0", "-o", str(tmp_path / "bench")], ""),
        ("eval", ["eval", b, "-o", str(tmp_path / "eval"), "--data-dir", str(data),
                  "--tasks", "piqa", "--methods", "dense,static,pudding", "--limit", "4",
                  "--backend", "mlx"], ""),
        ("fidelity", ["fidelity", b, "-o", str(tmp_path / "fidelity"), "--limit", "2", "-m", "3",
                      "--resamples", "20"], ""),
        ("search (a torch command)", ["search", "--out", str(tmp_path / "c.json")], ""),
        ("in-model info", ["info", in_model], ""),
        ("in-model generate", ["generate", "-b", in_model, "-p", prompt, "-m", "6"], ""),
    ]
    env = {**os.environ, "PYTHONPATH": torch_free_path(tmp_path), "PUDDING_OPENBLAS": "0",
           "TQDM_DISABLE": "1"}
    r = subprocess.run([sys.executable, "-S", "-c", SCRIPT, json.dumps(commands)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(line.removeprefix("RESULTS "))
    assert results == {
        "info": 0, "generate": 0, "chat": 0, "bench": 0, "eval": 0, "fidelity": 0,
        "search (a torch command)": 2,  # a one-line "needs a package that is not installed"
        "in-model info": 0, "in-model generate": 0,
        "import torch": "absent", "import convert": "absent", "import router_coreml": "absent",
        "torch loaded": False,
    }, r.stderr[-3000:]
    # the same text as the runtime where torch is installed
    want = pudding_mlx.load(b).generate(prompt, max_tokens=6)
    assert want and want in r.stdout
    want = pudding_mlx.load(in_model).generate(prompt, max_tokens=6)
    assert want and want in r.stdout and "in-model (a head on the LLM's hidden state" in r.stdout
    assert "needs a package that is not installed" in r.stderr
    assert (tmp_path / "bench" / "bench.json").is_file()
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["backend"] == "mlx" and len(res["methods"]) == 3
    res = json.loads((tmp_path / "fidelity" / "results.json").read_text())
    assert res["n"] == 2 and res["prompts_file"] == "packaged"


MLX_FREE = r"""
import sys
for name in ("mlx", "mlx.core", "mlx.nn", "mlx_lm", "coremltools"):
    sys.modules[name] = None  # an import of any of them fails, as where they are not installed
from convert.build import build

build.main(sys.argv[1:], standalone_mode=False)
print("MLX loaded:", any(m.startswith("mlx") and sys.modules[m] for m in sys.modules))
"""


def test_build_torch_steps_run_without_mlx(tmp_path):
    """`pudding build --until router` (search, labels, router) imports no MLX, so it runs on a
    GPU machine without it; the bundle's conversion is left to a machine with MLX."""
    from helpers import tiny_backbone, tiny_llama, write_task_data

    tiny_llama(tmp_path / "hf", num_layers=4)
    args = ["--model", tmp_path / "hf", "--out", tmp_path / "bundle", "--work", tmp_path / "w",
            "--tasks", "arc_easy", "--losses", "likelihood", "--k", "1", "--samples", "2",
            "--max-examples-per-task", "6", "--epochs", "1", "--batch-size", "4",
            "--warmup-steps", "0", "--backbone", tiny_backbone(tmp_path / "backbone"),
            "--router-max-length", "16", "--torch-dtype", "float32", "--device", "cpu",
            "--data-dir", write_task_data(tmp_path / "data"), "--until", "router"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", MLX_FREE, *map(str, args)], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "MLX loaded: False" in r.stdout
    assert (tmp_path / "w" / "router" / "router" / "model.safetensors").is_file()
    assert not (tmp_path / "bundle").exists()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules a file imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] \
                if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            targets = [module, *(f"{module}.{a.name}" for a in node.names)]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_no_import_cycles():
    """No module imports itself through others, not even from inside a function."""
    files = [p for pkg in ("pudding_mlx", "convert", "router_coreml")
             for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    graph = {module_name(p): project_imports(p, modules) for p in files}
    assert graph["convert.build"] >= {"convert.build_status", "convert.profiles"}
    cycles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    assert not cycles, cycles
