"""benchmarks/results/README.md: the newest result of each benchmark and host, by the date the run recorded."""
import json

from benchmarks.index import write_index


def hot_loops(folder, stem, date, avx512, fps):
    meta = {"date": date, "gpu": None, "cpu": "Test CPU", "avx512": avx512, "threads": 2, "image_size": 64,
            "commit": stem.rsplit("_", 1)[-1]}
    res = {"train_finetune": {"fast_images_per_s": fps, "naive_images_per_s": fps / 2}}
    (folder / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": res}))
    (folder / f"{stem}.md").write_text("# result\n")


def test_the_index_links_the_newest_result_per_host(tmp_path):
    hot_loops(tmp_path, "cpu_2026-12-01_aaaaaaa", "2026-12-01T10:00:00+00:00", False, 100.0)
    hot_loops(tmp_path, "cpu_2026-12-03_bbbbbbb", "2026-12-03T10:00:00+00:00", False, 150.0)
    hot_loops(tmp_path, "cpu-avx512_2026-11-30_ccccccc", "2026-11-30T10:00:00+00:00", True, 300.0)
    (tmp_path / "serve_cpu_2026-11-23.json").write_text(json.dumps({"date": "2026-11-23", "cpu": "Test CPU", "cores": 2}))
    (tmp_path / "notes.json").write_text("[1, 2]")  # not a result: left out, no error
    rows = [r for r in write_index(tmp_path).read_text().splitlines() if r.startswith("| ") and "benchmark" not in r]
    assert len(rows) == 3, rows
    cpu = next(r for r in rows if r.startswith("| hot loops, cpu |"))
    assert "bbbbbbb" in cpu and "150 img/s" in cpu and "(cpu_2026-12-03_bbbbbbb.md)" in cpu and "aaaaaaa" not in cpu
    assert any(r.startswith("| hot loops, cpu-avx512 |") and "ccccccc" in r for r in rows)
    serve = next(r for r in rows if r.startswith("| serve |"))
    assert "2026-11-23" in serve and "| - |" in serve  # no markdown beside it: no link
    assert not list(tmp_path.glob("*.tmp"))
