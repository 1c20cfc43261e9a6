from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_NPZ = Path(os.environ.get("MEDSSL_DATA_PATH", ROOT.parent / "shared/data/dermamnist/dermamnist.npz"))
BIN = Path(sys.executable).parent
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


# `make test` and `make test-all` run the modules on one xdist worker per core (--dist loadscope: a module's tests, and its
# module fixture, stay on one worker). The modules that train or start servers for minutes go first, longest
# first, so that they run side by side and the short ones fill in around them.
LONGEST = ("test_ssl.py", "test_pipeline_e2e.py", "test_prefect.py", "test_datasets.py", "test_faults.py")


def pytest_collection_modifyitems(items) -> None:
    items.sort(key=lambda it: LONGEST.index(it.path.name) if it.path.name in LONGEST else len(LONGEST))


@pytest.fixture(scope="session")
def dermamnist() -> Path:
    """The real DermaMNIST npz (tests never download it)."""
    if not SHARED_NPZ.is_file():
        pytest.fail(f"DermaMNIST not found at {SHARED_NPZ}; set MEDSSL_DATA_PATH to dermamnist.npz")
    return SHARED_NPZ


def write_npz(path: Path, n: int = 40, size: int = 28, num_classes: int = 7, **override) -> Path:
    """A small, valid MedMNIST-layout npz; `override` replaces or (with None) drops keys."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % num_classes).astype(np.uint8)[:, None]
    for k, v in override.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with direct.open(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def start_mlflow_server(store: str, log, *extra: str) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a free 127.0.0.1 port over `store` (one worker, job execution off), in its own process
    group: the process and its URI. The caller waits for it (wait_http) and stops the group."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", store, *extra, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server + registry on 127.0.0.1 (SQLite backend, proxied artifacts)."""
    d = tmp_path_factory.mktemp("mlflow-server")
    log = open(d / "server.log", "w")
    proc, uri = start_mlflow_server(f"sqlite:///{d}/mlflow.db", log, "--artifacts-destination", str(d / "artifacts"))
    try:
        wait_http(f"{uri}/health", proc)
        yield uri
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


def set_params(path: Path, **changes) -> None:
    """Edit a params.yaml in place: set_params(p, **{"finetune.lr": 3e-4})."""
    import yaml

    p = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = p
        for k in parents:
            node = node[k]
        node[leaf] = value
    path.write_text(yaml.safe_dump(p, sort_keys=False))


def project_copy(dest: Path, **params) -> Path:
    """The project's tracked files (as a fresh clone has them, minus run outputs) in a new git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith(("metrics/", "plots/")) and f not in ("dvc.lock",):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    set_params(dest / "params.yaml", **params)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "test copy"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return dest


def run_env(**extra) -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", **extra}


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A real PostgreSQL server (Debian's package) in a temporary data directory on 127.0.0.1."""
    import glob
    import pwd

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.fail("PostgreSQL server binaries not found: apt-get install postgresql (.ci/run does)")
    bindir = Path(bins[-1]).parent
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="medssl-pg-"))  # not under pytest's root-only tree: postgres must reach it
    data, port = d / "data", free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root; Debian's package provides the postgres user
        pw = pwd.getpwnam("postgres")
        os.chown(d, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(d / "pg.log"), "-w", "start",
                    "-o", f"-h 127.0.0.1 -p {port} -k {d} -c max_connections=100"], check=True, capture_output=True)
    try:
        subprocess.run([*as_user, "psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", "CREATE DATABASE optuna"],
                       check=True, capture_output=True)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
