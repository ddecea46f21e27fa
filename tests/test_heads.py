"""Learned descriptor heads: neural codes and regional attention, and the attention trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from raytrieval.mining.cleaning import clusters_table
from raytrieval.retrieval.checkpoint import load_checkpoint, read_meta, save_checkpoint
from raytrieval.retrieval.clusters import write_clusters
from raytrieval.retrieval.extract import extract_descriptors
from raytrieval.retrieval.manifest import build_manifest, write_manifest
from raytrieval.retrieval.model import ModelSpec, RetrievalNet
from raytrieval.retrieval.pooling import Attention, NeuralCodes, create_pooling, l2n, spoc, weighted_spoc
from raytrieval.trainers.attention import AttentionConfig, fit_attention, nearest_mean_accuracy, train_attention


def test_neural_codes_shape_and_init():
    x = torch.rand(3, 32, 5, 7)
    head = NeuralCodes(32, dim=16, seed=3)
    out = head(x)
    assert out.shape == (3, 16) and bool((out >= 0).all())
    w = head.fc.weight.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(16), atol=1e-5, rtol=0)  # orthonormal rows
    torch.testing.assert_close(out, torch.relu(spoc(x) @ w.T))  # zero bias, SPoC inside
    torch.testing.assert_close(NeuralCodes(32, dim=16, seed=3).fc.weight, w)  # seeded
    assert not torch.allclose(NeuralCodes(32, dim=16, seed=4).fc.weight, w)


def test_neural_codes_net_dimension_and_norm():
    net = RetrievalNet(ModelSpec(pooling="neural_codes", pooling_kwargs={"dim": 48}, weights=None, max_size=64)).eval()
    with torch.no_grad():
        v = net(torch.rand(2, 3, 64, 80))
    assert v.shape == (2, 48) and net.dim == net.pool_dim == 48 and net.meta["dim"] == 48
    with torch.no_grad():  # a random backbone's features are ~1e-8: check the norm on real-sized ones
        v = l2n(net.head(torch.rand(2, net.backbone.out_channels, 3, 4)))
    torch.testing.assert_close(torch.linalg.vector_norm(v, dim=1), torch.ones(2))
    whitened = RetrievalNet(ModelSpec(pooling="neural_codes", pooling_kwargs={"dim": 48}, whiten_dim=8, weights=None))
    assert whitened.whiten.in_features == 48 and whitened.dim == 8


def test_create_pooling_channels():
    with pytest.raises(ValueError, match="in_channels"):
        create_pooling("attention")
    assert isinstance(create_pooling("attention", in_channels=16), Attention)
    gem = create_pooling("gem", in_channels=16, p=2.0)  # ignored by poolings without weights
    assert set(gem.state_dict()) == {"p"}


def test_attention_zero_init_is_spoc():
    x = torch.rand(2, 64, 6, 9) * 4
    head = Attention(64)
    w = head.weights(x)
    assert w.shape == (2, 1, 6, 9)
    torch.testing.assert_close(w, torch.full_like(w, float(np.log(2.0))))
    torch.testing.assert_close(head(x), spoc(x), atol=1e-5, rtol=0)
    # the weighted mean against an explicit loop
    w = torch.rand(2, 1, 6, 9)
    ref = torch.stack([sum(w[b, 0, i, j] * x[b, :, i, j] for i in range(6) for j in range(9)) / w[b].sum()
                       for b in range(2)])
    torch.testing.assert_close(weighted_spoc(x, w), ref, atol=1e-5, rtol=1e-5)


def test_attention_net_off_the_shelf_equals_spoc_net():
    attn = RetrievalNet(ModelSpec(pooling="attention", weights=None)).eval()
    plain = RetrievalNet(ModelSpec(pooling="spoc", weights=None)).eval()
    plain.backbone.load_state_dict(attn.backbone.state_dict())
    x = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), plain(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,kwargs", [("neural_codes", {"dim": 32}), ("attention", {"hidden": 8})])
def test_head_checkpoint_round_trip(tmp_path, name, kwargs):
    net = RetrievalNet(ModelSpec(pooling=name, pooling_kwargs=kwargs, weights=None, max_size=64)).eval()
    with torch.no_grad():  # a head that is not at its initialisation
        for p in net.pool.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_checkpoint(net, tmp_path / "ckpt")
    assert read_meta(tmp_path / "ckpt")["pooling"] == name
    back = load_checkpoint(tmp_path / "ckpt")  # weights_only=True
    assert type(back.pool) is type(net.pool) and back.dim == net.dim
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (70, 90, 3), dtype=np.uint8)) for i in range(2)]
    a = extract_descriptors(net, images, max_size=64, progress=False)
    b = extract_descriptors(back, images, max_size=64, progress=False)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, net.dim)


def synthetic_maps(n: int, seed: int, classes: int = 4, channels: int = 16, side: int = 5):
    """Maps where the class is carried by the one position that also has a marker (channel 0);
    a distractor position carries another class without the marker, so uniform pooling sees
    two classes equally."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    maps, where = [], []
    for y in labels:
        m = rng.uniform(0, 0.5, (channels, side, side)).astype(np.float32)
        signal, distractor = rng.choice(side * side, 2, replace=False)
        (si, sj), (di, dj) = divmod(int(signal), side), divmod(int(distractor), side)
        m[0, si, sj] += 3.0
        m[1 + y, si, sj] += 3.0
        m[1 + (y + 1 + rng.integers(0, classes - 1)) % classes, di, dj] += 3.0
        maps.append(torch.from_numpy(m))
        where.append((si, sj))
    return maps, labels, where


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread (two threads on a busy 2-core machine are 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fit_attention_learns_where_the_signal_is(tmp_path, one_thread):
    maps, labels, _ = synthetic_maps(160, seed=0)
    torch.manual_seed(0)  # the head's initialisation (fit_attention seeds only its own classifier): the
    head = Attention(16, hidden=4)  # weight share below ranges 0.47-0.89 over initialisations
    cfg = AttentionConfig(run_dir=str(tmp_path), out=str(tmp_path / "out"), epochs=40, lr=1e-2, batch_size=16)
    stats = fit_attention(head, maps, labels, cfg)
    assert stats["nearest_mean_accuracy_before"] < 0.8  # SPoC cannot tell the two signals apart
    assert stats["nearest_mean_accuracy_after"] > 0.95
    assert stats["accuracy"] > 0.95
    # on new maps, most of the weight sits on the marked position (uniform: 1/25)
    test_maps, test_labels, where = synthetic_maps(64, seed=1)
    with torch.no_grad():
        shares = [float(head.weights(m[None])[0, 0, i, j] / head.weights(m[None]).sum()) for m, (i, j) in zip(test_maps, where)]
        desc = np.stack([l2n(head(m[None]))[0].numpy() for m in test_maps])
    assert np.mean(shares) > 0.5
    assert nearest_mean_accuracy(desc, test_labels) > 0.95


def test_nearest_mean_accuracy_by_hand():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.8, 0.2]], np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.array([0, 0, 1, 1, 1])  # the last one is closer to class 0's mean
    assert nearest_mean_accuracy(x, labels) == pytest.approx(4 / 5)


