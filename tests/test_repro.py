"""medssl.repro (what `medssl pipeline` runs): DVC stages side by side in the DAG's order, each pinned to its share
of the cores, on a real DVC project of small stages that record when and where they ran."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import run_env
from medssl import repro

RECORD = """import json, os, sys, time
out, seconds, rc = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
t0, cpus = time.time(), sorted(os.sched_getaffinity(0)); time.sleep(seconds)
if rc: sys.exit(rc)
json.dump({"start": t0, "end": time.time(), "cpus": cpus, "cpus_end": sorted(os.sched_getaffinity(0))}, open(out, "w"))
"""


def stage(out: str, seconds: float, deps: list[str] = (), rc: int = 0) -> dict:
    return {"cmd": f"{sys.executable} record.py {out} {seconds} {rc}", "deps": ["record.py", *deps], "outs": [out]}


def project(d: Path, fail: str | None = None) -> tuple[Path, dict]:
    """a -> (b, c) -> d: b and c are independent; `fail` exits 3 after its sleep."""
    d.mkdir()
    (d / "record.py").write_text(RECORD)
    stages = {"a": stage("a.json", 0), "b": stage("b.json", 3, ["a.json"]), "c": stage("c.json", 1.5, ["a.json"]),
              "d": stage("d.json", 0, ["b.json", "c.json"])}
    if fail:
        stages[fail] = stage(f"{fail}.json", 1, stages[fail]["deps"][1:], rc=3)
    (d / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    env = run_env()
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=d, env=env, check=True)
    return d, env


def rec(d: Path, name: str) -> dict:
    return json.loads((d / f"{name}.json").read_text())


def test_independent_stages_run_side_by_side_each_on_its_cores(tmp_path):
    d, env = project(tmp_path / "p")
    cores = sorted(os.sched_getaffinity(0))
    out = io.StringIO()
    assert repro.repro(env, jobs=2, cwd=d, out=out) == 0, out.getvalue()
    a, b, c, dd = (rec(d, s) for s in "abcd")
    assert a["end"] <= min(b["start"], c["start"]) and max(b["end"], c["end"]) <= dd["start"]  # the DAG's order
    assert b["start"] < c["end"] and c["start"] < b["end"], (b, c)  # b and c at once
    assert a["cpus"] == dd["cpus"] == cores  # alone: every core
    assert len(b["cpus"]) == len(c["cpus"]) == max(1, len(cores) // 2)
    if len(cores) >= 2:
        assert not set(b["cpus"]) & set(c["cpus"])  # never the same core twice
    assert b["cpus_end"] == cores  # c ended and nothing else could start: its core went to b
    text = out.getvalue()
    assert "Running stage 'b' (2/4, cpu" in text and "git add dvc.lock" not in text.replace("`git add dvc.lock`", ""), text
    # dvc.lock as a sequential `dvc repro` leaves it: nothing left to run, and a second call runs nothing
    st = subprocess.run(["dvc", "status", "--json"], cwd=d, env=env, capture_output=True, text=True, check=True)
    assert json.loads(st.stdout) == {}, st.stdout
    before = {s: (d / f"{s}.json").stat().st_mtime_ns for s in "abcd"}
    out = io.StringIO()
    assert repro.repro(env, jobs=2, cwd=d, out=out) == 0
    assert "Running stage" not in out.getvalue() and before == {s: (d / f"{s}.json").stat().st_mtime_ns for s in "abcd"}
    assert repro.repro(env, jobs=2, force=True, cwd=d, out=io.StringIO()) == 0  # --force: every stage again, once
    assert all((d / f"{s}.json").stat().st_mtime_ns > before[s] for s in "abcd")
    assert json.loads(subprocess.run(["dvc", "status", "--json"], cwd=d, env=env, capture_output=True, text=True,
                                     check=True).stdout) == {}


def test_a_failed_stage_starts_nothing_new_and_lets_the_running_one_finish(tmp_path):
    d, env = project(tmp_path / "p", fail="c")  # c fails after 1 s while b runs 3 s
    out = io.StringIO()
    rc = repro.repro(env, jobs=2, cwd=d, out=out)
    assert rc != 0 and "stage c failed" in out.getvalue() and "waiting for b to finish" in out.getvalue(), out.getvalue()
    assert (d / "b.json").is_file() and not (d / "d.json").exists()
    st = json.loads(subprocess.run(["dvc", "status", "--json"], cwd=d, env=env, capture_output=True, text=True,
                                   check=True).stdout)
    assert set(st) == {"c", "d"}, st  # b's result is recorded in dvc.lock


def test_a_stage_whose_inputs_change_only_downstream_of_a_rerun_still_runs(tmp_path):
    """Only b is changed (its script's sleep edited); d follows once b has rerun, in a second round."""
    d, env = project(tmp_path / "p")
    assert repro.repro(env, jobs=2, cwd=d, out=io.StringIO()) == 0
    y = yaml.safe_load((d / "dvc.yaml").read_text())
    y["stages"]["b"]["cmd"] = y["stages"]["b"]["cmd"].replace(" 3 0", " 0.5 0")
    (d / "dvc.yaml").write_text(yaml.safe_dump(y))
    assert set(repro.status(env, cwd=d)) == {"b"}
    before = {s: rec(d, s) for s in "acd"}
    out = io.StringIO()
    assert repro.repro(env, jobs=2, cwd=d, out=out) == 0
    assert rec(d, "d")["start"] > rec(d, "b")["end"] > before["d"]["end"]
    assert rec(d, "a") == before["a"] and rec(d, "c") == before["c"]  # unchanged stages do not run
    assert "Running stage 'b' (1/1, " in out.getvalue() and "Running stage 'd' (1/1, " in out.getvalue()


def test_grid_shards_start_when_the_stage_is_given_another_core():
    """grid.Slots re-reads its cap while a shard waits: the core medssl.repro hands over is used at once."""
    import threading
    import time

    from medssl.grid import Slots

    cap, running, peak = [1], [], []
    slots = Slots(lambda: cap[0])

    def shard():
        with slots:
            running.append(1)
            peak.append(len(running))
            time.sleep(1.5)
            running.pop()

    threads = [threading.Thread(target=shard) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert max(peak) == 1  # one core: one shard at a time
    cap[0] = 2  # a second core, while the first shard runs
    for t in threads:
        t.join()
    assert max(peak) == 2  # the second shard started beside the first, not after it


def test_a_torn_dvc_rwlock_is_removed_and_a_whole_one_kept(tmp_path):
    """What a dvc killed while rewriting its lock file leaves (empty or cut JSON) would fail every later dvc
    command; `medssl pipeline` removes it before dvc runs, and leaves a readable one alone."""
    from medssl.repro import clear_torn_rwlock

    lock = tmp_path / ".dvc/tmp/rwlock"
    lock.parent.mkdir(parents=True)
    assert not clear_torn_rwlock(tmp_path)  # none there
    lock.write_text('{"write": {}, "read": {}}')
    assert not clear_torn_rwlock(tmp_path) and lock.is_file()
    for torn in ("", '{"write": {"/x": {"pid": 1'):
        lock.write_text(torn)
        assert clear_torn_rwlock(tmp_path) and not lock.exists()
