"""Stage `export`: champion chosen on validation -> ONNX (preprocessing inside) -> parity gate -> registry.

Nothing is registered unless ONNX Runtime reproduces PyTorch within `export.parity_tolerance` and the model
beats a constant (majority-class) predictor on validation. A registered version takes the alias only when
it beats the model holding it on this data version's validation split (both scored here, as ONNX, on the
same images), or with `--force`; its tags and description say why it was or was not promoted.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import torch
from mlflow.models import Model
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from medssl import registry_guard, tracking
from medssl.checkpoints import how_chosen, load_classifier
from medssl.config import Params
from medssl.core.onnx import cpu_session, export_onnx, parity
from medssl.data.sources import nhwc
from medssl.errors import MissingInput, ParityError, PromotionError, StaleStageError
from medssl.guard import one_writer
from medssl.io import read_json, write_json
from medssl.layout import Layout
from medssl.metric_names import BRIEF, LABEL, TABLE
from medssl.metrics import classification_metrics, with_interval
from medssl.models.classifier import ExportModel


def pip_requirements() -> list[str]:
    # mlflow.onnx would record plain `onnxruntime`; this project runs onnxruntime-gpu (CPU + CUDA).
    return [f"onnx=={onnx.__version__}", f"onnxruntime-gpu=={ort.__version__}", f"numpy=={np.__version__}"]


def onnx_scores(proto, images: np.ndarray, labels: np.ndarray, classes: list[str], batch: int = 512) -> dict:
    """Validation metrics of an ONNX model (onnx.ModelProto: uint8 images at its input size -> probabilities)."""
    sess = cpu_session(proto)
    proba = np.concatenate([sess.run(None, {"images": images[i : i + batch]})[0] for i in range(0, len(images), batch)])
    return classification_metrics(labels, proba.astype(np.float64), classes)  # as core.train.scores: not renormalised


def constant_scores(labels: np.ndarray, classes: list[str]) -> dict:
    """The same metrics for a model that always answers the majority class of `labels` with certainty."""
    proba = np.zeros((len(labels), len(classes)))
    proba[:, np.bincount(labels, minlength=len(classes)).argmax()] = 1.0
    return classification_metrics(labels, proba, classes)


def current_champion(name: str, alias: str) -> mlflow.entities.model_registry.ModelVersion | None:
    client = mlflow.MlflowClient()
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def score_version(name: str, version, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """A registered version's validation metrics on these images (resized to its input size if it differs)."""
    from medssl.data.images import fit_image

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}"))
    meta = Model.load(local).metadata or {}
    if list(meta.get("class_names", [])) != list(classes):
        raise PromotionError(f"models:/{name}/{version} predicts classes {meta.get('class_names')}, not {classes}")
    h, w = meta["input_size"]
    if int(meta.get("channels", 3)) != images.shape[-1]:
        raise PromotionError(f"models:/{name}/{version} takes {meta.get('channels', 3)}-channel images, these have "
                             f"{images.shape[-1]}")
    if images.shape[1:3] != (h, w):
        images = np.stack([fit_image(im, (h, w), "stretch") for im in images])
    return onnx_scores(onnx.load(str(local / "model.onnx")), images, labels, classes)


def promotion(p: Params, candidate: dict, champion_version, images, labels, classes, force: bool) -> tuple[bool, str, dict]:
    """(promote?, why, the current champion's validation metrics or {})."""
    metric = p.export.select_metric
    if champion_version is None:
        return True, f"first model under alias {p.export.alias!r}", {}
    name, v = p.export.registered_model, champion_version.version
    try:
        held = score_version(name, v, images, labels, classes)
    except Exception as e:  # an unreadable or foreign champion: promote only on request
        if force:
            return True, f"--force (current champion v{v} could not be scored: {e})", {}
        return False, f"current champion v{v} could not be scored on this validation split ({e}); use --force", {}
    cmp = f"val {metric} {candidate[metric]:.4f} vs current champion v{v} {held[metric]:.4f} (same {len(labels)} images)"
    if candidate[metric] > held[metric]:
        return True, f"beats the current champion: {cmp}", held
    if force:
        return True, f"--force: {cmp}", held
    return False, f"does not beat the current champion: {cmp}", held


