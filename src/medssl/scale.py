"""The grid's shards on a Prefect task runner: the subflow medssl-grid and its shard task, importable so that
Dask workers can unpickle them (a flow loaded from flows/pipeline.py is not).

A shard is one grid seed of one init (`grid.run_shard`). It reads its inputs by content hash (medssl.cas),
returns its cells as plain data and tags its MLflow runs with its attempt, so that the runs of an attempt lost
with its worker end KILLED (tracking.end_superseded) while the attempt that finished is kept, once.
"""
from __future__ import annotations

import json
import os
from uuid import uuid4

import numpy as np
import torch
from prefect import flow, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from medssl import cas, tracking
from medssl.checkpoints import encoder_file, encoder_seed_of
from medssl.config import Params
from medssl.core.engine import pick_device
from medssl.grid import InitGrid, Shard, load_grid_data, run_shard, shards_at_once
from medssl.layout import Layout

# Threads in the flow's process, as in `medssl grid` (medssl.host.at_once).
THREADS = shards_at_once(pick_device())


@task(name="grid-shard", task_run_name="grid-{init}-seed{seed}")
def grid_shard_task(p: Params, init: str, seed: int, refs: dict, grid_run: str) -> Shard:
    """One grid seed of `init` on whichever worker the runner picks: inputs by content hash, cells back as plain
    data, fine-tune cells' MLflow runs nested under the init's grid run `grid_run`."""
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # CPU: one torch thread per shard, so every runner computes alike
    data = load_grid_data(cas.get(refs["data"]))
    meta = json.loads(cas.get(refs["meta"]).read_text())
    es = encoder_seed_of(p, init, seed)
    enc = refs.get("encoders", {}).get(f"s{es}")  # an SSL init's encoder for this seed
    lay = Layout(cas.cache_dir().parent / "work" / (enc.digest if enc else "none"))
    if enc:  # build_classifier reads checkpoints.encoder_file: the content-addressed file, linked there
        dst = encoder_file(p, init, es, lay)
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
            tmp.unlink(missing_ok=True)
            os.symlink(cas.get(enc).resolve(), tmp)
            tmp.replace(dst)
    attempt = uuid4().hex
    with tracking.extra_tags({tracking.SHARD_TAG: f"{init}-s{seed}", tracking.ATTEMPT_TAG: attempt}):
        shard = run_shard(InitGrid(p=p.for_init(init), init=init, data=data, meta=meta, lay=lay, device=pick_device(),
                                   run_id=grid_run), seed)
    shard["attempt"] = attempt
    return shard


def task_runner(p: Params) -> TaskRunner:
    """The grid subflow's runner, from params.yaml `scale`."""
    s = p.scale
    if s.runner == "threads":
        return ThreadPoolTaskRunner(max_workers=THREADS)
    from prefect_dask import DaskTaskRunner

    if s.dask_address:
        return DaskTaskRunner(address=s.dask_address)
    if torch.cuda.device_count() > 1:  # one worker process per GPU (CUDA_VISIBLE_DEVICES set per worker)
        return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster")
    return DaskTaskRunner(cluster_kwargs={"n_workers": s.dask_workers, "threads_per_worker": 1, "processes": True})


def grid_table(p: Params, shards: dict[str, list[Shard]]) -> list[dict]:
    """The report's table over the shards finished so far: mean test balanced accuracy over their seeds, per init
    and protocol (rows) and label fraction (columns)."""
    rows = []
    for init in (i for i in p.inits.all if i in shards):
        cells = [c for s in shards[init] for c in s["cells"].values() if c["regime"] == "fractions"]
        for protocol in p.grid.protocols:
            rows.append({"init": init, "protocol": protocol, "seeds": len(shards[init]), **{
                f"{100 * f:g} %": round(float(np.mean([c["test"]["balanced_accuracy"] for c in cells
                                                       if c["protocol"] == protocol and c["fraction"] == f])), 4)
                for f in p.grid.fractions}})
    return rows


@flow(name="medssl-grid", log_prints=True)
def grid_flow(p: Params, refs: dict, grid_runs: dict[str, str], retries: int = 1) -> dict[str, list[Shard]]:
    """Every shard (init x grid seed) on this flow's task runner; init -> its shards. A progress artifact updated
    in place as shards finish, then the report's table over every seed."""
    futures = {(init, seed): grid_shard_task.with_options(retries=retries, retry_delay_seconds=5).submit(
                   p, init, seed, refs[init], grid_runs[init])
               for init in p.inits.all for seed in p.grid.seeds}
    names = {id(f): k for k, f in futures.items()}
    bar = create_progress_artifact(0.0, key="medssl-shards", description=f"{len(futures)} grid shards")
    done: dict[str, list[Shard]] = {}
    for k, fut in enumerate(as_completed(list(futures.values())), 1):
        init, seed = names[id(fut)]
        done.setdefault(init, []).append(fut.result())
        update_progress_artifact(bar, 100.0 * k / len(futures), description=f"{k}/{len(futures)}: {init} seed {seed}")
    create_table_artifact(grid_table(p, done), key="medssl-grid",  # once: a table artifact is not updated in place
                          description="test balanced accuracy, mean over the seeds")
    return done
