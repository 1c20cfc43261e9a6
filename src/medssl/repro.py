"""`dvc repro`, stages side by side: what `medssl pipeline` runs.

`dvc repro` runs one stage after another. DVC releases its repository lock while a stage's command runs,
guards each path with read/write locks, and documents launching `dvc repro` several times to run stages in
parallel; this module does that in the DAG's order:

- the stages `dvc status` lists start as soon as every one of them upstream has ended, at most `jobs` at once,
  each as `dvc --wait-for-lock repro --single-item <stage>` in its own process group; then `dvc status` again,
  for stages whose inputs those runs changed (evaluate after a new fine-tune), until nothing is left;
- each is pinned to its share of the CPU cores (sched_setaffinity), so its torch threads and grid shards, which
  size themselves to the cores they are given, never oversubscribe the machine: with 2 cores and 7 stages
  ready, one core each; a stage that runs alone (the champion's fine-tune, evaluate, export) gets them all,
  and cores left idle while nothing else can start go to a running stage (a grid starts its next shard there);
- a failed stage starts nothing new; the stages still running finish (their outputs are recorded), as
  `make -j` does.

dvc.lock ends as a sequential `dvc repro` leaves it. What a stage computes does not depend on how many cores
it got: grid shards and pretraining use one torch thread each on a CPU.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from graphlib import TopologicalSorter
from pathlib import Path

from medssl.host import at_once, has_nvidia_gpu
from medssl.layout import Layout

DVC = ["dvc", "--wait-for-lock"]
# DVC's advice after every stage (git add dvc.lock, autostage, dvc push): said once by the caller instead
_HINT = re.compile(r"^\s*$|^To track the changes with git|^\s*git add |^To enable auto staging|^\s*dvc config core"
                   r"|^Use `dvc push`")


def tools_env(env: dict) -> dict:
    """`env` with this interpreter's bin folder first on PATH, so that `dvc` and the stages' `medssl` commands are
    the project's own when its venv is not activated (`.venv/bin/medssl pipeline`)."""
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH") or os.defpath
    return env if path.split(os.pathsep)[0] == bin_dir else {**env, "PATH": bin_dir + os.pathsep + path}


class Dag:
    """The stages of dvc.yaml (`dvc dag --dot`): `order`, topological; `upstream[s]`, every stage s depends on."""

    def __init__(self, dot: str):
        nodes = re.findall(r'^"([^"]+)";$', dot, re.M)
        parents: dict[str, set[str]] = {n: set() for n in nodes}
        for a, b in re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.M):
            parents.setdefault(b, set()).add(a)
            parents.setdefault(a, set())
        self.parents = parents
        self.order = list(TopologicalSorter(parents).static_order())
        self.upstream: dict[str, set[str]] = {}
        for n in self.order:
            self.upstream[n] = set().union(*(self.upstream[p] | {p} for p in parents[n]))

    def text(self) -> str:
        """The graph as lines a terminal shows whole (`dvc dag` draws 18 stages 400+ columns wide): each stage in run
        order with the stages it reads from directly, `<-`; the instances of a foreach stage that read alike share a
        line, `grid_ssl@{vae,simclr} <- prepare, pretrain@(same)`, and name a group's stages the same way."""
        def split(stage: str) -> tuple[str, str]:
            base, _, item = stage.partition("@")
            return base, item

        groups: dict[tuple, list[str]] = {}
        for s in self.order:  # same base, and the same parents once the stage's own item is read as (same)
            base, item = split(s)
            same = {p: (f"{split(p)[0]}@(same)" if item and split(p)[1] == item else p) for p in self.parents[s]}
            groups.setdefault((base, frozenset(same.values())), []).append(item)

        def name(base: str, items: list[str]) -> str:
            return base if items == [""] else f"{base}@{items[0]}" if len(items) == 1 else f"{base}@{{{','.join(items)}}}"

        member = {f"{base}@{i}" if i else base: name(base, items) for (base, _), items in groups.items() for i in items}
        first = {}  # a shown parent -> where its first stage runs (`pretrain@(same)`: where the first pretrain@ does)
        for i, s in enumerate(self.order):
            first.setdefault(member[s], i)
            first.setdefault(f"{split(s)[0]}@(same)", i)
        rows = []
        for (base, parents), items in groups.items():
            shown = {member.get(p, p) for p in parents}
            rows.append((name(base, items), ", ".join(sorted(shown, key=lambda n: (first[n], n)))))
        width = max((len(n) for n, _ in rows if len(n) <= 24), default=0)  # long group names overhang
        return "\n".join(f"{n:<{width}} <- {u}" if u else n for n, u in rows)

    @classmethod
    def of(cls, env: dict, cwd=None) -> Dag:
        r = subprocess.run([*DVC, "dag", "--dot"], env=tools_env(env), cwd=cwd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr.strip() or f"dvc dag exited {r.returncode}")
        return cls(r.stdout)


