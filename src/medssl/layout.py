"""Layout(root): every path medssl reads or writes, defined once (dvc.yaml names the same files).

Stage functions take a Layout instead of relying on the working directory, so the CLI, dvc.yaml,
the Prefect flow and tuning trials (a Layout per trial folder) all write where they mean to.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")
    data_root: Path | None = None  # where raw and prepared data live, if not under root (tuning trials)
    prepared_root: Path | None = None  # where prepared data live, if not under data_root (tuning's own subsets)

    def __post_init__(self):  # relative roots stay relative: they follow the working directory, as DVC does
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "data_root", Path(self.root if self.data_root is None else self.data_root))
        object.__setattr__(self, "prepared_root", Path(self.data_root if self.prepared_root is None else self.prepared_root))

    def tuning(self) -> Layout:
        """Where `medssl tune` prepares the data it searches on (its -S data.image_size / data.max_* may differ from
        the project's): tune/data/prepared, never the project's data/prepared (a DVC output)."""
        return Layout(self.root / "tune", data_root=self.data_root, prepared_root=self.root / "tune")

    def raw(self, data_path: str) -> Path:
        """The raw npz (params data.path), relative to the data root unless absolute."""
        return self.data_root / data_path

    @property
    def config_check(self) -> Path:
        """Stage validate's output: constant content, so every stage can wait for it without rerunning."""
        return self.root / "metrics/config.json"

    @property
    def data_source(self) -> Path:
        """Where fetch took the raw data from (source, path, md5): metrics/source.json."""
        return self.root / "metrics/source.json"

    # prepare
    @property
    def prepared(self) -> Path:
        return self.prepared_root / "data/prepared/dataset.npz"

    @property
    def meta(self) -> Path:
        return self.prepared_root / "data/prepared/meta.json"

    @property
    def data_card(self) -> Path:
        return self.root / "metrics/data_card.json"

    # pretrain@<method>
    def encoder(self, method: str, seed: int | None = None) -> Path:
        """The encoder pretrained with params.yaml's seed (None), or with another seed (budgets.<b>.pretrain_per_seed)."""
        return self.root / f"models/pretrain/{method}/{'encoder' if seed is None else f'encoder_s{seed}'}.pt"

    def pretrain_metrics(self, method: str) -> Path:
        return self.root / f"metrics/pretrain/{method}.json"

    def pretrain_curves(self, method: str) -> Path:
        return self.root / f"plots/pretrain/{method}.csv"

    # grid@<init>
    def grid_cells(self, init: str) -> Path:
        return self.root / f"metrics/grid/{init}.json"

    def grid_features(self, init: str) -> Path:
        return self.root / f"models/grid/{init}/features.npz"

    def grid_probas(self, init: str) -> Path:
        """Held-out (test, shift) class probabilities of every cell, for the paired statistics."""
        return self.root / f"models/grid/{init}/probas.npz"

    def grid_curves(self, init: str) -> Path:
        return self.root / f"plots/grid/{init}.csv"

    # finetune (the champion's classifier on all labels)
    @property
    def classifier(self) -> Path:
        return self.root / "models/finetune/model.pt"

    def finalist(self, init: str) -> Path:
        """One finalist's classifier (budgets.<b>.finalists > 1); the best on validation is copied to `classifier`."""
        return self.root / f"models/finetune/finalists/{init}.pt"

    @property
    def finetune_metrics(self) -> Path:
        return self.root / "metrics/finetune.json"

    @property
    def finetune_curves(self) -> Path:
        return self.root / "plots/finetune/curves.csv"

    # evaluate, export
    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def verdict(self) -> Path:
        return self.reports / "verdict.md"

    @property
    def report_md(self) -> Path:
        return self.reports / "report.md"

    @property
    def test_metrics(self) -> Path:
        return self.root / "metrics/test.json"

    @property
    def report_metrics(self) -> Path:
        return self.root / "metrics/report.json"

    @property
    def headline_metrics(self) -> Path:
        return self.root / "metrics/headline.json"

    @property
    def report_plots(self) -> Path:
        return self.root / "plots/report"

    @property
    def onnx(self) -> Path:
        return self.root / "models/champion.onnx"

    @property
    def export_metrics(self) -> Path:
        return self.root / "metrics/export.json"

    @property
    def dvc_lock(self) -> Path:  # DVC's record of the last reproduction, logged on the pipeline's parent run
        return self.root / "dvc.lock"

    # one writer at a time (guard.exclusive); not outputs either
    def lock(self, name: str) -> Path:
        return self.root / f".medssl/locks/{name}.lock"

    # resumable state (not a DVC output: DVC deletes a stage's outputs before it reruns it)
    def resume(self, name: str) -> Path:
        return self.root / f".medssl/resume/{name}.pt"
