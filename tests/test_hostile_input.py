"""Bad input gets a clear error that names it; odd but valid input is read faithfully."""
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import write_npz
from medssl.config import load_params
from medssl.data.images import MAX_PIXELS, fit_image, open_rgb, read_image
from medssl.data.sources import fetch, load_npz, md5sum
from medssl.errors import ConfigError, DataError, ImageReadError
from medssl.serve import BadRequest, to_batch
from test_folder_source import load_folder, make_folder


def test_16_bit_palette_and_alpha_images_are_converted_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    assert np.array_equal(open_rgb(tmp_path / "sixteen.png"), np.repeat(grey[..., None], 3, 2))  # not all white
    rgb = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(rgb).quantize(16).save(tmp_path / "palette.png")
    assert np.array_equal(open_rgb(tmp_path / "palette.png"), np.asarray(Image.open(tmp_path / "palette.png").convert("RGB")))
    Image.fromarray(np.dstack([rgb, np.full((28, 28), 128, np.uint8)])).save(tmp_path / "rgba.png")
    assert np.array_equal(open_rgb(tmp_path / "rgba.png"), rgb)
    Image.fromarray(rng.random((8, 8)).astype(np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(ImageReadError, match="float.tiff: floating-point image"):
        open_rgb(tmp_path / "float.tiff")


def test_oversized_image_is_refused_before_decoding(tmp_path):
    big = tmp_path / "big.png"
    Image.new("1", (15000, 13000)).save(big)  # 195 Mpx, a few kB on disk
    with pytest.raises(ImageReadError, match=r"big.png: 195 Mpx is over the limit of 64 Mpx"):
        read_image(big, (28, 28))
    Image.new("1", (9000, 8000)).save(big)  # over the limit, under twice it: our own check, with the size
    with pytest.raises(ImageReadError, match=r"big.png: 9000x8000 pixels \(72 Mpx\) is over the limit"):
        read_image(big, (28, 28))
    assert 15000 * 13000 > MAX_PIXELS


def test_non_square_images_follow_fit():
    tall = np.zeros((40, 28, 3), np.uint8)
    tall[:6] = 255  # rows a centre crop drops
    with pytest.raises(ImageReadError, match=r"x: 28x40 does not have the model input's shape \(28x28\).*--fit crop"):
        fit_image(tall, (28, 28), "reject", "x")
    assert fit_image(tall, (28, 28), "crop").max() == 0
    assert fit_image(tall, (28, 28), "stretch").shape == (28, 28, 3)
    assert fit_image(np.zeros((450, 450, 3), np.uint8), (28, 28), "reject").shape == (28, 28, 3)


def test_folder_lists_every_bad_file_and_refuses_duplicate_ids(tmp_path):
    img_dir, csv_path, rows = make_folder(tmp_path)
    for r in rows[:3]:
        (img_dir / f"{r['image_id']}.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError) as e:
        load_folder(img_dir, csv_path, size=28)
    assert "3 of" in str(e.value) and all(r["image_id"] in str(e.value) for r in rows[:3])
    (tmp_path / "dup").mkdir()
    img_dir, csv_path, rows = make_folder(tmp_path / "dup")
    text = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([*text, text[1].replace(rows[0]["dx"], "vasc" if rows[0]["dx"] != "vasc" else "nv")]) + "\n")
    with pytest.raises(DataError, match=rf"1 duplicate image_id\(s\): \['{rows[0]['image_id']} \(rows 2 and {len(rows) + 2}\)'\]"):
        load_folder(img_dir, csv_path, size=28)


def test_identical_images_in_two_splits_are_refused(tmp_path):
    img_dir, csv_path, rows = make_folder(tmp_path)
    text = csv_path.read_text().splitlines()
    copies = []
    for i in range(7):  # the same pixels under new image and lesion ids
        src = rows[i]
        Image.open(img_dir / f"{src['image_id']}.jpg").save(img_dir / f"COPY_{i}.png")
        copies.append(f"NEW_{i},COPY_{i},{src['dx']}")
    csv_path.write_text("\n".join([*text, *copies]) + "\n")
    with pytest.raises(DataError, match=r"appear in two splits \(identical pixels\)") as e:
        load_folder(img_dir, csv_path, size=28, seed=0)
    assert "COPY_" in str(e.value)
    x = write_npz(tmp_path / "leak.npz")
    with np.load(x) as z:
        arrays = dict(z)
    arrays["test_images"][3] = arrays["train_images"][5]
    np.savez(tmp_path / "leak.npz", **arrays)
    with pytest.raises(DataError, match=r"train\[5\] = test\[3\]"):
        load_npz(tmp_path / "leak.npz")


def test_split_without_a_class_and_non_square_npz_are_refused(tmp_path):
    labels = (np.arange(40) % 6).astype(np.uint8)[:, None]  # no vasc in val
    with pytest.raises(DataError, match=r"val split has no example of class\(es\) \['6'\]"):
        load_npz(write_npz(tmp_path / "a.npz", val_labels=labels))
    wide = {f"{s}_images": np.zeros((40, 28, 40, 3), np.uint8) for s in ("train", "val", "test")}
    with pytest.raises(DataError, match="images are 40x28.*square"):
        load_npz(write_npz(tmp_path / "b.npz", **wide))


def test_bad_source_never_replaces_good_data(tmp_path, monkeypatch):
    good = write_npz(tmp_path / "good.npz")
    target = tmp_path / "raw/data.npz"
    fetch(target, str(good))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    monkeypatch.setenv("MEDSSL_DATA_PATH", str(bad))
    with pytest.raises(DataError, match="not a readable npz"):
        fetch(target)
    assert md5sum(target) == md5sum(good)
    with pytest.raises(DataError, match="is data.path, the fetch stage's output"):
        fetch(target, str(target))


@pytest.mark.parametrize("override,words", [
    ({"finetune.lr": True}, "finetune.lr: expected a number or string, got a boolean"),
    ({"finetune.lr": "abc"}, "finetune.lr: Input should be a valid number"),
    ({"data.image_size": 30}, "data.image_size: must be a multiple of 16"),
    ({"inits.ssl": ["simclrr"]}, "inits.ssl.0: Input should be 'vae', 'simclr', 'mim', 'imagenet-simclr' or 'imagenet-mim'"),
    ({"pretrain.mim.patch": 5}, "pretrain.mim.patch=5 does not divide budgets.demo.image_size=32"),
    ({"data.npz": "data/raw/images.npz"}, "data.npz (data/raw/images.npz) is data.path"),
])
def test_config_is_strict(override, words):
    with pytest.raises(ConfigError) as e:
        load_params("params.yaml", override)
    assert words in str(e.value)


def test_invalid_override_stops_before_any_stage_removes_outputs(tmp_path):
    """`medssl validate` (dvc.yaml's first stage) fails on the value; no other stage runs."""
    p = yaml.safe_load(open("params.yaml"))
    p["finetune"]["lr"] = "abc"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    r = subprocess.run([sys.executable, "-m", "medssl.cli", "validate", "--params", str(tmp_path / "params.yaml")],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "finetune.lr" in r.stderr and "No stage ran" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("payload,status,words", [
    ({"inputs": [[[[0.5, 0.5, 0.5]]]]}, 400, "multiplied by 255"),
    ({"inputs": [[[[1, 2]]]]}, 400, "shape [1, 1, 1, 2]"),
    ({"inputs": [[[[True, False, True]]]]}, 400, "integers"),
    ({"inputs": [[[["a", "b", "c"]]]]}, 400, "integers"),
    ({"inputs": [[[[-1, 0, 0]]]]}, 400, "0..255"),
    ({"inputs": [[[[1, 2, 3]], [[1, 2]]]]}, 400, "regular array"),
    ([1, 2, 3], 400, '"inputs"'),
    ({"inputs": [[[[1, 2, 3]]]] * 3}, 413, "limit is 2"),
])
def test_rest_payload_checks(payload, status, words):
    with pytest.raises(BadRequest) as e:
        to_batch(payload, (1, 1), max_images=2)
    assert e.value.status == status and words in str(e.value)
    assert to_batch({"inputs": [[[[0, 128, 255]]]]}, (1, 1), 2).dtype == np.uint8


def test_predict_outside_the_project_creates_no_store(tmp_path):
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "x.png")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    r = subprocess.run([sys.executable, "-m", "medssl.cli", "predict", "models:/derm-classifier@champion", "x.png"],
                       cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "no MLflow store at" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    """The same user error: one line by default, the traceback with --debug (and still exit code 1, not 2)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "medssl.cli"]
    args = ["predict", "models:/derm-classifier@champion", "missing.png"]
    plain = subprocess.run(cmd + args, cwd=tmp_path, capture_output=True, text=True, env=env)
    debug = subprocess.run(cmd + ["--debug", *args], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and len(plain.stderr.strip().splitlines()) <= 3, plain.stderr
    assert debug.returncode == 1 and "Traceback" in debug.stderr, debug.stderr


def test_pipeline_set_writes_params_keeping_comments_and_refuses_bad_values(tmp_path):
    """`medssl pipeline -S budget=cpu` sets the value in params.yaml as `dvc exp run -S` does (every comment and every
    other line kept); an invalid value stops with the field named and leaves the file byte for byte."""
    from medssl.config import write_params

    path = tmp_path / "params.yaml"
    before = open("params.yaml").read()
    path.write_text(before)
    write_params(path, {"budget": "cpu", "grid.seeds": [0, 1, 3]})
    after = path.read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(before.splitlines()) == len(after.splitlines()) and len(changed) == 2
    assert changed[0][1].startswith("budget: cpu ") and changed[0][1].split("#")[1] == changed[0][0].split("#")[1]
    assert changed[1][1].startswith("  seeds: [0, 1, 3] ") and load_params(path).budget == "cpu"
    r = subprocess.run([sys.executable, "-m", "medssl.cli", "pipeline", "--params", str(path), "-S", "budget=huge"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "budget 'huge' is not one of budgets" in r.stderr and "Traceback" not in r.stderr
    assert path.read_text() == after


def test_only_medssl_user_errors_end_in_one_line():
    """Every error medssl raises for bad input is a UserError (one line, exit 2); a ValueError or
    FileNotFoundError from anywhere else is a fault and reaches the user with its traceback."""
    import inspect

    import typer

    from medssl import errors
    from medssl.cli import _clear_errors

    ours = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == "medssl.errors"]
    assert len(ours) >= 15 and all(issubclass(c, errors.UserError) for c in ours), ours

    @_clear_errors
    def command(e: Exception):
        raise e

    for e in (errors.MissingInput("models/finetune/model.pt missing: run `medssl finetune` first"),
              errors.UsageError("MEDSSL_DEVICE='tpu': expected cpu or cuda"), errors.ConfigError("finetune.lr: bad")):
        with pytest.raises(typer.Exit) as ex:
            command(e)
        assert ex.value.exit_code == 2
    for e in (ValueError("an internal invariant"), FileNotFoundError("a file medssl itself should have written"),
              KeyError("x")):
        with pytest.raises(type(e)):
            command(e)


def test_report_html_holds_the_tables_it_links_to(tmp_path):
    """A relative link leads nowhere in MLflow's sandboxed viewer: report.html carries each CSV it links to as a
    table at its end, the link pointing there; an empty CSV (no comparison was possible) is an empty table."""
    from medssl.evaluate import to_html

    (tmp_path / "paired_differences.csv").write_text("init,diff\nvae,-0.0046834400855\nmim,<b>\n")
    (tmp_path / "empty.csv").write_text("")
    html = to_html("See [paired](paired_differences.csv), [none](empty.csv) and [away](missing.csv).", "t", tmp_path)
    assert 'href="#paired_differences.csv"' in html and '<details id="paired_differences.csv">' in html
    assert "<td>-0.004683</td>" in html and "<td>&lt;b&gt;</td>" in html  # rounded, escaped
    assert '<details id="empty.csv"><summary>empty.csv: 0 rows' in html
    assert 'href="missing.csv"' in html and 'id="missing.csv"' not in html  # a file that is not there stays a link
