"""Import-time health: every entry script and every package its import chain reaches, imported the way a user's
run imports them, in a fresh interpreter. The project imports medvae, open_clip, nibabel and others inside
functions (so that `--help` is quick), so importing the scripts alone would miss a dependency that crashes at
import (wandb 0.14 under sentry-sdk 3 did, through medvae -> timm, while every other test passed)."""
import ast
import os
import subprocess
import sys

from conftest import ROOT

ENTRIES = ["train", "evaluate", "realism", "synthesise", "bench", "baselines.ablation"]


def module_path(name):
    """The project file that module `name` is, or None for a third-party or standard-library module."""
    path = os.path.join(ROOT, *name.split(".")) + ".py"
    return path if os.path.isfile(path) else None


def imported_names(path):
    """Every module a file imports, at the top or inside a function, as the dotted names written there."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def import_chain(entry):
    """The third-party modules that `entry` reaches through the project's own modules, followed transitively."""
    seen, todo, outside = set(), [entry], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for dep in imported_names(module_path(name)):
            if module_path(dep):
                todo.append(dep)
            elif dep.split(".")[0] not in sys.stdlib_module_names:
                outside.add(dep)
    return sorted(outside)


def test_the_import_chain_walk_reaches_the_lazy_imports():
    chain = import_chain("train")
    assert {"medvae.models", "open_clip", "torch"} <= set(chain)       # medvae only inside encode.load_vae
    assert not {"encode", "os", "json"} & set(chain)


def test_every_entry_script_and_its_dependencies_import_in_a_fresh_interpreter():
    modules = sorted(set(ENTRIES) | {m for e in ENTRIES for m in import_chain(e)})
    script = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % modules
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"an import crashed (a dependency's release?):\n{r.stderr[-3000:]}"


def test_help_works_in_a_fresh_interpreter():
    for entry in ("train.py", "evaluate.py"):
        r = subprocess.run([sys.executable, entry, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "usage:" in r.stdout, f"{entry} --help:\n{r.stderr[-3000:]}"