def status(env: dict, cwd=None) -> dict:
    """`dvc status --json`: stage -> what changed (["always changed"] for such a stage)."""
    r = subprocess.run([*DVC, "status", "--json"], env=tools_env(env), cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip() or f"dvc status exited {r.returncode}")
    return json.loads(r.stdout or "{}")


def default_jobs() -> int:
    """Stages at once (medssl.host.at_once): 4 sharing a GPU, as the Prefect flow runs them, else one per CPU core."""
    return at_once(has_nvidia_gpu(), len(os.sched_getaffinity(0)))


class _Job:
    def __init__(self, proc: subprocess.Popen, name: str, cpus: list[int], relay: threading.Thread):
        self.proc, self.name, self.cpus, self.relay = proc, name, cpus, relay


class Runner:
    """Runs stages through DVC in project `cwd`, at most `jobs` at once, on `cores` (default: this process's CPU set)."""

    def __init__(self, env: dict, jobs: int, cores: list[int] | None = None, force: bool = False, out=None, cwd=None):
        self.env, self.jobs, self.force, self.cwd = tools_env(env), max(1, jobs), force, cwd
        self.cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
        self.out = out or sys.stdout
        self.print_lock = threading.Lock()
        self.lock_updated = False
        self.signalled: list[int] = []
        self.numbers: dict[str, str] = {}

    def say(self, line: str) -> None:
        with self.print_lock:
            self.out.write(line if line.endswith("\n") else line + "\n")
            self.out.flush()

    def _launch(self, stage: str, cpus: list[int]) -> _Job:
        def child():
            with contextlib.suppress(Exception):
                import ctypes

                ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with the runner
            os.sched_setaffinity(0, cpus)

        cmd = [*DVC, "repro", "--single-item", *(["--force"] if self.force else []), stage]
        proc = subprocess.Popen(cmd, env=self.env, cwd=self.cwd, start_new_session=True, preexec_fn=child,
                                stdout=subprocess.PIPE, text=True, bufsize=1)
        where = f"cpu {cpus[0]}" if len(cpus) == 1 else f"cpus {cpus[0]}-{cpus[-1]}"

        def relay():  # DVC's output and the stage's stdout; the stage's count and cores added
            for line in proc.stdout:
                if line.startswith("Updating lock file"):
                    self.lock_updated = True
                if _HINT.match(line):
                    continue
                m = re.match(r"Running stage '([^']+)':", line)
                if m:
                    n = self.numbers.get(m.group(1))
                    line = f"Running stage '{m.group(1)}' ({n + ', ' if n else ''}{where}):\n"
                self.say(line)

        t = threading.Thread(target=relay, daemon=True)
        t.start()
        return _Job(proc, stage, cpus, t)

    def _reap(self, job: _Job) -> int:
        rc = job.proc.wait()
        end_group(job.proc.pid)  # stragglers: e.g. a stage whose `sh -c` wrapper died before it
        job.relay.join(timeout=5)
        return rc

    def run(self, stages: list[str], upstream: dict[str, set[str]]) -> int:
        """Run `stages`, each once every stage of `stages` upstream of it has ended (upstream[s]: the stages s
        depends on). Returns 0, the first failed stage's exit code, or minus the signal (SIGINT, SIGTERM) that
        stopped it."""
        self.numbers = {s: f"{i}/{len(stages)}" for i, s in enumerate(stages, 1)}
        pending, running, free = list(stages), [], list(self.cores)
        first_rc, killed_at = 0, None

        def forward(signum, frame):
            self.signalled.append(signum)
            for j in running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(j.proc.pid, signal.SIGTERM)

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while pending or running:
                if not first_rc and not self.signalled:
                    busy = set(pending) | {j.name for j in running}
                    ready = [s for s in pending if not (upstream.get(s, set()) & busy)]
                    while ready and free and len(running) < self.jobs:
                        s = ready.pop(0)
                        n = max(1, len(free) // min(len(ready) + 1, self.jobs - len(running)))
                        cpus, free = free[:n], free[n:]
                        pending.remove(s)
                        running.append(self._launch(s, cpus))
                    if free and running and not ready:  # nothing else can start: the narrowest stage gets the
                        job = min(running, key=lambda j: len(j.cpus))  # idle cores (a grid starts its next shard)
                        job.cpus = sorted(job.cpus + free)
                        free = []
                        widen(job.proc.pid, job.cpus)
                elif pending and not running:
                    break
                time.sleep(0.1)
                for j in [j for j in running if j.proc.poll() is not None]:
                    running.remove(j)
                    rc = self._reap(j)
                    free = sorted(free + j.cpus)
                    if rc != 0 and not first_rc and not self.signalled:
                        first_rc = rc
                        if running:
                            self.say(f"stage {j.name} failed (exit {rc}); waiting for "
                                     f"{', '.join(r.name for r in running)} to finish")
                if self.signalled and running:  # SIGTERM sent; SIGKILL after 30 s
                    killed_at = killed_at or time.monotonic()
                    if time.monotonic() - killed_at > 30:
                        for j in running:
                            with contextlib.suppress(ProcessLookupError):
                                os.killpg(j.proc.pid, signal.SIGKILL)
            return -self.signalled[0] if self.signalled else first_rc
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _group(pgid: int):
    """(/proc/<pid>, state letter) of every process in process group `pgid`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                yield stat.parent, fields[0]


def widen(pgid: int, cpus: list[int]) -> None:
    """Let every thread of process group `pgid` run on `cpus` (threads started later inherit it)."""
    for proc, _ in _group(pgid):
        with contextlib.suppress(OSError):
            for task in (proc / "task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), cpus)


def end_group(pgid: int, grace: float = 30.0) -> None:
    """SIGTERM what is left of process group `pgid` and wait until it is gone (SIGKILL after `grace` s), so a
    stage's run is closed, or its process dead, before the caller looks for stale runs."""
    def empty() -> bool:
        return all(state == "Z" for _, state in _group(pgid))  # zombies are already dead

    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline, killed = time.monotonic() + grace, False
    while not empty():
        if time.monotonic() > deadline:
            if killed:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            deadline, killed = time.monotonic() + 5, True
        time.sleep(0.1)


def clear_torn_rwlock(cwd=None) -> bool:
    """A `.dvc/tmp/rwlock` that is not JSON is what a dvc killed while rewriting it leaves (kill -9 of the
    pipeline, PR_SET_PDEATHSIG): every later dvc command fails on it. Under `medssl pipeline`'s project lock no
    dvc of ours runs, so a file still torn a moment later is removed (DVC writes a new one). True if removed."""
    path = Path(cwd or ".") / ".dvc/tmp/rwlock"

    def torn() -> bool:
        try:
            json.loads(path.read_text())
        except FileNotFoundError:
            return False
        except ValueError:  # empty or cut short
            return True
        return False

    if not torn():
        return False
    time.sleep(0.5)  # a dvc outside medssl writing it right now has finished by then
    if not torn():
        return False
    path.unlink(missing_ok=True)
    print(f"removed {path}: torn by a dvc process killed while writing it", file=sys.stderr)
    return True


def repro(env: dict, jobs: int, force: bool = False, cores: list[int] | None = None, out=None, cwd=None) -> int:
    """`dvc repro` ([--force]) with up to `jobs` stages at once; exit code as Runner.run.

    In rounds: the stages `dvc status` lists (with --force, the first time: all), plus any stage between two of
    them in the DAG (so none runs before an upstream stage that will change), side by side in the DAG's order;
    then `dvc status` again, for the stages downstream whose inputs those runs changed, until none is left. A
    stage that is always changed (fetch) runs once."""
    clear_torn_rwlock(cwd)
    try:
        dag = Dag.of(env, cwd)
    except RuntimeError as e:  # DVC's own message, e.g. a broken dvc.yaml
        print(e, file=sys.stderr)
        return 1
    runner, ran = Runner(env, jobs, cores, force, out, cwd), set()
    for _ in range(len(dag.order)):  # each round ends at least one level deeper in the DAG
        try:
            st = dict.fromkeys(dag.order) if force and not ran else \
                {s: v for s, v in status(env, cwd).items() if not (v == ["always changed"] and s in ran)}
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        if not st:
            break
        between = {s for s in dag.order if dag.upstream[s] & set(st) and any(s in dag.upstream[t] for t in st)}
        todo = [s for s in dag.order if s in st or s in between]
        rc = runner.run(todo, dag.upstream)
        runner.force = False
        ran |= set(todo)
        if rc:
            return rc
    if runner.lock_updated:
        runner.say("dvc.lock updated: `git add dvc.lock` to track it")
    return 0


INTERRUPTED = (-signal.SIGINT, -signal.SIGTERM, 130, 143)  # exit codes of a pipeline stopped by Ctrl-C or SIGTERM


@dataclass(frozen=True)
class Outcome:
    """How `medssl pipeline` ended. rc: 0, the first failed stage's exit code, or minus the signal that stopped it."""
    rc: int
    run_id: str                 # the parent MLflow run
    experiment_id: str
    stage: str | None = None    # the stage that ended it ("dvc repro" when no stage's run failed)
    error: str | None = None    # the failed stage's one-line reason, as its run tagged it
    export: dict | None = None  # metrics/export.json of a finished pipeline
    verdict: str | None = None  # reports/verdict.md of a finished pipeline

    @property
    def interrupted(self) -> bool:
        return self.rc in INTERRUPTED


def run_pipeline(p, params: Path, *, jobs: int, force: bool = False, lay: Layout = Layout()) -> Outcome:
    """`repro` inside one parent MLflow run, which every stage nests its runs under (tracking.PARENT_ENV); one
    pipeline per project at a time (guard.exclusive).

    A failure names the failed stage and its reason on the parent, which ends FAILED (KILLED when interrupted);
    runs its stages left RUNNING are ended. A finished pipeline logs its outputs (dvc.lock, the metrics, reports/)
    and the champion's tags and validation/test/parity metrics on the parent. p: the validated params.yaml."""
    import mlflow

    from medssl import guard, tracking
    from medssl.io import read_json

    exp = tracking.experiment_id(p)  # checks the tracking server first
    env_run = os.environ.pop("MLFLOW_RUN_ID", None)  # under `mlflow run`, that run is the parent
    start = {"run_id": env_run} if env_run else {"experiment_id": exp, "run_name": tracking.unique_name("pipeline")}
    with guard.exclusive(lay.lock("pipeline"), "medssl pipeline in this project"), \
            mlflow.start_run(**start, tags={**tracking.base_tags(p), "stage": "pipeline", tracking.RUN_TAG: "pipeline",
                                            tracking.PROCESS_TAG: guard.process_id()}) as run:
        run_id = run.info.run_id
        tracking.end_stale_runs(exp)
        mlflow.log_params(tracking.flat_params(p.model_dump()))
        mlflow.log_artifact(str(params))
        env = {**os.environ, tracking.PARENT_ENV: run_id, guard.PIPELINE_PID_ENV: guard.process_id()}
        rc = repro(env, jobs, force, cwd=lay.root)
        if rc != 0:
            tracking.end_stale_runs(exp)  # a stage killed outright leaves its run RUNNING
            tags = mlflow.get_run(run_id).data.tags
            stage, error = tags.get("failed_stage"), tags.get("error")
            if rc in INTERRUPTED:
                tracking.mark_failed_stage(run_id, stage or "dvc repro", f"interrupted (exit {rc})", "KILLED")
                mlflow.end_run("KILLED")
            else:
                if stage is None:
                    tracking.mark_failed_stage(run_id, "dvc repro", f"exit {rc} before any MLflow run failed")
                mlflow.end_run("FAILED")
            return Outcome(rc, run_id, run.info.experiment_id, stage or "dvc repro", error)
        for f in (lay.dvc_lock, lay.test_metrics, lay.export_metrics, lay.data_card):
            if f.is_file():
                mlflow.log_artifact(str(f), "pipeline")
        if lay.reports.is_dir():
            mlflow.log_artifacts(str(lay.reports), "reports")
        ex = read_json(lay.export_metrics) if lay.export_metrics.is_file() else None
        if ex:
            mlflow.set_tags({"champion": ex["champion"], "model_version": str(ex["version"]), "promoted": str(ex["promoted"])})
            mlflow.log_metrics({tracking.metric_key(k): v for k, v in ex.items() if k.startswith(("val_", "test_", "parity_"))})
        verdict = lay.verdict.read_text().strip() if lay.verdict.is_file() else None
        return Outcome(0, run_id, run.info.experiment_id, export=ex, verdict=verdict)