@one_writer(lambda a: "export")
def run_export(p: Params, lay: Layout = Layout(), force: bool = False) -> dict:
    """The champion's classifier (stage `finetune`, chosen on validation) -> ONNX -> parity and sanity gates ->
    registry; the alias moves only to a model that beats the current one on validation (or with `force`)."""
    model, ckpt = load_classifier(lay.classifier, torch.device("cpu"))  # with its provenance: init, run, validation scores
    chosen = how_chosen(p.export.select_metric, ckpt)
    champion = ckpt["init"]
    export_model = ExportModel(model, ckpt["image_size"]).eval()
    with np.load(lay.raw(p.data.path)) as z:  # validated by `prepare`; data resolution, as users send
        val_all, val_labels = nhwc(z["val_images"]), z["val_labels"].reshape(-1).astype(np.int64)
    val_raw = val_all[: p.export.parity_images]
    classes = ckpt["classes"]
    test = scored_test(lay, champion)
    # what the comparison says (stage evaluate), repeated in the version's description
    status = (read_json(lay.report_metrics).get("verdict") or {}) if lay.report_metrics.is_file() else {}
    val = ckpt["val"]
    meta = read_json(lay.meta)
    data_md5 = meta["raw_md5"]

    tags = {**tracking.base_tags(p, data_md5), "stage": "export", "init": champion, "method": champion,
            "source_run_id": ckpt["run_id"]}
    with tracking.stage_run(p, "export", tags, {"champion": champion, "select_metric": p.export.select_metric,
                                                **{f"candidate_val_{i}": v for i, v in (ckpt.get("candidates_val") or {}).items()},
                                                **{f"finalist_val_{i}": v for i, v in (ckpt.get("finalists_val") or {}).items()},
                                                "parity_tolerance": p.export.parity_tolerance}) as run:
        proto = export_onnx(export_model, val_raw[:2])  # in memory: lay.onnx is the alias's model, written below
        check = parity(export_model, proto, val_raw)
        tracking.log_summary(check, "summary/parity.json")  # tables: the parent run's headline holds parity/* as metrics
        if check["parity_max_abs_diff"] > p.export.parity_tolerance:
            raise ParityError(
                f"ONNX Runtime differs from PyTorch by {check['parity_max_abs_diff']:.3g} "
                f"(> export.parity_tolerance {p.export.parity_tolerance:g}) on {check['parity_images']} "
                f"validation images; {champion} not registered")
        onnx_val = onnx_scores(proto, val_all, val_labels, classes)
        floor = constant_scores(val_labels, classes)
        metric = p.export.select_metric
        tracking.log_summary({k: onnx_val[k] for k in BRIEF}, "summary/onnx_val.json")
        if not onnx_val[metric] > floor[metric]:
            raise PromotionError(
                f"{champion}: validation {metric} {onnx_val[metric]:.4f} is no better than a constant "
                f"majority-class predictor ({floor[metric]:.4f}) on {len(val_labels)} images; not registered")
        held_by = current_champion(p.export.registered_model, p.export.alias)
        promote, reason, held = promotion(p, onnx_val, held_by, val_all, val_labels, classes, force)

        h, w, c = val_raw.shape[1:4]
        # no input schema: MLflow would cast a request to it first (floats in [0, 1] to black uint8 images) and
        # answer a wrong shape with the array dumped; registry_guard checks the input (uint8 (N, h, w, c)) itself
        signature = ModelSignature(outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(classes)), "probabilities")]))
        info = Model.log(
            artifact_path=None, name="model", flavor=GuardedOnnx, onnx_model=proto, code_paths=[registry_guard.__file__],
            signature=signature, input_example=val_raw[:2],
            pip_requirements=pip_requirements(), save_as_external_data=False,  # one file, the digest's bytes
            # pyfunc/serve sessions stay on CPU without CUDA-provider noise; `medssl predict` picks CUDA when present
            onnx_execution_providers=["CPUExecutionProvider"],
            metadata={"class_names": classes, "input_size": [int(h), int(w)], "channels": int(c), "image_size": ckpt["image_size"],
                      "dataset": p.data.name, "task": meta.get("task", "multiclass"),
                      **({"positive_class": meta["positive_class"]} if meta.get("positive_class") else {}),
                      "init": champion, "backbone": ckpt["backbone"], "data_md5": data_md5,
                      "onnx_sha256": onnx_sha256(proto)},  # medssl's loaders refuse a model.onnx that differs
        )
        name, client = p.export.registered_model, mlflow.MlflowClient()
        try:
            client.create_registered_model(name, description=registry_description(p, meta, (h, w, c)))
        except mlflow.exceptions.MlflowException as e:
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
            client.update_registered_model(name, description=registry_description(p, meta, (h, w, c)))
        # tags: what one filters or sorts versions on; the full record is the description and the runs
        version_tags = {"promoted": str(promote).lower(), "promotion_reason": reason,
                        **({"compared_with_version": str(held_by.version),
                            f"champion_val_{metric}": f"{held[metric]:.4f}"} if held else {}),
                        f"onnx_val_{metric}": f"{onnx_val[metric]:.4f}",
                        "init": champion, "source_run_id": ckpt["run_id"], "export_run_id": run.info.run_id,
                        "config_digest": ckpt["config_digest"], "onnx_sha256": onnx_sha256(proto),
                        "data_md5": data_md5, "git_commit": tags["git_commit"], "select_metric": p.export.select_metric,
                        f"val_{metric}": f"{val[metric]:.4f}",
                        **{f"test_{k}": f"{test[k]:.4f}" for k in BRIEF},
                        "parity_max_abs_diff": f"{check['parity_max_abs_diff']:.3g}"}
        version = Version(init=champion, backbone=ckpt["backbone"], data_md5=data_md5, model_uri=info.model_uri,
                          size=(h, w, c), image_size=ckpt["image_size"], val=val, test=test, check=check, promote=promote, reason=reason,
                          chosen=chosen)
        description = version_description(p, meta, version) + (f"\n\nThe comparison, {status['story']}." if status else "")
        # one call: a version exists complete (tags, description) or not at all
        mv = client.create_model_version(name, info.model_uri, run_id=run.info.run_id, tags=version_tags,
                                         description=description, model_id=info.model_id)
        if promote:  # last: the alias never points at a version whose record is incomplete
            client.set_registered_model_alias(name, p.export.alias, mv.version)
        alias_model = champion_file(p, lay)  # models/champion.onnx is the alias's model, moved or not
        mlflow.set_tags({"registered_model": name, "model_version": mv.version, "champion_file_version": alias_model,
                         "promoted": str(promote).lower(), "promotion_reason": reason})

    result = {"champion": champion, "select_metric": p.export.select_metric, "version": int(mv.version),
              **({"finalists_val": ckpt["finalists_val"]} if ckpt.get("finalists_val") else {}),
              "chosen": chosen,
              "promoted": promote, "reason": reason, **({"verdict": status["story"]} if status else {}),
              "model_uri": f"models:/{p.export.registered_model}@{p.export.alias}",
              "version_uri": f"models:/{p.export.registered_model}/{mv.version}",
              f"onnx_val_{metric}": onnx_val[metric], **({f"champion_val_{metric}": held[metric]} if held else {}),
              "onnx_bytes": len(proto.SerializeToString()), "onnx_sha256": onnx_sha256(proto),
              "champion_file_version": alias_model, **check,
              # the parity error as a share of what the gate allows: `dvc metrics show` prints 5 decimals (1e-6 reads 0.0)
              "parity_of_tolerance": check["parity_max_abs_diff"] / p.export.parity_tolerance,
              **{f"val_{k}": val[k] for k in BRIEF},
              **{f"test_{k}": test[k] for k in BRIEF}}
    write_json(lay.export_metrics, result)
    return result