def clean_run(tmp_path, clusters: list[int], seed: int = 0):
    """A run directory as the clean stage leaves it: random images, one per entry of `clusters`
    (-1: in no cluster). Returns (run directory, image ids)."""
    rng = np.random.default_rng(seed)
    files = {}
    for k in range(len(clusters)):
        path = tmp_path / f"img{k}.png"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        files[f"img{k}"] = str(path)
    run = tmp_path / "run"
    run.mkdir()
    write_manifest(build_manifest(files, progress=False), run / "images.parquet")
    write_clusters(clusters_table(list(files), np.array(clusters)), run / "clusters.parquet")
    return run, list(files)


def test_train_attention_writes_a_retrieval_checkpoint(tmp_path):
    run, _ = clean_run(tmp_path, [0, 0, 1, 1, 2, -1])
    out = tmp_path / "attention"
    facts = train_attention(AttentionConfig(run_dir=str(run), out=str(out), max_size=64, epochs=2))
    assert facts["images"] == 4 and facts["classes"] == 2  # cluster 2 has one image, left out
    assert facts["validation_images"] == 0 and "unvalidated" in facts["stopping"]  # no split.parquet: the fallback
    meta = read_meta(out)
    assert meta["pooling"] == "attention" and meta["attention_training"]["classes"] == 2
    model = load_checkpoint(out)
    assert float(model.pool.score[2].weight.detach().abs().sum()) > 0  # trained away from SPoC
    base = RetrievalNet(ModelSpec(pooling="attention", max_size=64)).eval()  # the frozen ImageNet backbone
    for k, v in base.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[k], v, atol=0, rtol=0)


