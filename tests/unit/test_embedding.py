"""What `pipelines.embed` refuses before it starts Ray or writes anything (the embedding itself runs in
tests/e2e/test_embed.py)."""

from __future__ import annotations

import pytest

from selfsup.embedding import EmbedJob, embed_collection, list_images
from selfsup.errors import DatasetError, TrackingError
from tests.e2e.test_embed import photo_folder
from tests.unit.test_serving import register


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("store")
    register(root)  # into root's own store, whatever MLFLOW_TRACKING_URI says
    return f"sqlite:///{root / 'mlflow.db'}"


@pytest.mark.parametrize(
    ("images", "model", "error", "says"),
    [
        ("nowhere", None, DatasetError, "--images .*nowhere is not a folder"),
        ("empty", None, DatasetError, "--images .*empty holds no images"),
        ("file://{tmp}/nowhere", None, DatasetError, "--images file://.*nowhere cannot be listed"),
        ("photos", "models:/test-encoder@production", TrackingError, "has no alias 'production'; its aliases: champ"),
        ("photos", "models:/nobody@champion", TrackingError, "no registered model 'nobody'"),
        ("photos", "models:/test-encoder/9", TrackingError, "has no version 9; its versions: 1"),
        ("photos", "runs:/abc/encoder", TrackingError, "expected models:/NAME@ALIAS or models:/NAME/VERSION"),
    ],
)
def test_bad_input_is_refused_before_ray_starts_and_nothing_is_written(
    store, tmp_path, monkeypatch, images, model, error, says
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing listens there: reaching for Ray would fail otherwise
    photo_folder(tmp_path / "photos", 2)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no image")
    where = images.format(tmp=tmp_path) if "://" in images else str(tmp_path / images)
    job = EmbedJob(model or "models:/test-encoder@champion", where, tmp_path / "out", store)
    with pytest.raises(error, match=says) as raised:
        embed_collection(job)
    assert "\n" not in str(raised.value) and not (tmp_path / "out").exists()


def test_a_missing_store_is_named_rather_than_created(tmp_path) -> None:
    photo_folder(tmp_path / "photos", 1)
    missing = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(TrackingError, match="no MLflow store at sqlite:///.*mlflow.db: run `dvc repro`"):
        embed_collection(EmbedJob("models:/x@champion", str(tmp_path / "photos"), tmp_path / "out", missing))
    assert not (tmp_path / "mlflow.db").exists()


def test_the_listing_is_every_image_at_any_depth_sorted_for_paths_and_file_uris(tmp_path) -> None:
    images = photo_folder(tmp_path / "photos", 7)
    assert list_images(str(tmp_path / "photos")) == sorted(images)
    assert list_images(f"file://{tmp_path / 'photos'}") == [f"file://{path}" for path in sorted(images)]
