"""ONNX export of the uint8-in / probabilities-out model and the parity check against PyTorch (no MLflow)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch


def export_onnx(model: torch.nn.Module, example: np.ndarray, path: Path) -> None:
    """uint8 (N, h, w, 3) -> probabilities (N, C), batch dimension dynamic."""
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(
            model, (torch.from_numpy(example),), str(path), dynamo=False, opset_version=17,
            input_names=["images"], output_names=["probabilities"],
            dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
        )
    onnx.checker.check_model(str(path))


def parity(model: torch.nn.Module, path: Path, images: np.ndarray) -> dict:
    """Max |ORT - PyTorch| over the probabilities and the fraction of equal argmax labels (CPU)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_p = sess.run(None, {"images": images})[0]
    with torch.no_grad():
        torch_p = model(torch.from_numpy(images)).numpy()
    return {"parity_max_abs_diff": float(np.abs(onnx_p - torch_p).max()),
            "parity_label_agreement": float((onnx_p.argmax(1) == torch_p.argmax(1)).mean()),
            "parity_images": int(len(images))}
