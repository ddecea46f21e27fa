"""Backbones, the retrieval head, checkpoints and extraction."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raytrieval.retrieval.backbones import _lite0_imagenet_file, create_backbone
from raytrieval.retrieval.checkpoint import load_checkpoint, read_meta, save_checkpoint
from raytrieval.retrieval.extract import embed_batch, extract_descriptors, to_tensor
from raytrieval.retrieval.imageio import ImageDecodeError
from raytrieval.retrieval.model import ModelSpec, build_model

ROOT = Path(__file__).resolve().parents[1]


def photo(name: str) -> np.ndarray:
    from skimage import data

    return getattr(data, name)()


def test_lite0_imagenet_weights_classify_a_cat():
    """The bundled weights are wired correctly: chelsea is a cat (ImageNet 281-285)."""
    backbone = create_backbone("efficientnet_lite0")
    raw = torch.load(_lite0_imagenet_file(), weights_only=True)
    x = to_tensor(Image.fromarray(photo("chelsea")).resize((224, 224), Image.BILINEAR))[None]
    x = (x - torch.tensor(backbone.mean)[:, None, None]) / torch.tensor(backbone.std)[:, None, None]
    with torch.no_grad():
        logits = backbone.forward_features(x).mean((2, 3)) @ raw["_fc.weight"].T + raw["_fc.bias"]
    assert set(logits.topk(3).indices[0].tolist()) & {281, 282, 283, 284, 285}


def test_static_padding_differs_only_on_odd_sizes():
    dyn, sta = create_backbone("efficientnet_lite0"), create_backbone("efficientnet_lite0_static")
    with torch.no_grad():
        even = torch.rand(1, 3, 128, 96)
        assert torch.equal(dyn.forward_features(even), sta.forward_features(even))
        odd = torch.rand(1, 3, 127, 95)
        assert dyn.forward_features(odd).shape != sta.forward_features(odd).shape


@pytest.mark.parametrize("name,channels", [("resnet50", 2048), ("vgg16", 512), ("mobilenet_v2", 1280)])
def test_torchvision_backbones_random_init(name, channels):
    backbone = create_backbone(name, weights=None)
    with torch.no_grad():
        assert backbone.forward_features(torch.rand(1, 3, 64, 64)).shape[1] == channels == backbone.out_channels


def test_torchvision_weights_from_local_file(tmp_path):
    import torchvision

    native = torchvision.models.mobilenet_v2(weights=None)
    path = tmp_path / "mnv2.pth"
    torch.save(native.state_dict(), path)
    backbone = create_backbone("mobilenet_v2", weights=path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone.forward_features(x), native.features.eval()(x))


def test_missing_weights_are_not_downloaded(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("RAYTRIEVAL_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(FileNotFoundError, match="RAYTRIEVAL_ALLOW_DOWNLOAD"):
        create_backbone("resnet50", weights="imagenet")


@pytest.mark.parametrize("kwargs,field", [
    ({"backbone": "alexnet"}, "backbone"), ({"pooling": "sum"}, "pooling"),
    ({"whiten_dim": 0}, "whiten_dim"), ({"scales": (1.0, -1.0)}, "scales"), ({"max_size": 8}, "max_size"),
])
def test_spec_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelSpec(**kwargs)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(whiten_dim=None)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("imgs")
    out = []
    for name, size in [("astronaut", (200, 150)), ("coffee", (150, 200)), ("chelsea", (200, 150)),
                       ("rocket", (120, 180)), ("camera", (200, 150))]:
        path = folder / f"{name}.jpg"
        Image.fromarray(photo(name)).convert("RGB").resize(size).save(path, quality=92)
        out.append(path)
    return out


def test_extract_shapes_and_norm(model, images):
    d = extract_descriptors(model, images, max_size=128, progress=False)
    assert d.shape == (5, 1280) and d.dtype == np.float32 and d.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=1e-5)


def test_batching_equals_one_by_one(model, images):
    batched = extract_descriptors(model, images, max_size=128, batch_size=4, progress=False)
    single = np.concatenate([extract_descriptors(model, [p], max_size=128, progress=False) for p in images])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_multiscale_is_gem_power_mean(model, images):
    scales = (1.0, 2**-0.5, 0.5)
    ms = extract_descriptors(model, images[:1], scales=scales, max_size=128, progress=False)[0]
    x = to_tensor(Image.open(images[0]).convert("RGB").resize((128, 96), Image.BILINEAR))[None]
    p = model.multiscale_power
    singles = [embed_batch(model, x, (s,))[0].double() for s in scales]
    expected = torch.stack([v.pow(p) for v in singles]).mean(0).pow(1 / p)
    np.testing.assert_allclose(ms, (expected / expected.norm()).numpy(), atol=1e-5)
    assert not np.allclose(ms, singles[0].numpy(), atol=1e-3)


def test_box_crop_equals_precropped(model, images, tmp_path):
    box = (20, 10, 150, 120)
    cropped = tmp_path / "crop.png"
    Image.open(images[0]).convert("RGB").crop(box).save(cropped)
    a = extract_descriptors(model, images[:1], [box], max_size=512, progress=False)
    b = extract_descriptors(model, [cropped], max_size=512, progress=False)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_extract_rejects_bad_image(model, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageDecodeError):
        extract_descriptors(model, [bad], progress=False)


def test_checkpoint_reloads_bit_exactly_in_a_fresh_process(tmp_path, images):
    torch.manual_seed(1)
    net = build_model(whiten_dim=64, pooling_kwargs={"p": 2.5})
    save_checkpoint(net, tmp_path / "ckpt", extra={"epoch": 3})
    meta = read_meta(tmp_path / "ckpt")
    assert meta["epoch"] == 3 and meta["dim"] == 64 and meta["mean"] == list(net.backbone.mean)
    mine = extract_descriptors(net, images, max_size=96, progress=False)
    reloaded = extract_descriptors(load_checkpoint(tmp_path / "ckpt"), images, max_size=96, progress=False)
    assert np.array_equal(mine, reloaded)
    code = (
        "import sys, json, numpy as np; from raytrieval.retrieval.checkpoint import load_checkpoint;"
        "from raytrieval.retrieval.extract import extract_descriptors;"
        "m = load_checkpoint(sys.argv[1]); paths = json.loads(sys.argv[2]);"
        "np.save(sys.argv[3], extract_descriptors(m, paths, max_size=96, progress=False))"
    )
    out = tmp_path / "fresh.npy"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt"), json.dumps([str(p) for p in images]), str(out)],
                   check=True, cwd=ROOT)
    assert np.array_equal(np.load(out), mine)


def test_checkpoint_refuses_pickled_code(tmp_path):
    net = build_model(weights=None)
    save_checkpoint(net, tmp_path / "ckpt")

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Evil()}, tmp_path / "ckpt" / "model.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(tmp_path / "ckpt")