class GuardedOnnx:
    """mlflow.onnx's flavour, its python_function loader swapped for registry_guard (copied into the model's
    code/ folder): `mlflow.pyfunc.load_model` and `mlflow models serve` check their input before model.onnx runs.
    The onnx flavour and model.onnx stay as mlflow.onnx writes them (medssl's loaders read that file)."""

    __name__ = "medssl.registry_guard"  # what Model.log calls the flavour in its messages

    @staticmethod
    def save_model(path, mlflow_model, **kwargs):
        mlflow.onnx.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        mlflow_model.flavors["python_function"]["loader_module"] = Path(registry_guard.__file__).stem
        mlflow_model.save(str(Path(path) / "MLmodel"))


def onnx_sha256(proto) -> str:
    """Digest of an ONNX model as it is written to model.onnx (its serialised bytes)."""
    return hashlib.sha256(proto.SerializeToString()).hexdigest()


def scored_test(lay: Layout, init: str) -> dict:
    """The test metrics `evaluate` wrote for this very checkpoint, or an error naming the stale stage."""
    from medssl.data.sources import md5sum

    if not lay.test_metrics.is_file():
        raise MissingInput(f"{lay.test_metrics} missing: run `medssl evaluate` first")
    test = dict(read_json(lay.test_metrics).get(init) or {})
    if test.pop("model_md5", None) != md5sum(lay.classifier):
        raise StaleStageError(f"{lay.test_metrics} scores another {lay.classifier} than the one there now (finetune ran "
                              f"after evaluate): run `medssl evaluate` first")
    return test


