"""`python -m benchmarks.serve`: memory and latency of `medssl serve` under the largest accepted request, an
oversized one (declared and streamed), and SIGTERM. Needs the project environment (MLflow, FastAPI).

A classifier with random weights is exported to ONNX, logged and registered in a temporary SQLite store
(the scores do not matter here, only sizes), then served as a real process on 127.0.0.1.
Writes benchmarks/results/serve_cpu_<date>.{json,md}.
"""
from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchmarks.index import write_index

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def register(store: Path) -> str:
    import mlflow
    import torch
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from medssl.core.onnx import export_onnx
    from medssl.models.classifier import Classifier, ExportModel

    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    mlflow.set_experiment("bench")
    clf = Classifier("mobilenet_v2", 7, 0.2, mean=[0.5] * 3, std=[0.25] * 3, gen=torch.Generator().manual_seed(0)).eval()
    x = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)
    proto = export_onnx(ExportModel(clf, 32).eval(), x)
    sig = ModelSignature(Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28, 3), "images")]),
                         Schema([TensorSpec(np.dtype(np.float32), (-1, 7), "probabilities")]))
    with mlflow.start_run():
        info = mlflow.onnx.log_model(proto, name="model", signature=sig,
                                     metadata={"class_names": list("abcdefg"), "input_size": [28, 28]})
    mv = mlflow.register_model(info.model_uri, "bench")
    return f"models:/bench/{mv.version}"


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(port: int, body: bytes | None = None, declared: int | None = None, chunked: int = 0) -> tuple[int, float]:
    """POST to /invocations -> (status, seconds). `declared`: a Content-Length with only 1 MiB of body sent;
    `chunked`: that many bytes sent with chunked transfer encoding (no length announced)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t = time.perf_counter()
    c.putrequest("POST", "/invocations")
    c.putheader("Content-Type", "application/json")
    try:
        if chunked:
            c.putheader("Transfer-Encoding", "chunked")
            c.endheaders()
            block = b" " * (1 << 20)
            for _ in range(chunked >> 20):
                c.send(b"%x\r\n%s\r\n" % (len(block), block))
            c.send(b"0\r\n\r\n")
        else:
            c.putheader("Content-Length", str(declared or len(body)))
            c.endheaders()
            c.send(body if declared is None else b" " * (1 << 20))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before the whole body was sent
    r = c.getresponse()
    r.read()
    c.close()
    return r.status, time.perf_counter() - t


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run() -> dict:
    store = Path(tempfile.mkdtemp(prefix="medssl-serve-bench-"))
    uri = register(store)
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "medssl.cli", "serve", uri, "--port", str(port)], cwd=store, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: dict = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "date": dt.date.today().isoformat()}
    try:
        deadline = time.time() + 120
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/ping")
                if c.getresponse().status == 200:
                    break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        out["idle_rss_mib"] = round(rss_mib(proc.pid), 1)
        rng = np.random.default_rng(0)
        per_image = len(json.dumps(rng.integers(0, 256, (1, 28, 28, 3)).tolist()))
        n = int((16 << 20) * 0.98 / per_image)  # the most images under the default 16 MiB limit
        body = json.dumps({"inputs": rng.integers(0, 256, (n, 28, 28, 3)).tolist()}).encode()
        status, secs = request(port, body)
        out["largest_accepted"] = {"images": n, "body_mib": round(len(body) / 2**20, 2), "status": status,
                                   "seconds": round(secs, 2), "rss_after_mib": round(rss_mib(proc.pid), 1),
                                   "peak_rss_mib": round(rss_mib(proc.pid, "VmHWM"), 1)}
        status, secs = request(port, declared=651 << 20)
        out["declared_651_mib"] = {"status": status, "seconds": round(secs, 3), "rss_after_mib": round(rss_mib(proc.pid), 1)}
        status, secs = request(port, chunked=64 << 20)
        out["streamed_64_mib_no_length"] = {"status": status, "seconds": round(secs, 2),
                                            "rss_after_mib": round(rss_mib(proc.pid), 1)}
        out["peak_rss_mib"] = round(rss_mib(proc.pid, "VmHWM"), 1)
    finally:
        t = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        out["sigterm_exit_seconds"] = round(time.perf_counter() - t, 2)
    return out


if __name__ == "__main__":
    res = run()
    stem = ROOT / "benchmarks/results" / f"serve_cpu_{res['date']}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    a, d, s = res["largest_accepted"], res["declared_651_mib"], res["streamed_64_mib_no_length"]
    md = "\n".join([
        f"# medssl serve: memory and latency ({res['cpu']}, {res['cores']} cores, {res['date']})", "",
        "| request | status | seconds | server RSS after (MiB) |", "|---|---|---|---|",
        f"| idle | | | {res['idle_rss_mib']} |",
        f"| largest accepted: {a['images']} images, {a['body_mib']} MiB JSON | {a['status']} | {a['seconds']} | {a['rss_after_mib']} |",
        f"| Content-Length 651 MiB (1 MiB sent) | {d['status']} | {d['seconds']} | {d['rss_after_mib']} |",
        f"| 64 MiB chunked, no length | {s['status']} | {s['seconds']} | {s['rss_after_mib']} |", "",
        f"Peak RSS over the run: {res['peak_rss_mib']} MiB. SIGTERM to exit: {res['sigterm_exit_seconds']} s.", ""])
    stem.with_suffix(".md").write_text(md)
    write_index(stem.parent)
    print(md)
