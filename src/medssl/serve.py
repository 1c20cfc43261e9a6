"""`medssl serve`: a REST endpoint for a registered model, MLflow's request format, strict about its input.

POST /invocations  {"inputs": [[[[r, g, b], ...], ...], ...]}  (or "instances"): uint8 images (N, h, w, C) at
the model's input size and channels (C = 3 RGB; C = 1 grey, where (N, h, w) is taken too) ->
{"predictions": [[p_class, ...], ...], "classes": [...]}.
GET /ping, /health -> 200 with the model's URI, dataset, task, classes, input size and channels, when the model
answers finite probabilities on a built-in check image; else 503 {"status": "unhealthy", "reason": ...}.

Load: at most `concurrency` requests are scored at once and `queue` more wait; beyond that a request gets 503 at
once. Only requests count, never connections: idle sockets cost a file descriptor and are closed after
IDLE_SECONDS without a request; a body that does not arrive within BODY_SECONDS gets 408.

Refused with a clear message instead of being scored: a body over `max_bytes` (413; never parsed or kept,
but read and dropped up to DRAIN_BYTES, so that a client still sending it reads the answer rather than a
reset connection), more than `max_images` images (413), non-JSON (400), floats, booleans or values outside
0..255 (400: float images in [0, 1] would otherwise become black uint8 images), another image size or shape
(400).
"""

import asyncio
import json

import numpy as np

MAX_MB = 16          # default request body limit (a 28x28 RGB image is ~9 KB of JSON)
MAX_IMAGES = 4096
DRAIN_BYTES = 64 << 20  # an over-limit body up to this size is read (and dropped) before its 413 is sent
IDLE_SECONDS = 5        # a connection with no request in flight is closed after this long (also before its first)
BODY_SECONDS = 30       # a request body must arrive within this


