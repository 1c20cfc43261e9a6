"""The registered model's python_function flavour: its model.onnx behind a check of what it is given.

`mlflow.pyfunc.load_model(...)` and `mlflow models serve` load this file from the model's own code/ folder
(export copies it there; it needs numpy, onnxruntime and MLflow only, not medssl). The model takes uint8
pixel values (N, h, w, c) at the size and channels it was trained on; anything else is refused with one
short line that names the fix (MLflow's scoring server answers it as HTTP 400), never "predicted": floats
in [0, 1] cast to uint8 would be black images, scored with confidence.

Input:  (N, h, w, c) integers 0-255 (uint8, or the int64 / integral floats JSON gives), a {"images": ...}
        dict of the same, or one image (h, w, c).
Output: (N, classes) float32 probabilities, the same rows `medssl serve` returns as "predictions".
"""
from __future__ import annotations

import os

import numpy as np

SERVER_ENV = "__pyfunc_model_path__"  # set by `mlflow models serve` for its scoring process


def _load_pyfunc(path: str) -> Guarded:
    """MLflow's loader hook: path is the model's model.onnx."""
    if SERVER_ENV in os.environ:
        # the scoring server quotes the whole request array before a model's error message: keep that quote short
        np.set_printoptions(threshold=1, edgeitems=1, precision=2)
    return Guarded(path)


def _refuse(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class Guarded:
    def __init__(self, path: str):
        import onnxruntime as ort

        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        spec = self.session.get_inputs()[0]
        self.name, (self.h, self.w, self.c) = spec.name, spec.shape[1:]

    def predict(self, data, params=None) -> np.ndarray:
        x = self.images(data)
        return self.session.run(None, {self.name: x})[0]

    def images(self, data) -> np.ndarray:
        """data -> (N, h, w, c) uint8, or an MlflowException naming what is wrong and the fix."""
        want = f"uint8 0-255, shape (N, {self.h}, {self.w}, {self.c})"
        if isinstance(data, dict):
            if set(data) != {self.name}:
                raise _refuse(f"expected one input named {self.name!r} ({want}); got {sorted(map(str, data))}")
            data = data[self.name]
        if type(data).__name__ == "DataFrame":
            raise _refuse(f'send the images as a tensor, {{"inputs": [...]}} of {want}, not a DataFrame')
        try:
            x = np.asarray(data)
        except ValueError:
            x = np.asarray(data, dtype=object)
        if x.dtype == object or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise _refuse(f"images must be {want}; got {x.dtype} values (ragged lists, strings or booleans)")
        if x.ndim == 3 and x.shape == (self.h, self.w, self.c):
            x = x[None]
        if x.ndim != 4:
            raise _refuse(f"images must be {want}; got shape {x.shape}")
        if x.shape[3] != self.c:
            kind = {1: "grey (1 channel)", 3: "RGB (3 channels)"}.get(self.c, f"{self.c}-channel")
            raise _refuse(f"the model takes {kind} images; got {x.shape[3]} channel(s): convert them first "
                          f"(PIL: Image.convert({'L' if self.c == 1 else 'RGB'!r}))")
        if x.shape[1:3] != (self.h, self.w):
            raise _refuse(f"the model takes {self.h}x{self.w} images; got {x.shape[1]}x{x.shape[2]}: resize them first "
                          f"(`medssl predict` resizes image files)")
        if x.size:
            lo, hi = float(x.min()), float(x.max())
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise _refuse(f"images must be {want}; got NaN or infinite values")
            if np.issubdtype(x.dtype, np.floating) and not np.array_equal(x, np.round(x)):
                hint = ": scaled to [0, 1]? multiply by 255, round" if hi <= 1 else ""
                raise _refuse(f"images are uint8 0-255; got fractions in [{lo:.3g}, {hi:.3g}]{hint}")
            if lo < 0 or hi > 255:
                raise _refuse(f"images must be {want}; got values in [{lo:.6g}, {hi:.6g}]")
        return np.ascontiguousarray(x, dtype=np.uint8)
