"""Files by content: what a grid shard reads (prepared data, an encoder) reaches a worker by its md5.

A worker looks in its own cache (`$MEDSSL_CACHE`, default ~/.cache/medssl), then in each source in turn: a
local path (the same host, or a shared file system) or an MLflow artifact URI (`mlflow-artifacts:/…`,
`runs:/…`: the pipeline's parent run, through the tracking server). Whatever it finds is checked against the
md5 before use, so a stale or half-copied file is never read.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

from medssl.errors import MissingInput


def cache_dir() -> Path:
    return Path(os.environ.get("MEDSSL_CACHE", "~/.cache/medssl")).expanduser() / "cas"


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Ref(NamedTuple):
    """A file by content, and where it may be found (paths, MLflow artifact URIs)."""
    digest: str
    name: str
    sources: tuple[str, ...]


def ref(path: Path) -> Ref:
    path = Path(path).resolve()
    return Ref(md5(path), path.name, (str(path),))


def publish(r: Ref, run_id: str) -> Ref:
    """Log the file as an artifact of `run_id` (under inputs/<md5>/) and add that URI to its sources."""
    import mlflow

    local = next(s for s in r.sources if Path(s).is_file())
    mlflow.MlflowClient().log_artifact(run_id, local, f"inputs/{r.digest}")
    return Ref(r.digest, r.name, (*r.sources, f"runs:/{run_id}/inputs/{r.digest}/{r.name}"))


def get(r: Ref) -> Path:
    """The file with md5 `r.digest`: from the cache, else the first source that yields it. Raises
    FileNotFoundError naming every source tried."""
    cached = cache_dir() / r.digest / r.name
    if cached.is_file():
        return cached
    tried = []
    for src in r.sources:
        if "://" not in src and ":/" not in src:  # a path
            p = Path(src)
            if p.is_file() and md5(p) == r.digest:
                return p
            tried.append(f"{src} ({'other content' if p.is_file() else 'absent'})")
            continue
        import mlflow

        with tempfile.TemporaryDirectory() as tmp:
            try:
                got = Path(mlflow.artifacts.download_artifacts(artifact_uri=src, dst_path=tmp))
            except Exception as e:  # the next source may still have it
                tried.append(f"{src} ({type(e).__name__})")
                continue
            if md5(got) != r.digest:
                tried.append(f"{src} (other content)")
                continue
            cached.parent.mkdir(parents=True, exist_ok=True)
            part = cached.with_suffix(cached.suffix + f".part{os.getpid()}")
            shutil.copyfile(got, part)
            part.replace(cached)  # atomic: a reader sees the whole file or none
            return cached
    raise MissingInput(f"{r.name} (md5 {r.digest}) not found: " + "; ".join(tried))
