"""Frozen-encoder protocols: linear probe and k-NN on backbone features (scikit-learn heads)."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from medssl.device import autocast
from medssl.models.classifier import to_input


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, images: torch.Tensor, mean, std, batch_size: int = 512) -> np.ndarray:
    """images: (N, S, S, 3) uint8 on the backbone's device -> (N, D) float32 pooled features (eval mode)."""
    backbone.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_input(images[i : i + batch_size], mean, std).contiguous(memory_format=torch.channels_last)
        with autocast(images.device):
            out.append(backbone(x).float().cpu())
    return torch.cat(out).numpy()


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, num_classes: int,
                 c: float, class_weight: str, seed: int = 0) -> np.ndarray:
    """Multinomial logistic regression on standardised frozen features -> eval probabilities (M, C).

    class_weight "balanced" weights each class by n / (k * n_class), so the probe minimises the loss
    the balanced-accuracy selection asks for; "none" fits the plain (prevalence-weighted) loss."""
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed, class_weight=None if class_weight == "none" else class_weight)
    clf.fit(scaler.transform(train_x), train_y)
    return _full_proba(clf.predict_proba(scaler.transform(eval_x)), clf.classes_, num_classes)


def knn_probe(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, num_classes: int, k: int = 20) -> np.ndarray:
    """Distance-weighted cosine k-NN on frozen features -> eval probabilities (M, C).

    Features are first divided by one train-set scale (cosine ignores it): scikit-learn treats row norms
    below ~1e-6 as zero, and a randomly initialised encoder in eval mode emits features of ~1e-10."""
    scale = float(np.abs(train_x).max()) or 1.0
    knn = KNeighborsClassifier(n_neighbors=min(k, len(train_y)), metric="cosine", weights="distance")
    knn.fit(train_x / scale, train_y)
    return _full_proba(knn.predict_proba(eval_x / scale), knn.classes_, num_classes)


def _full_proba(p: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Columns for classes absent from a small label fraction are zero."""
    out = np.zeros((len(p), num_classes))
    out[:, classes] = p
    return out
