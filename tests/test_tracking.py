"""Run tags: the commit a run came from is dirty only when the user changed a tracked file, not when the
pipeline rewrote its own outputs."""
import subprocess

from medssl.tracking import git_commit


def test_pipeline_outputs_do_not_make_the_commit_dirty(tmp_path, monkeypatch):
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "metrics").mkdir()
    for f in ("params.yaml", "dvc.lock", "metrics/report.json"):
        (tmp_path / f).write_text("a: 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.chdir(tmp_path)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit() == sha
    (tmp_path / "dvc.lock").write_text("a: 2\n")
    (tmp_path / "metrics/report.json").write_text("a: 2\n")
    assert git_commit() == sha  # the pipeline's own outputs
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert git_commit() == sha + "-dirty"  # the user's change
