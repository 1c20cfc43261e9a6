"""`medssl serve`: a REST endpoint for a registered model, MLflow's request format, strict about its input.

POST /invocations  {"inputs": [[[[r, g, b], ...], ...], ...]}  (or "instances"): uint8 images (N, h, w, C) at
the model's input size and channels (C = 3 RGB; C = 1 grey, where (N, h, w) is taken too) ->
{"predictions": [[p_class, ...], ...], "classes": [...]}.
GET /ping, /health -> 200 with the model's URI, dataset, task, classes, input size and channels.

Refused with a clear message instead of being scored: a body over `max_bytes` (413; never parsed or kept,
but read and dropped up to DRAIN_BYTES, so that a client still sending it reads the answer rather than a
reset connection), more than `max_images` images (413), non-JSON (400), floats, booleans or values outside
0..255 (400: float images in [0, 1] would otherwise become black uint8 images), another image size or shape
(400).
"""

import json

import numpy as np

MAX_MB = 16          # default request body limit (a 28x28 RGB image is ~9 KB of JSON)
MAX_IMAGES = 4096
DRAIN_BYTES = 64 << 20  # an over-limit body up to this size is read (and dropped) before its 413 is sent


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


def create_app(model_uri: str, max_bytes: int = MAX_MB << 20, max_images: int = MAX_IMAGES):
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    from medssl.inference import Predictor

    predictor = Predictor(model_uri)
    app = FastAPI(title="medssl", description=__doc__)
    info = {"status": "ok", "model_uri": model_uri, "dataset": predictor.dataset, "task": predictor.task,
            "classes": predictor.classes, "input_size": list(predictor.input_size), "channels": predictor.channels,
            "max_request_bytes": max_bytes, "max_images": max_images}

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error_code": "BAD_REQUEST" if status == 400 else "REQUEST_TOO_LARGE", "message": message},
                            status_code=status)

    @app.get("/ping")
    @app.get("/health")
    def health():
        return info

    @app.post("/invocations")
    async def invocations(request: Request):
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
            payload = json.loads(body)
        except ValueError as e:
            return error(400, f"body is not valid JSON ({e})")
        del body
        try:
            images = to_batch(payload, predictor.input_size, max_images, predictor.channels)
        except BadRequest as e:
            return error(e.status, str(e))
        del payload
        proba = await run_in_threadpool(predictor.predict, images)
        return {"predictions": proba.tolist(), "classes": predictor.classes}

    return app


def serve(model_uri: str, host: str, port: int, max_mb: float, max_images: int, concurrency: int) -> None:
    import uvicorn

    app = create_app(model_uri, int(max_mb * 2**20), max_images)
    uvicorn.run(app, host=host, port=port, limit_concurrency=concurrency, timeout_graceful_shutdown=5,
                log_level="info")
