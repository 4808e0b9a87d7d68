"""Where stage runs are tracked and which code version they are tagged with."""

import subprocess

from bnnprune import tracking


def git_repo(path, message):
    path.mkdir()
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}
    for cmd in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", message]):
        subprocess.run(cmd, cwd=path, env=env, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_queued_experiment_is_tagged_with_its_own_checkout_but_tracks_to_the_project(
        tmp_path, monkeypatch):
    """DVC runs a queued experiment in a temporary copy and points DVC_ROOT at the project:
    the runs go to the project's database, tagged with the copy's commit (the project's HEAD
    may have moved on since the experiment was queued)."""
    project_head = git_repo(tmp_path / "project", "later work")
    copy_head = git_repo(tmp_path / "copy", "queued experiment")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))
    monkeypatch.chdir(tmp_path / "copy")
    assert tracking.git_commit() == copy_head != project_head
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'project' / 'mlflow.db'}"