class BadRequest(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def to_batch(payload, input_size: tuple[int, int], max_images: int, channels: int = 3) -> np.ndarray:
    """Parsed JSON -> (N, h, w, channels) uint8, or BadRequest naming what is wrong."""
    if not isinstance(payload, dict) or not ({"inputs", "instances"} & set(payload)):
        raise BadRequest(400, 'expected a JSON object {"inputs": [image, ...]} with uint8 images (h, w, channels)')
    data = payload.get("inputs", payload.get("instances"))
    if isinstance(data, dict):  # {"inputs": {"images": ...}}: the model's one named input
        data = data.get("images")
    try:
        arr = np.asarray(data)
    except ValueError as e:  # ragged nesting
        raise BadRequest(400, f"inputs are not a regular array of images ({e})") from None
    h, w = input_size
    if channels == 1 and arr.ndim in (2, 3) and arr.shape[-2:] == (h, w):  # grey images without a channel axis
        arr = arr[..., None]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype == bool or arr.dtype.kind not in "iuf":
        raise BadRequest(400, f"inputs must be integers 0..255, got {arr.dtype.name} values")
    if arr.ndim != 4 or arr.shape[1:] != (h, w, channels):
        raise BadRequest(400, f"inputs have shape {list(arr.shape)}; the model takes uint8 images [N, {h}, {w}, {channels}] "
                              f"(resize first; `medssl predict` does it for image files)")
    if len(arr) > max_images:
        raise BadRequest(413, f"{len(arr)} images in one request; the limit is {max_images}")
    if arr.size and arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            raise BadRequest(400, f"inputs must be integers 0..255 (uint8); got non-integer values in [{lo:g}, {hi:g}]"
                                  + ("; images scaled to [0, 1] must be multiplied by 255 first" if hi <= 1 else ""))
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise BadRequest(400, f"inputs must lie in 0..255 (uint8); got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(np.uint8)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number; inputs are integers 0..255")


def create_app(model_uri: str, max_bytes: int = MAX_MB << 20, max_images: int = MAX_IMAGES, concurrency: int = 4,
               queue: int | None = None):
    """queue: requests that may wait for one of the `concurrency` slots (default 4 x concurrency)."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    from medssl.errors import ModelIntegrityError, UsageError
    from medssl.inference import Predictor

    if concurrency < 1:
        raise UsageError(f"--concurrency {concurrency}: at least one request must be scored at a time")
    predictor = Predictor(model_uri)
    queue = 4 * concurrency if queue is None else queue
    slots, load = asyncio.Semaphore(concurrency), {"in": 0}
    app = FastAPI(title="medssl", description=__doc__)
    info = {"status": "ok", "model_uri": model_uri, "dataset": predictor.dataset, "task": predictor.task,
            "classes": predictor.classes, "input_size": list(predictor.input_size), "channels": predictor.channels,
            "max_request_bytes": max_bytes, "max_images": max_images}

    codes = {400: "BAD_REQUEST", 408: "REQUEST_TIMEOUT", 413: "REQUEST_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE",
             500: "INTERNAL_ERROR", 503: "TEMPORARILY_UNAVAILABLE"}

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error_code": codes[status], "message": message}, status_code=status)

    @app.get("/ping")
    @app.get("/health")
    async def health():
        async with slots:
            problem = await run_in_threadpool(predictor.check)
        if problem:
            return JSONResponse({**info, "status": "unhealthy", "reason": problem}, status_code=503)
        return info

    @app.post("/invocations")
    async def invocations(request: Request):
        if load["in"] >= concurrency + queue:
            return error(503, f"busy: {concurrency} requests being scored and {queue} waiting (`medssl serve "
                              f"--concurrency`); retry shortly")
        load["in"] += 1
        try:
            return await asyncio.wait_for(answer(request), BODY_SECONDS)
        except TimeoutError:
            return error(408, f"request not answered within {BODY_SECONDS} s (its body arrived too slowly)")
        finally:
            load["in"] -= 1

    async def answer(request: Request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype != "application/json":
            return error(415 if ctype else 400, f"content type {ctype or 'missing'}; send application/json")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            if int(declared) <= DRAIN_BYTES:
                async for _ in request.stream():
                    pass
            return error(413, f"request body is {int(declared) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:g} MiB "
                              f"(`medssl serve --max-request-mb`); send fewer images per request")
        body, size = bytearray(), 0
        async for chunk in request.stream():  # no (or a false) Content-Length: count what arrives
            size += len(chunk)
            if size <= max_bytes:
                body += chunk
            elif size > DRAIN_BYTES:
                break
        if size > max_bytes:
            return error(413, f"request body exceeds {max_bytes / 2**20:g} MiB (`medssl serve --max-request-mb`)")
        try:
            payload = json.loads(body, parse_constant=_no_constant)
        except ValueError as e:
            return error(400, f"body is not valid JSON ({e})")
        except RecursionError:
            return error(400, "body is JSON nested too deeply; images are 4 levels: [N][h][w][channels]")
        del body
        try:
            images = to_batch(payload, predictor.input_size, max_images, predictor.channels)
        except BadRequest as e:
            return error(e.status, str(e))
        del payload
        async with slots:
            try:
                proba = await run_in_threadpool(predictor.predict, images)
            except ModelIntegrityError as e:
                return error(500, str(e))
        return {"predictions": proba.tolist(), "classes": predictor.classes}

    return app


def _protocol():
    """uvicorn's h11 protocol that also closes a connection which sends nothing for IDLE_SECONDS after it opens
    (uvicorn times out only the idle time after a response)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    return Protocol


def serve(model_uri: str, host: str, port: int, max_mb: float, max_images: int, concurrency: int) -> None:
    import uvicorn

    app = create_app(model_uri, int(max_mb * 2**20), max_images, concurrency)
    uvicorn.run(app, host=host, port=port, http=_protocol(), timeout_keep_alive=IDLE_SECONDS,
                h11_max_incomplete_event_size=64 << 10, timeout_graceful_shutdown=5, log_level="info")