def champion_file(p: Params, lay: Layout) -> str:
    """Make lay.onnx the model the alias points at (one self-contained file, replaced atomically and only when it
    differs); returns that version, or "" when the alias is unset."""
    mv = current_champion(p.export.registered_model, p.export.alias)
    if mv is None:
        return ""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{p.export.registered_model}/{mv.version}"))
    data = onnx.load(str(local / "model.onnx")).SerializeToString()  # with any external data files of older versions
    if not (lay.onnx.is_file() and lay.onnx.read_bytes() == data):
        tmp = lay.onnx.with_name(f".{lay.onnx.name}.tmp")
        lay.onnx.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, lay.onnx)
    return str(mv.version)


def champion_line(ex: dict) -> str:
    """What the champion's messages say (medssl pipeline, the Prefect log): how it was chosen, its version, and
    whether the alias moved. ex: metrics/export.json."""
    moved = (f"{ex['model_uri']} now points at it" if ex["promoted"]
             else f"not promoted, {ex['model_uri']} unchanged")
    return f"champion {ex['champion']} ({ex['chosen']}) registered as {ex['version_uri']}; {moved} ({ex['reason']})"


def _input(size: tuple[int, int, int]) -> str:
    h, w, c = size
    return f"uint8 {'grey' if c == 1 else 'RGB'} images (N, {h}, {w}, {c})"


def _task(meta: dict) -> str:
    task, classes = meta.get("task", "multiclass"), meta["classes"]
    return (f"{task} task, {len(classes)} classes: {', '.join(classes)}"
            + (f"; positive class {meta['positive_class']}" if meta.get("positive_class") else ""))


def registry_description(p: Params, meta: dict, size: tuple[int, int, int]) -> str:
    name, alias, classes = p.export.registered_model, p.export.alias, meta["classes"]
    return (f"{p.data.name} classifier ({_task(meta)}) trained by medssl: the init "
            f"(random, ImageNet, or self-supervised on the domain's own images) that scored best on validation "
            f"`{p.export.select_metric}`, fine-tuned on all labels, exported to ONNX with preprocessing inside. "
            f"`@{alias}` points at the best version so far (it moves only to a strictly better one). "
            f"Input: {_input(size)}; output: class probabilities (N, {len(classes)}).\n\n"
            f"Use: `mlflow.pyfunc.load_model('models:/{name}@{alias}').predict(images)`, "
            f"`medssl predict models:/{name}@{alias} <images or folders>`, or `medssl serve models:/{name}@{alias}` "
            f"(REST: POST {{\"inputs\": [...]}} to /invocations).")


@dataclass(frozen=True)
class Version:
    """What a registered version records: the init and backbone it was trained from, the data file's md5, its logged
    model's URI, its input (h, w, channels), validation and test scores, the ONNX parity check, and whether (and
    why) the alias moved to it."""
    init: str
    backbone: str
    data_md5: str
    model_uri: str
    size: tuple            # input (h, w, channels)
    image_size: int        # the resolution it was trained at (the graph resizes its input to it)
    val: dict
    test: dict
    check: dict
    promote: bool
    reason: str
    chosen: str = ""  # how_chosen: by the comparison (on validation, among its finalists) or named by the user


def version_description(p: Params, meta: dict, v: Version) -> str:
    init, backbone, data_md5, model_uri, size = v.init, v.backbone, v.data_md5, v.model_uri, v.size
    val, test, check, promote, reason = v.val, v.test, v.check, v.promote, v.reason
    classes = meta["classes"]
    from medssl.metrics import task_metrics

    val, test = val | task_metrics(val, meta), test | task_metrics(test, meta)
    extra = (("kappa_quadratic",) if meta.get("task") == "ordinal" else
             ("sensitivity", "specificity") if "sensitivity" in test else ())
    rows = "\n".join(f"| {LABEL[k]} | {val[k]:.4f} | {with_interval(test, k)} |" for k in (*extra, *TABLE))
    return (f"**{init}** init, {backbone}, trained on {p.data.name} (data md5 `{data_md5}`, the file DVC records as "
            f"`data.path`) at {v.image_size} px ({_task(meta)}); {v.chosen}; "
            f"test only scored.\n\n"
            f"| metric | validation | test |\n|---|---|---|\n{rows}\n\nIn brackets: a test score's 95 % interval over "
            f"stratified resamples of the test images. "
            f"ONNX Runtime matches PyTorch within {check['parity_max_abs_diff']:.2g} on {check['parity_images']} images. "
            f"{'Promoted to' if promote else 'Not promoted to'} @{p.export.alias}: {reason}.\n\n"
            f"Input {_input(size)}; output probabilities (N, {len(classes)}) in the order "
            f"{', '.join(classes)}. Load: `mlflow.pyfunc.load_model('{model_uri}')` (this version's logged model); batch: "
            f"`medssl predict {model_uri} <images>`.")
