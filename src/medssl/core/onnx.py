"""ONNX export of the uint8-in / probabilities-out model and the parity check against PyTorch (no MLflow, no files:
the shell decides where a model is written)."""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch


def export_onnx(model: torch.nn.Module, example: np.ndarray):
    """-> checked onnx.ModelProto: uint8 (N, h, w, 3) -> probabilities (N, C), batch dimension dynamic."""
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(
            model, (torch.from_numpy(example),), buf, dynamo=False, opset_version=17,
            input_names=["images"], output_names=["probabilities"],
            dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
        )
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    return proto


def cpu_session(proto):
    """An ONNX Runtime session of `proto` (onnx.ModelProto) on the CPU."""
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def parity(model: torch.nn.Module, proto, images: np.ndarray) -> dict:
    """Max |ORT - PyTorch| over the probabilities and the fraction of equal argmax labels (CPU)."""
    onnx_p = cpu_session(proto).run(None, {"images": images})[0]
    with torch.no_grad():
        torch_p = model(torch.from_numpy(images)).numpy()
    return {"parity_max_abs_diff": float(np.abs(onnx_p - torch_p).max()),
            "parity_label_agreement": float((onnx_p.argmax(1) == torch_p.argmax(1)).mean()),
            "parity_images": int(len(images))}
