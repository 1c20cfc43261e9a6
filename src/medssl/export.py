"""Stage `export`: champion chosen on validation -> ONNX (preprocessing inside) -> parity gate -> registry.

Nothing is registered unless ONNX Runtime reproduces PyTorch within `export.parity_tolerance`.
"""
from __future__ import annotations

import os

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import torch
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from medssl import tracking
from medssl.config import Params
from medssl.core.onnx import export_onnx, parity
from medssl.errors import ParityError
from medssl.finetune import load_classifier
from medssl.io import read_json, write_json
from medssl.layout import Layout
from medssl.models.classifier import ExportModel


def pip_requirements() -> list[str]:
    # mlflow.onnx would record plain `onnxruntime`; this project runs onnxruntime-gpu (CPU + CUDA).
    return [f"onnx=={onnx.__version__}", f"onnxruntime-gpu=={ort.__version__}", f"numpy=={np.__version__}"]


def run_export(p: Params, lay: Layout = Layout()) -> dict:
    """The champion's classifier (stage `finetune`, chosen on validation) -> ONNX -> parity gate -> registry."""
    summary = read_json(lay.finetune_metrics)
    champion = summary["init"]
    model, ckpt = load_classifier(lay, torch.device("cpu"))
    export_model = ExportModel(model, ckpt["image_size"]).eval()
    with np.load(lay.raw(p.data.path)) as z:  # validated by `prepare`; data resolution, as users send
        val_raw = z["val_images"][: p.export.parity_images]
    classes = ckpt["classes"]
    test = read_json(lay.test_metrics)[champion]
    val = summary["val"]
    data_md5 = read_json(lay.meta)["raw_md5"]
    ONNX_PATH, EXPORT_METRICS = lay.onnx, lay.export_metrics

    tags = {**tracking.base_tags(p, data_md5), "stage": "export", "init": champion, "method": champion,
            "source_run_id": summary["run_id"]}
    tmp = ONNX_PATH.with_name(f".{ONNX_PATH.name}.tmp")
    ONNX_PATH.parent.mkdir(parents=True, exist_ok=True)
    with tracking.model_run(p, "export", tags, {"champion": champion, "select_metric": p.export.select_metric,
                                                **{f"candidate_val_{i}": v for i, v in (summary.get("candidates_val") or {}).items()},
                                                "parity_tolerance": p.export.parity_tolerance}) as run:
        try:
            export_onnx(export_model, val_raw[:2], tmp)
            check = parity(export_model, tmp, val_raw)
            mlflow.log_metrics(check)
            if check["parity_max_abs_diff"] > p.export.parity_tolerance:
                raise ParityError(
                    f"ONNX Runtime differs from PyTorch by {check['parity_max_abs_diff']:.3g} "
                    f"(> export.parity_tolerance {p.export.parity_tolerance:g}) on {check['parity_images']} "
                    f"validation images; {champion} not registered")
            os.replace(tmp, ONNX_PATH)
        finally:
            tmp.unlink(missing_ok=True)

        h, w = val_raw.shape[1:3]
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, h, w, 3), "images")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(classes)), "probabilities")]),
        )
        info = mlflow.onnx.log_model(
            onnx.load(str(ONNX_PATH)), name="model", signature=signature, input_example=val_raw[:2],
            pip_requirements=pip_requirements(),
            # pyfunc/serve sessions stay on CPU without CUDA-provider noise; `medssl predict` picks CUDA when present
            onnx_execution_providers=["CPUExecutionProvider"],
            metadata={"class_names": classes, "input_size": [int(h), int(w)], "image_size": ckpt["image_size"],
                      "init": champion, "backbone": ckpt["backbone"], "data_md5": data_md5},
        )
        mv = mlflow.register_model(info.model_uri, p.export.registered_model)
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(p.export.registered_model, p.export.alias, mv.version)
        version_tags = {"init": champion, "source_run_id": summary["run_id"], "export_run_id": run.info.run_id,
                        "data_md5": data_md5, "git_commit": tags["git_commit"], "select_metric": p.export.select_metric,
                        **{f"val_{k}": f"{v:.4f}" for k, v in val.items()}, **{f"test_{k}": f"{v:.4f}" for k, v in test.items()},
                        "parity_max_abs_diff": f"{check['parity_max_abs_diff']:.3g}"}
        for k, v in version_tags.items():
            client.set_model_version_tag(p.export.registered_model, mv.version, k, v)
        mlflow.set_tags({"registered_model": p.export.registered_model, "model_version": mv.version})

    result = {"champion": champion, "version": int(mv.version), "model_uri": f"models:/{p.export.registered_model}@{p.export.alias}",
              "onnx_bytes": ONNX_PATH.stat().st_size, **check,
              **{f"val_{k}": val[k] for k in ("accuracy", "balanced_accuracy", "auc_macro")},
              **{f"test_{k}": test[k] for k in ("accuracy", "balanced_accuracy", "auc_macro")}}
    write_json(EXPORT_METRICS, result)
    return result
