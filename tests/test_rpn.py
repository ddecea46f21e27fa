"""The proposal head learns a box planted in every image; its Ray Train run checkpoints and resumes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from trainset import _texture  # noqa: E402

from raytrieval.retrieval.rpn import collection_regions, load_proposal_net, propose  # noqa: E402
from raytrieval.trainers.rpn import RpnConfig, backbone_model, fit_rpn, new_head, train_rpn  # noqa: E402


def planted(folder: Path, n: int, seed: int) -> np.ndarray:
    """n textures (128 x 112) with a photo pasted at a random place and size; returns the boxes."""
    from skimage import data

    rng = np.random.default_rng(seed)
    obj = Image.fromarray(data.chelsea())
    folder.mkdir(parents=True, exist_ok=True)
    boxes = []
    for i in range(n):
        canvas = Image.fromarray(_texture(rng, 140)).crop((0, 0, 128, 112))
        s = int(rng.integers(40, 72))
        x, y = int(rng.integers(0, 128 - s)), int(rng.integers(0, 112 - s))
        canvas.paste(obj.resize((s, s)), (x, y))
        canvas.save(folder / f"im{i:02d}.png")
        boxes.append([x, y, x + s, y + s])
    return np.array(boxes, np.float32)


def collection(root: Path, n: int) -> dict[str, str]:
    from raytrieval.mining.cleaning import clusters_table, write_clusters
    from raytrieval.retrieval.manifest import build_manifest, write_manifest

    boxes = planted(root / "jpg", n, 0)
    manifest = build_manifest(root / "jpg", progress=False)
    write_manifest(manifest, root / "images.parquet")
    ids = manifest.column("image_id").to_pylist()
    assert ids == [f"im{i:02d}" for i in range(n)]
    write_clusters(clusters_table(ids, np.zeros(n, np.int64), boxes), root / "clusters.parquet")
    return {"manifest": str(root / "images.parquet"), "clusters": str(root / "clusters.parquet")}


def top_iou(model, head, images: list[str], boxes: np.ndarray) -> np.ndarray:
    from torchvision.ops import box_iou

    props = propose(model, head, images)
    return np.array([float(box_iou(torch.from_numpy(b[:1]), torch.from_numpy(t[None]))[0, 0])
                     for (b, _), t in zip(props, boxes)])


def test_rpn_learns_the_planted_box(tmp_path):
    torch.set_num_threads(1)
    cfg = RpnConfig(**collection(tmp_path / "c", 40), image_size=192, epochs=10, batch_size=4, lr=1e-3)
    truth = planted(tmp_path / "held_out", 8, 1)  # fresh images, fresh positions
    images = [str(p) for p in sorted((tmp_path / "held_out").glob("*.png"))]
    model = backbone_model(cfg)
    untrained = top_iou(model, new_head(cfg, model.backbone.out_channels), images, truth)
    trained = top_iou(model, train_rpn(cfg), images, truth)
    assert (trained >= 0.6).mean() >= 0.75, trained
    assert (untrained >= 0.6).mean() <= 0.25, untrained
    assert trained.mean() > untrained.mean() + 0.2


def _corners(rows: list[dict]) -> list[list[float]]:
    return [[r[c] for c in ("x0", "y0", "x1", "y1")] for r in rows]


def test_rpn_fits_through_ray_train_and_resumes(tmp_path, ray_session):
    """Two workers for one epoch, then `raytrieval regions` on the same run directory resumes
    at epoch 1 with one worker and writes the collection's regions.parquet."""
    from raytrieval.cluster.cli import main
    from raytrieval.retrieval.regions import read_regions

    paths = collection(tmp_path / "c", 6)
    cfg = RpnConfig(**paths, image_size=64, epochs=1, batch_size=2, workers=2, cpus_per_worker=0.5,
                    out=str(tmp_path / "c"), name="rpn", proposals=5)
    final = fit_rpn(cfg)
    assert json.loads((final / "rpn.json").read_text())["epoch"] == 1
    assert main(["regions", "--run-dir", str(tmp_path / "c"), "--epochs", "2", "--image-size", "64",
                 "--proposals", "5", "--workers", "1"]) == 0
    meta = json.loads((final / "rpn.json").read_text())
    assert meta["epoch"] == 2 and meta["proposals"] == 5
    table = read_regions(tmp_path / "c" / "regions.parquet")
    assert set(table.column("image_id").to_pylist()) == {f"im{i:02d}" for i in range(6)}
    assert 6 <= table.num_rows <= 30
    head = load_proposal_net(final)
    again = collection_regions(backbone_model(cfg), head, ["im00", "im01"],
                               [str(tmp_path / "c" / "jpg" / f"im0{i}.png") for i in range(2)])
    mine = [r for r in table.to_pylist() if r["image_id"] in ("im00", "im01")]
    assert [r["image_id"] for r in again.to_pylist()] == [r["image_id"] for r in mine]
    np.testing.assert_allclose(_corners(again.to_pylist()), _corners(mine), atol=0.5)


def test_rpn_config_is_checked():
    with pytest.raises(ValueError, match="epochs"):
        RpnConfig(manifest="m", clusters="c", epochs=0)
