"""dvc.yaml declares the code each stage runs, no more and no less: the medssl modules its `medssl <command>`
imports, directly or through other modules (function-level imports included), read from the source's AST."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import yaml

from conftest import BIN, ROOT

SRC = ROOT / "src"
PKG = SRC / "medssl"


def module_file(name: str) -> Path | None:
    p = SRC.joinpath(*name.split("."))
    return p / "__init__.py" if (p / "__init__.py").is_file() else p.with_suffix(".py") if p.with_suffix(".py").is_file() else None


def imported(nodes, package: str) -> set[str]:
    """medssl modules named by the import statements among `nodes` (`from medssl.x import y` names y if a module)."""
    out = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name.split(".")[0] == "medssl"}
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                parts = package.split(".")[: len(package.split(".")) - n.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] == "medssl":
                out.add(base)
                out |= {f"{base}.{a.name}" for a in n.names if module_file(f"{base}.{a.name}")}
    return out


def closure(start: set[str]) -> set[str]:
    """Every module that importing `start` runs: their imports, recursively, and the packages above each."""
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        f = module_file(name)
        if name in seen or f is None:
            continue
        seen.add(name)
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        todo += imported(ast.walk(ast.parse(f.read_text())), package)
        todo += [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
    return seen


def command_modules(command: str) -> set[str]:
    """What `medssl <command>` imports: cli.py's module-level imports, its callback's, and the command's own."""
    tree = ast.parse((PKG / "cli.py").read_text())
    found = {"medssl"} | imported(tree.body, "medssl")  # cli.py itself is not followed: only this command's imports
    helpers = {fn.name: fn for fn in tree.body if isinstance(fn, ast.FunctionDef)}
    commands = {}
    for fn in helpers.values():
        for d in fn.decorator_list:
            if isinstance(d, ast.Call) and getattr(d.func, "attr", "") in ("command", "callback"):
                name = d.args[0].value if d.args else fn.name.replace("_", "-")
                commands[name if d.func.attr == "command" else "<callback>"] = fn
    assert command in commands, f"dvc.yaml runs `medssl {command}`, which cli.py does not define"
    todo, done = [commands["<callback>"], commands[command]], set()
    while todo:  # the command, and cli.py's own functions it calls (`_params` imports config)
        fn = todo.pop()
        done.add(fn.name)
        found |= imported(ast.walk(fn), "medssl")
        todo += [helpers[c.func.id] for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
                 and c.func.id in helpers and c.func.id not in done]
    assert "medssl.cli" not in found
    return closure(found) | {"medssl.cli"}


def stages() -> dict[str, dict]:
    """dvc.yaml's stages as written (a foreach stage once, by its `do`)."""
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    return {name: s.get("do", s) for name, s in doc["stages"].items()}


def test_every_stage_declares_exactly_the_code_it_runs():
    problems = []
    for name, stage in stages().items():
        command = stage["cmd"].split()[1]
        need = {module_file(m).relative_to(ROOT).as_posix() for m in command_modules(command)}
        deps = {d for d in (stage.get("deps") or []) if isinstance(d, str) and d.startswith("src/")}
        covered = {f for f in need if f in deps or any(f.startswith(d.rstrip("/") + "/") for d in deps)}
        if need - covered:
            problems.append(f"{name}: imports {sorted(need - covered)} but dvc.yaml does not list them")
        stale = {d for d in deps if d not in need and not any(f.startswith(d.rstrip("/") + "/") for f in need)}
        if stale:
            problems.append(f"{name}: lists {sorted(stale)}, which `medssl {command}` never imports")
        if "src/medssl" in deps:
            problems.append(f"{name}: depends on all of src/medssl")
    assert not problems, "\n".join(problems)


def test_closure_follows_function_level_imports():
    """The check above is only as good as its import graph: evaluate reaches report (a function-level import
    in cli.py, then evaluate.py's own), fetch never reaches torch-side modules."""
    evaluate, fetch = command_modules("evaluate"), command_modules("fetch")
    assert {"medssl.evaluate", "medssl.report", "medssl.core.paired", "medssl.models.backbones"} <= evaluate
    assert "medssl.data.sources" in fetch and not {m for m in fetch if m.startswith(("medssl.core", "medssl.models"))}
    assert "medssl.report" not in command_modules("grid") | command_modules("finetune") | command_modules("export")