def test_fit_attention_keeps_the_best_validated_epoch_and_stops_after_patience(tmp_path, one_thread):
    maps, labels, _ = synthetic_maps(64, seed=2)
    head = Attention(16, hidden=4)
    script = iter([0.5, 0.6, 0.7, 0.65, 0.6, 0.9])  # best after epoch 2; epochs 3 and 4 do not gain
    seen = []

    def validate():
        seen.append({k: v.clone() for k, v in head.state_dict().items()})
        return next(script)

    cfg = AttentionConfig(run_dir=str(tmp_path), out=str(tmp_path / "out"), epochs=10, patience=2, lr=1e-2)
    stats = fit_attention(head, maps, labels, cfg, validate)
    assert stats["best_epoch"] == 2 and stats["epochs_trained"] == 4 and stats["self_map"] == 0.7
    assert stats["self_map_by_epoch"] == [0.5, 0.6, 0.7, 0.65, 0.6]
    for k, v in head.state_dict().items():  # the head holds epoch 2's parameters, not the last ones
        torch.testing.assert_close(v, seen[2][k], atol=0, rtol=0)
    assert any(not torch.equal(seen[4][k], seen[2][k]) for k in seen[2])


def test_fit_attention_keeps_the_untrained_head_when_training_never_helps(tmp_path, one_thread):
    maps, labels, _ = synthetic_maps(32, seed=3)
    head = Attention(16, hidden=4)
    initial = {k: v.clone() for k, v in head.state_dict().items()}
    scores = iter([0.8, 0.7, 0.6, 0.5])
    cfg = AttentionConfig(run_dir=str(tmp_path), out=str(tmp_path / "out"), epochs=10, patience=3, lr=1e-2)
    stats = fit_attention(head, maps, labels, cfg, lambda: next(scores))
    assert stats["best_epoch"] == 0 and stats["epochs_trained"] == 3
    for k, v in head.state_dict().items():
        torch.testing.assert_close(v, initial[k], atol=0, rtol=0)


def test_train_attention_validates_on_the_held_out_clusters(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytrieval.mining.split import SPLIT_FILE, SPLIT_SCHEMA

    cluster = [0, 0, 1, 1, 2, 2, 3, 3]
    run, ids = clean_run(tmp_path, cluster, seed=1)
    roles = ["train"] * 6 + ["val"] * 2  # cluster 3 is held out
    pq.write_table(pa.table({"image_id": ids, "cluster_id": cluster, "role": roles},
                            schema=SPLIT_SCHEMA), run / SPLIT_FILE)
    facts = train_attention(AttentionConfig(run_dir=str(run), out=str(tmp_path / "a"), max_size=64, epochs=3,
                                            patience=1))
    assert facts["classes"] == 3 and facts["images"] == 6 and facts["validation_images"] == 2
    assert facts["maps"] == 6  # the held-out images are never trained on
    assert "self-mAP" in facts["stopping"] and 0 <= facts["best_epoch"] <= facts["epochs_trained"] <= 3
    assert len(facts["self_map_by_epoch"]) == facts["epochs_trained"] + 1
    assert read_meta(tmp_path / "a")["attention_training"]["best_epoch"] == facts["best_epoch"]
