"""Fault injection against real processes and a real MLflow server: kill -9 in the middle of pretraining,
fine-tuning, the grid and `medssl pipeline`, then rerun and compare with an uninterrupted run; two writers
of one stage; a dead tracking server; diverging learning rates."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import BIN, free_port, project_copy, run_env, set_params

pytestmark = pytest.mark.slow
SMALL = {"data.max_train": 256, "data.max_eval": 128, "data.image_size": 32, "pretrain.vae.latent_dim": 32,
         "budgets.demo.pretrain_epochs": 4, "budgets.demo.finetune_epochs": 4,
         "budgets.demo.grid": {"epochs": 1, "max_train": 128, "max_eval": 64},
         "grid.protocols": ["linear", "finetune"], "grid.fractions": [0.5, 1.0], "grid.imbalance": [1],
         "inits.baselines": ["random", "imagenet"], "inits.ssl": ["vae"], "grid.fusion": [],
         "mlflow.experiment": "faults", "export.registered_model": "derm-faults"}


def medssl(args, d, env, check=True, timeout=600):
    r = subprocess.run([str(BIN / "medssl"), *args], cwd=d, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"medssl {args} exited {r.returncode}\n{r.stderr[-5000:]}")
    return r


def start(args, d, env, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "medssl"), *args], cwd=d, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(pred, timeout=300, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not reached within {timeout}s")


def runs(name=None, status=None):
    exp = mlflow.get_experiment_by_name("faults")
    out = mlflow.search_runs([exp.experiment_id], output_format="list", order_by=["attributes.start_time ASC"])
    return [r for r in out if (name is None or r.data.tags.get("medssl.run") == name) and (status is None or r.info.status == status)]


def processes_in(d: Path, pids: bool = False) -> list:
    """Command lines (with pids: (pid, command line)) of live processes whose working directory is `d`."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == d:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                out.append((int(proc.name), cmd) if pids else cmd)
        except OSError:
            continue
    return out


def stage_processes(d: Path) -> list:
    """The stage processes themselves, not the `sh -c "medssl ..."` wrapper DVC runs them in when $SHELL is
    unset or dash (bash execs the command in place, dash does not)."""
    return [(pid, cmd) for pid, cmd in processes_in(d, pids=True)
            if ("medssl grid" in cmd or "medssl pretrain" in cmd) and " -c " not in f" {cmd} "]


def no_leftovers(d: Path) -> None:
    wait_for(lambda: not processes_in(d), timeout=60, what="processes of an earlier test to end")


@pytest.fixture(scope="module")
def small(tmp_path_factory, mlflow_server, dermamnist):
    d = project_copy(tmp_path_factory.mktemp("faults"), **SMALL).resolve()
    env = run_env(MLFLOW_TRACKING_URI=mlflow_server, MEDSSL_DATA_PATH=str(dermamnist), DVC_SITE_CACHE_DIR=str(d / ".dvc/tmp/site"))
    for stage in ("validate", "fetch", "prepare"):
        medssl([stage], d, env)
    mlflow.set_tracking_uri(mlflow_server)
    return d, env


