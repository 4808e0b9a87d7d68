"""DVC remote round trip on (a copy of) the shared tiny pipeline (conftest's e2e_project): one
person commits and `dvc push`es to a local-directory default remote; a fresh clone `dvc pull`s and
`dvc repro` runs nothing; a changed param makes only the stages that depend on it stale."""

import json
import shutil
import time

import yaml

from conftest import sh


def test_push_then_fresh_clone_pull_and_repro_runs_nothing(e2e_project, tmp_path):
    template, env = e2e_project
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'unused.db'}"}
    origin = tmp_path / "origin"
    shutil.copytree(template, origin, symlinks=True)  # the shared project stays as it is
    remote = tmp_path / "dvc-remote"
    sh(["dvc", "remote", "add", "-d", "team", str(remote)], origin, env)
    sh(["git", "add", "-A"], origin, env)
    sh(["git", "commit", "-qm", "results", "--allow-empty"], origin, env)
    pushed = sh(["dvc", "push"], origin, env).stdout
    assert "pushed" in pushed and any(remote.rglob("*")), pushed

    start = time.perf_counter()
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    assert not (clone / "models/model.onnx").exists()
    sh(["dvc", "pull"], clone, env)
    out = sh(["dvc", "repro"], clone, env).stdout
    seconds = time.perf_counter() - start
    assert "Running stage" not in out, out
    assert "Data and pipelines are up to date" in out, out
    for path in ("models/baseline.pt", "models/model.onnx", "data/prepared/card.json"):
        assert (clone / path).read_bytes() == (origin / path).read_bytes(), path
    print(f"clone + dvc pull + dvc repro (nothing ran): {seconds:.1f} s")

    # the other person changes one param: only the stages that read it are stale (validate
    # reads all of params.yaml; report follows once benchmark's outputs change)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["benchmark"]["repeats"] += 1
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = set(json.loads(sh(["dvc", "status", "--json"], clone, env).stdout))
    assert stale == {"validate", "benchmark"}, stale
