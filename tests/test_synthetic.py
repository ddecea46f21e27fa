"""The scaled-up synthetic collection (raytrieval.evaluation.synthetic)."""

import hashlib
import json

import numpy as np
import pytest

from raytrieval.evaluation.synthetic import RECORD, generate_collection, read_labels
from raytrieval.mining.verify import PairVerifier, VerifyConfig, VerifyTask
from dataclasses import asdict


def _digests(folder):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted((folder / "jpg").glob("*.jpg"))}


def test_same_arguments_give_identical_files_whatever_the_processes(tmp_path):
    one = generate_collection(tmp_path / "one", 50, views_per_scene=4, workers=1)
    two = generate_collection(tmp_path / "two", 50, views_per_scene=4, workers=2)
    assert _digests(one) == _digests(two)
    assert len(_digests(one)) == 50
    assert read_labels(one) == read_labels(two)
    other = generate_collection(tmp_path / "seed1", 50, seed=1, views_per_scene=4)
    assert _digests(other) != _digests(one)


def test_labels_count_scenes_views_and_distractors(tmp_path):
    folder = generate_collection(tmp_path / "c", 103, views_per_scene=6, distractor_fraction=0.3)
    config = json.loads((folder / RECORD).read_text())["config"]
    labels = np.array(list(read_labels(folder).values()))
    assert config["n_scenes"] == round(103 * 0.7) // 6 == 12
    assert (labels == -1).sum() == config["n_distractors"] == 103 - 12 * 6
    assert np.bincount(labels[labels >= 0]).tolist() == [6] * 12
    assert (labels[:20] != np.sort(labels)[:20]).any()  # names say nothing about scenes


def test_a_current_copy_is_kept_and_a_changed_one_regenerated(tmp_path):
    folder = generate_collection(tmp_path / "c", 24, views_per_scene=4)
    first = folder / "jpg" / "img_000000.jpg"
    stamp = first.stat().st_mtime_ns
    assert generate_collection(tmp_path / "c", 24, views_per_scene=4) == folder
    assert first.stat().st_mtime_ns == stamp
    generate_collection(tmp_path / "c", 24, views_per_scene=3)
    assert json.loads((folder / RECORD).read_text())["config"]["views_per_scene"] == 3


@pytest.mark.parametrize("kwargs, name", [
    ({"n_images": 1}, "n_images"), ({"n_images": 10, "views_per_scene": 1}, "views_per_scene"),
    ({"n_images": 10, "distractor_fraction": 1.0}, "distractor_fraction"),
    ({"n_images": 10, "canvas_scale": 2.0}, "canvas_scale"), ({"n_images": 10, "seed": -1}, "seed"),
    ({"n_images": 10, "workers": 0}, "workers"), ({"n_images": 3, "views_per_scene": 4}, "n_images"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate_collection(tmp_path / "c", **kwargs)


def test_views_of_one_scene_verify_and_other_scenes_do_not(tmp_path):
    folder = generate_collection(tmp_path / "c", 40, views_per_scene=8, distractor_fraction=0.0, canvas_scale=0.5)
    labels = read_labels(folder)
    by_scene: dict[int, list[str]] = {}
    for image_id, scene in labels.items():
        by_scene.setdefault(scene, []).append(image_id)
    path = {i: str(folder / "jpg" / f"{i}.jpg") for i in labels}
    same = [(a, b) for ids in by_scene.values() for a, b in zip(ids[:-1], ids[1:])]
    other = [(by_scene[s][0], by_scene[s + 1][0]) for s in range(len(by_scene) - 1)] + \
            [(by_scene[s][1], by_scene[s + 2][2]) for s in range(len(by_scene) - 2)]
    verifier = PairVerifier(asdict(VerifyConfig()))
    task = VerifyTask(0, [(a, path[a], b, path[b]) for a, b in same + other])
    inliers = verifier.verify(task)["rows"]["inliers"]
    same_in, other_in = np.array(inliers[:len(same)]), np.array(inliers[len(same):])
    assert other_in.max() < 15  # no false link between scenes
    assert (same_in >= 15).mean() >= 0.4  # views with most of the object visible verify
