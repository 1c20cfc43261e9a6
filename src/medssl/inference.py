"""Inference with a registered model: `models:/<name>@<alias>` -> class probabilities for image files."""
from __future__ import annotations

import csv
import hashlib
import io
import sys
from pathlib import Path

import numpy as np

from medssl.errors import ImageReadError, ModelIntegrityError, UsageError
from medssl.host import has_nvidia_gpu

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
MAX_UPSCALE = 4  # smaller images are refused: a 1x1 file would be "predicted" with confidence


def onnx_providers(cuda: bool | None = None) -> list[str]:
    """The providers to ask ONNX Runtime for, the one way Predictor, `medssl doctor` and the benchmark ask it.
    cuda None: CUDA when a GPU is really usable (asking for CUDA on a CPU host logs errors); True: CUDA whatever
    the host claims (doctor on a host that claims a GPU, the benchmark on CUDA); False: the CPU. Asking for CUDA
    first loads the CUDA libraries torch's wheels carry (`preload_dlls`), which onnxruntime-gpu needs to load it."""
    import onnxruntime as ort

    auto = cuda is None
    if auto:
        cuda = has_nvidia_gpu() and "CUDAExecutionProvider" in ort.get_available_providers()
    if cuda:
        import torch  # its CUDA wheels carry the libraries onnxruntime-gpu loads

        cuda = torch.cuda.is_available() or not auto
    if not cuda:
        return ["CPUExecutionProvider"]
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _registered() -> str:
    """The models the registry holds, with their aliases, as a user would address them (for a wrong model URI)."""
    import mlflow

    try:
        models = mlflow.MlflowClient().search_registered_models(max_results=20)
    except Exception:  # the registry itself did not answer: the error before this says why
        return "`medssl pipeline` registers one"
    if not models:
        return "the registry holds none: `medssl pipeline` registers one"
    return "registered here: " + ", ".join(
        f"models:/{m.name}" + "".join(f" @{a}" for a in sorted(m.aliases or {})) for m in models)


class Predictor:
    """uint8 (N, h, w, channels) at the model's input size -> probabilities (N, classes)."""

    def __init__(self, model_uri: str):
        import mlflow
        import onnxruntime as ort
        from mlflow.exceptions import MlflowException
        from mlflow.models import Model

        from medssl.tracking import existing_store

        existing_store()
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
        except MlflowException as e:
            raise UsageError(f"{model_uri}: no such model in the registry at {mlflow.get_tracking_uri()} "
                             f"({e.message.splitlines()[0][:200]}); {_registered()}") from None
        meta = Model.load(local).metadata or {}
        if "class_names" not in meta or "input_size" not in meta:
            raise UsageError(f"{model_uri}: not a medssl model (MLmodel metadata lacks class_names/input_size)")
        self.classes: list[str] = list(meta["class_names"])
        self.input_size: tuple[int, int] = tuple(meta["input_size"])
        self.channels: int = int(meta.get("channels", 3))  # 1: a grey model (colour files are read as their luma)
        self.task: str = meta.get("task", "multiclass")
        self.dataset: str | None = meta.get("dataset")
        self.uri = model_uri
        path = local / "model.onnx"
        if "onnx_sha256" in meta:  # versions exported before the digest was recorded load unchecked
            found = hashlib.sha256(path.read_bytes()).hexdigest()
            if found != meta["onnx_sha256"]:
                raise ModelIntegrityError(f"{model_uri}: model.onnx (sha256 {found[:12]}…) is not the file registered "
                                          f"(sha256 {meta['onnx_sha256'][:12]}…): the stored copy is damaged; "
                                          f"export the model again")
        asked = onnx_providers()
        try:
            self.session = ort.InferenceSession(str(path), providers=asked)
        except Exception as e:  # truncated or overwritten
            raise ModelIntegrityError(f"{model_uri}: model.onnx does not load ({str(e).splitlines()[0][:160]})") from None
        if asked[0] not in self.session.get_providers():  # CUDA compiled in but its libraries did not load
            print(f"warning: {model_uri}: onnxruntime could not load {asked[0]} and runs on the CPU "
                  f"(`medssl doctor` says why)", file=sys.stderr)

    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Probabilities (N, classes), each row finite; a model that answers anything else raises instead."""
        if batch_size < 1:
            raise UsageError(f"batch size {batch_size}: must be at least 1")
        out = [self.session.run(None, {"images": images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)]
        proba = np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)
        bad = ~np.isfinite(proba).all(1)
        if bad.any():
            raise ModelIntegrityError(f"{self.uri}: non-finite probabilities for {int(bad.sum())} of {len(proba)} "
                                      f"image(s) (first: #{int(bad.argmax())}); the model's weights are damaged")
        return proba

    def check(self) -> str | None:
        """None when the model answers finite probabilities summing to 1 on a built-in check image (mid-grey),
        else what is wrong."""
        image = np.full((1, *self.input_size, self.channels), 128, np.uint8)
        try:
            proba = self.predict(image)
        except ModelIntegrityError as e:
            return str(e)
        if not np.allclose(proba.sum(1), 1.0, atol=1e-3):
            return f"{self.uri}: probabilities on the check image sum to {float(proba.sum()):.4g}, not 1"
        return None


def list_images(paths: list[Path]) -> list[Path]:
    """Files as given, and PNG/JPEG files under folders (recursive, sorted)."""
    files = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise ImageReadError(f"{p}: no such file or folder")
    return files


def read_images(files: list[Path], size: tuple[int, int], fit: str = "reject", channels: int = 3) -> np.ndarray:
    """(N, h, w, channels) uint8; every unreadable or unfit file is named in one error, not only the first."""
    from medssl.data.images import fit_image, open_rgb, to_channels

    out, bad = np.empty((len(files), *size, channels), np.uint8), []
    for i, f in enumerate(files):
        try:
            img = open_rgb(f)
            if min(img.shape[0] * MAX_UPSCALE / size[0], img.shape[1] * MAX_UPSCALE / size[1]) < 1:
                raise ImageReadError(f"{f}: {img.shape[1]}x{img.shape[0]} is too small for the model's {size[1]}x{size[0]} "
                                     f"input (enlarging it over {MAX_UPSCALE}x would invent the image)")
            out[i] = to_channels(fit_image(img, size, fit, str(f)), channels)
        except ImageReadError as e:
            bad.append(str(e))
    if bad:
        raise ImageReadError(f"{len(bad)} of {len(files)} image(s) refused:\n  " + "\n  ".join(bad[:50])
                             + (f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""))
    return out


def predict_files(model_uri: str, paths: list[Path], batch_size: int = 256, fit: str = "reject") -> list[dict]:
    files = list_images(paths)
    if not files:
        raise ImageReadError(f"no PNG/JPEG files in {[str(p) for p in paths]}")
    predictor = Predictor(model_uri)
    images = read_images(files, predictor.input_size, fit, predictor.channels)
    proba = predictor.predict(images, batch_size)
    return [
        {"file": str(f), "predicted": predictor.classes[int(p.argmax())],
         **{f"p_{c}": f"{p[j]:.6f}" for j, c in enumerate(predictor.classes)}}
        for f, p in zip(files, proba)
    ]


def write_rows(rows: list[dict], out: Path | None) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    if out is None:
        sys.stdout.write(buf.getvalue())
    else:
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(buf.getvalue())
        tmp.replace(out)