def state_dict(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def kill_and_resume(d, env, args, resume: Path, output: Path, tmp: Path, ready=None):
    """Reference run; then a run killed (-9) once its resume state exists; then the rerun. -> timings, logs."""
    t0 = time.time()
    medssl(args, d, env)
    full = time.time() - t0
    reference = tmp / f"reference{output.suffix}"
    reference.write_bytes(output.read_bytes())
    output.unlink()
    proc = start(args, d, env, tmp / "killed.log")
    t0 = time.time()
    wait_for(lambda: proc.poll() is not None or (ready or resume.is_file)(), what=f"{resume}")
    assert proc.poll() is None, "finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = time.time() - t0
    assert not output.exists() and resume.is_file()
    t0 = time.time()
    r = medssl(args, d, env)
    resumed = time.time() - t0
    assert "resuming from" in r.stderr, r.stderr[-2000:]
    print(f"\n{' '.join(args)}: uninterrupted {full:.1f} s; killed after {killed_after:.1f} s; rerun {resumed:.1f} s")
    return reference, r


def test_pretrain_killed_resumes_to_the_same_encoder_and_one_writer_at_a_time(small, tmp_path):
    d, env = small
    resume, encoder = d / ".medssl/resume/pretrain-vae.pt", d / "models/pretrain/vae/encoder.pt"
    medssl(["pretrain", "vae"], d, env)
    reference = tmp_path / "reference.pt"
    reference.write_bytes(encoder.read_bytes())
    encoder.unlink()
    proc = start(["pretrain", "vae"], d, env, tmp_path / "killed.log")
    wait_for(lambda: proc.poll() is not None or resume.is_file(), what="first epoch's state")
    assert proc.poll() is None, "finished before the second could start"
    # Paused, the first keeps its lock however long the second takes to start (on a busy CPU, longer than the
    # first's remaining epochs: it would finish and let the second in).
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        second = medssl(["pretrain", "vae"], d, env, check=False, timeout=60)  # the same stage, while the first runs
    finally:  # a paused process left behind would hold the lock for every later test
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert second.returncode == 2 and "already running" in second.stderr and "Traceback" not in second.stderr
    killed = [r for r in runs("pretrain-vae") if r.info.status == "RUNNING"]
    assert len(killed) == 1  # what a dead process leaves behind...
    r = medssl(["pretrain", "vae"], d, env)
    assert "resuming from" in r.stderr and "done" in r.stderr
    assert same_tensors(state_dict(encoder), state_dict(reference))  # same seeds, same epochs, same weights
    again = mlflow.get_run(killed[0].info.run_id)  # ...is found by the next run and ended KILLED with the reason
    assert again.info.status == "KILLED" and "ended without closing the run" in again.data.tags["killed_reason"]
    assert not resume.exists()  # a finished stage leaves no state behind


def test_finetune_killed_resumes_to_the_same_classifier(small, tmp_path):
    d, env = small
    resume, model = d / ".medssl/resume/finetune-imagenet.pt", d / "models/finetune/model.pt"
    reference, _ = kill_and_resume(d, env, ["finetune", "imagenet"], resume, model, tmp_path)
    assert same_tensors(state_dict(model), state_dict(reference))
    curves = (d / "plots/finetune/curves.csv").read_text().splitlines()
    assert len(curves) == 1 + 4  # header + every epoch once, none twice


def test_grid_killed_resumes_with_the_same_cells(small, tmp_path):
    d, env = small
    resume, cells = d / ".medssl/resume/grid-random.pt", d / "metrics/grid/random.json"
    reference, _ = kill_and_resume(d, env, ["grid", "random"], resume, cells, tmp_path)

    def by_key(path):
        return {(c["protocol"], c["regime"], c["fraction"], c["seed"]): (c["val"], c["test"])
                for c in json.loads(path.read_text())["cells"]}

    ref, got = by_key(reference), by_key(cells)
    assert len(got) == 2 * 3 * 3 and got == ref  # every cell exactly once, identical scores


def pipeline_with_a_stage_running(d: Path, env, log: Path) -> subprocess.Popen:
    """`medssl pipeline` started (in the test's process group, unlike `start`), returned once one of its stages
    is running."""
    proc = subprocess.Popen([str(BIN / "medssl"), "pipeline"], cwd=d, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_for(lambda: proc.poll() is not None or stage_processes(d), what="a stage running")
    assert proc.poll() is None, log.read_text()[-3000:]
    return proc


def test_killed_pipeline_takes_its_stages_along(small, tmp_path):
    d, env = small
    no_leftovers(d)
    log = tmp_path / "pipeline.log"
    proc = pipeline_with_a_stage_running(d, env, log)
    stage_runs = {r.info.run_id for r in runs(status="RUNNING") if r.data.tags.get("stage") != "pipeline"}
    os.kill(proc.pid, signal.SIGKILL)  # no handler runs: the stages must notice on their own
    proc.wait()
    t0 = time.time()
    wait_for(lambda: not processes_in(d), timeout=30, what="dvc repro and its stage to end")
    print(f"\nstages ended {time.time() - t0:.1f} s after kill -9 of medssl pipeline")
    for run_id in stage_runs:
        wait_for(lambda: mlflow.get_run(run_id).info.status != "RUNNING", timeout=30, what="stage run ended")
        assert mlflow.get_run(run_id).info.status == "KILLED"
    r = medssl(["validate"], d, env)  # DVC's own locks are free again
    assert r.returncode == 0


def test_stage_killed_under_the_pipeline_is_named_on_the_parent(small, tmp_path):
    """kill -9 of the training process itself: the pipeline fails, its parent run names the stage, and the
    stage's run (left RUNNING by the dead process) ends KILLED with the reason."""
    d, env = small
    no_leftovers(d)
    proc = pipeline_with_a_stage_running(d, env, tmp_path / "log")
    pid, cmd = stage_processes(d)[0]
    name = "-".join(cmd.split("medssl ")[-1].split()[:2])  # e.g. grid-random, pretrain-vae
    wait_for(lambda: runs(name, "RUNNING"), timeout=60, what=f"run {name}")
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    parent = [r for r in runs() if r.data.tags.get("stage") == "pipeline"][-1]
    assert parent.info.status == "FAILED" and parent.data.tags["failed_stage"] == name, parent.data.tags
    killed = runs(name)[-1]
    assert killed.info.status == "KILLED" and "ended without closing the run" in killed.data.tags["killed_reason"]
    assert name in (tmp_path / "log").read_text()


def test_sigterm_ends_the_pipeline_and_its_stages(small, tmp_path):
    d, env = small
    no_leftovers(d)
    proc = pipeline_with_a_stage_running(d, env, tmp_path / "log")
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    wait_for(lambda: not processes_in(d), timeout=30, what="the process tree to end")
    print(f"\nSIGTERM: medssl pipeline and its stages ended in {time.time() - t0:.1f} s")
    parent = [r for r in runs() if r.data.tags.get("stage") == "pipeline"][-1]
    assert parent.info.status == "KILLED" and "interrupted" in parent.data.tags["error"], parent.data.tags
    assert not runs(status="RUNNING")


def test_dead_tracking_server_fails_fast(small):
    d, env = small
    dead = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    # Before the health check a dead server meant retries for minutes (4 m 16 s), so the subprocess
    # timeout is what tells a hang apart; the time to import torch and MLflow is the machine's own.
    def fails_fast(args):
        t0 = time.time()
        r = medssl(args, d, dead, check=False, timeout=90)
        took = time.time() - t0
        assert r.returncode == 2 and "does not answer" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "within 3 s" in r.stderr, r.stderr
        print(f"\nmedssl {' '.join(args)} with a dead tracking server: exit 2 after {took:.1f} s")

    fails_fast(["pipeline"])
    fails_fast(["pretrain", "vae"])
    medssl(["pretrain", "vae"], d, env)  # an encoder finished with the same inputs is kept: the dead server still fails it
    fails_fast(["pretrain", "vae"])


@pytest.mark.parametrize("stage,key", [(["pretrain", "vae"], "pretrain.vae.lr"), (["finetune", "imagenet"], "finetune.lr")])
def test_divergence_stops_training_and_fails_the_run(small, tmp_path, stage, key):
    d, env = small
    params = tmp_path / "params.yaml"
    params.write_text((d / "params.yaml").read_text())
    set_params(params, **{key: 1.0e6})
    r = medssl([*stage, "--params", str(params)], d, env, check=False)
    assert r.returncode == 2 and "diverged at epoch" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = runs(f"{stage[0]}-{stage[1]}")[-1]
    assert last.info.status == "FAILED" and "diverged at epoch" in last.data.tags["error"]
