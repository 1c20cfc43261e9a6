"""HAM10000/ISIC layout as one case of the CSV source: image_id -> path, dx -> label, lesion_id -> group."""
import csv

import numpy as np
import pytest
from PIL import Image

from medssl.config import Columns, Csv
from medssl.data.folder import build_csv
from medssl.errors import DataError

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
HAM = Columns(path="image_id", label="dx", group="lesion_id")


def load_folder(img_dir, csv_path, size=28, val=0.1, test=0.2, seed=0, classes=CLASSES):
    """-> (splits, groups) of the HAM10000-layout folder, as data.source csv with HAM's columns builds it."""
    built = build_csv(Csv(file=str(csv_path), images=str(img_dir), columns=HAM, size=size, val=val, test=test),
                      seed, classes)
    return built.splits, built.groups


def make_folder(tmp_path, n_lesions=70, per_lesion=(1, 3), drop=()):
    """Real-looking layout from DermaMNIST pixels: several images per lesion, one class per lesion."""
    rng = np.random.default_rng(0)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rows = []
    for lesion in range(n_lesions):
        dx = CLASSES[lesion % 7]
        for j in range(rng.integers(per_lesion[0], per_lesion[1] + 1)):
            image_id = f"ISIC_{lesion:04d}{j}"
            if image_id not in drop:
                size = int(rng.integers(40, 90))
                Image.fromarray(rng.integers(0, 256, (size, size + 10, 3), dtype=np.uint8)).save(img_dir / f"{image_id}.jpg")
            rows.append({"lesion_id": f"HAM_{lesion:05d}", "image_id": image_id, "dx": dx})
    csv_path = tmp_path / "metadata.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["lesion_id", "image_id", "dx"])
        w.writeheader()
        w.writerows(rows)
    return img_dir, csv_path, rows


def test_no_lesion_in_two_splits(tmp_path):
    img_dir, csv_path, rows = make_folder(tmp_path)
    splits, groups = load_folder(img_dir, csv_path, size=28, val=0.15, test=0.2, seed=1)
    assert sum(len(s.labels) for s in splits.values()) == len(rows)
    sets = {k: set(v) for k, v in groups.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert all(len(s.labels) > 0 for s in splits.values())
    assert splits["train"].images.shape[1:] == (28, 28, 3) and splits["train"].images.dtype == np.uint8
    by_id = {r["lesion_id"]: CLASSES.index(r["dx"]) for r in rows}
    assert all(by_id[g] == y for g, y in zip(groups["test"], splits["test"].labels))


def test_csv_naming_missing_images_is_rejected_with_their_names(tmp_path):
    img_dir, csv_path, _ = make_folder(tmp_path, drop=("ISIC_00030", "ISIC_00120"))
    with pytest.raises(DataError) as e:
        load_folder(img_dir, csv_path, size=28)
    msg = str(e.value)
    assert "2 image(s)" in msg and "ISIC_00030" in msg and "ISIC_00120" in msg and str(csv_path) in msg


def test_unknown_class_and_missing_column(tmp_path):
    img_dir, csv_path, _ = make_folder(tmp_path, n_lesions=7)
    text = csv_path.read_text()
    csv_path.write_text(text.replace(",vasc", ",melanoma?", 1))
    with pytest.raises(DataError, match=r"unknown class\(es\) \['melanoma\?'\]"):
        load_folder(img_dir, csv_path, size=28)
    csv_path.write_text(text.replace("dx", "diagnosis", 1))
    with pytest.raises(DataError, match=r"missing column\(s\) \['dx'\]"):
        load_folder(img_dir, csv_path, size=28)


def test_fetch_builds_pipeline_input_from_folder(tmp_path):
    """data.source=folder: `medssl fetch` writes a MedMNIST-layout npz that `prepare` accepts."""
    import subprocess
    import sys

    import yaml

    img_dir, csv_path, rows = make_folder(tmp_path)
    p = yaml.safe_load(open("params.yaml"))
    p["data"].update(source="csv", csv={"file": str(csv_path), "images": str(img_dir), "size": 28,
                                        "columns": {"path": "image_id", "label": "dx", "group": "lesion_id"}},
                     path="data/raw.npz")  # under tmp_path, the project (cwd)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    for cmd in ("fetch", "prepare"):
        r = subprocess.run([sys.executable, "-m", "medssl.cli", cmd, "--params", str(tmp_path / "params.yaml")],
                           cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "data/raw.npz") as z:
        assert sum(len(z[f"{s}_labels"]) for s in ("train", "val", "test")) == len(rows)
        ids = [set(z[f"{s}_groups"]) for s in ("train", "val", "test")]
        assert z["class_names"].tolist() == CLASSES  # the dx values present, in order
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert (tmp_path / "data/prepared/dataset.npz").is_file()


def test_paths_under_home_are_expanded_and_a_file_is_not_a_folder(tmp_path, monkeypatch):
    """`~/…` in data.csv.file, data.csv.images and data.folder.images is the user's home, as in a shell; a folder
    source given a file says so."""
    from medssl.config import Folder
    from medssl.data.folder import build_folder

    monkeypatch.setenv("HOME", str(tmp_path))
    img_dir, csv_path, rows = make_folder(tmp_path)
    splits, _ = load_folder("~/images", "~/metadata.csv")
    assert sum(len(s.labels) for s in splits.values()) == len(rows)
    with pytest.raises(DataError, match=r"data.folder.images=~/metadata.csv: a file, not a folder"):
        build_folder(Folder(images="~/metadata.csv"), seed=0)
    with pytest.raises(DataError, match=r"data.folder.images=~/nowhere: no such folder"):
        build_folder(Folder(images="~/nowhere"), seed=0)