def test_validate_runs_before_every_other_stage():
    """Only fetch names validate's output; every other stage is downstream of fetch, so `dvc repro` (and
    medssl.repro's scheduler, which reads the same DAG) still checks the configuration first."""
    from medssl.repro import Dag

    dot = subprocess.run([str(BIN / "dvc"), "dag", "--dot"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    dag = Dag(dot)
    assert dag.order[0] == "validate"
    assert all("validate" in dag.upstream[s] for s in dag.order[1:]), {s: dag.upstream[s] for s in dag.order}
    assert '"validate" -> "fetch"' in dot and dot.count('"validate" ->') == 1, dot


# a value other than params.yaml's for each finetune key, to see whether the grid's cells use it
OTHER = {"lr": 0.5, "weight_decay": 0.5, "batch_size": 7, "label_smoothing": 0.3, "class_weight": "balanced",
         "warmup_epochs": 3, "frozen_blocks": 2, "augment.hflip": False, "train_eval_size": 17, "ema_window": 0.9,
         "views": 1}


def test_grid_stages_list_exactly_the_finetune_keys_their_cells_use():
    """A finetune key that changes the grid cells' settings (Params.grid_finetune, under some budget) is among the
    grid stages' params in dvc.yaml, and one that does not (the champion's recipe: ema_window, views) is not, so
    editing it reruns no grid. A new finetune key fails here until OTHER says what it changes."""
    from medssl.config import Finetune, load_params

    assert {k.split(".")[0] for k in OTHER} == set(Finetune.model_fields), "add the new finetune key to OTHER"
    base = load_params(ROOT / "params.yaml", tuned=False)
    for name in ("grid", "grid_ssl"):
        params = [k for k in stages()[name]["params"] if isinstance(k, str)]
        assert "finetune" not in params, name
        listed = {k.split(".", 1)[1] for k in params if k.startswith("finetune.")}
        for key, value in OTHER.items():
            used = any(load_params(ROOT / "params.yaml", {"budget": b, f"finetune.{key}": value}, tuned=False).grid_finetune
                       != base.model_copy(update={"budget": b}).grid_finetune for b in base.budgets)
            assert used == (key.split(".")[0] in listed), (name, key, used)


def test_medssl_dag_prints_the_graph_in_lines_a_terminal_shows_whole():
    """`medssl dag`: a line per stage (a foreach stage's instances that read alike share one), each with the stages
    it reads from, under 160 columns, where `dvc dag` draws 400+; the lines give back dvc.yaml's edges."""
    import os
    import re

    from medssl.repro import Dag

    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if Path(d).resolve() != BIN.resolve())
    env = {**os.environ, "PATH": path}  # the venv not activated: `.venv/bin/medssl dag` still finds its dvc
    r = subprocess.run([str(BIN / "medssl"), "dag"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    lines = out.splitlines()
    assert max(map(len, lines)) < 160 and len(lines) <= 12, out
    assert "grid_ssl@{vae,simclr,mim,imagenet-simclr,imagenet-mim} <- prepare, pretrain@(same)" in lines, out
    dot = subprocess.run([str(BIN / "dvc"), "dag", "--dot"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    parents = Dag(dot).parents

    def expand(name: str, item: str = "") -> list[str]:
        base, _, items = name.partition("@")
        if not items:
            return [base]
        return [f"{base}@{i}" for i in (items.strip("{}").split(",") if items != "(same)" else [item])]

    edges = set()
    for line in lines:
        stage, _, ups = (x.strip() for x in line.partition("<-"))
        for s in expand(stage):
            for u in filter(None, re.split(r",\s*(?![^{]*})", ups)):
                edges |= {(p, s) for p in expand(u, s.partition("@")[2])}
    assert edges == {(p, s) for s, ps in parents.items() for p in ps}
