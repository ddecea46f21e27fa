"""Poolings against direct formulas and a transcription of cirtorch's R-MAC loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raytrieval.retrieval.pooling import GeM, create_pooling, crow, gem, l2n, mac, rmac, rmac_regions, spoc


@pytest.fixture
def fmap() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.relu(torch.randn(2, 5, 7, 11, generator=g, dtype=torch.float64))


def test_mac_spoc_gem_direct(fmap):
    x = fmap.numpy()
    np.testing.assert_allclose(mac(fmap).numpy(), x.reshape(2, 5, -1).max(-1))
    np.testing.assert_allclose(spoc(fmap).numpy(), x.reshape(2, 5, -1).mean(-1))
    xc = np.maximum(x, 1e-6).reshape(2, 5, -1)
    np.testing.assert_allclose(gem(fmap, 3.0).numpy(), (xc**3).mean(-1) ** (1 / 3), rtol=1e-12)


def test_gem_limits(fmap):
    np.testing.assert_allclose(gem(fmap, 1.0).numpy(), spoc(fmap.clamp(min=1e-6)).numpy(), rtol=1e-12)
    errors = [((gem(fmap, p) - mac(fmap)) / mac(fmap)).abs().max().item() for p in (3.0, 20.0, 200.0)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.03


def test_gem_p_is_learned(fmap):
    pool = GeM(p=3.0)
    pool(fmap.float()).sum().backward()
    assert pool.p.grad is not None and pool.p.grad.abs() > 0
    frozen = GeM(p=3.0, learn_p=False)
    assert not frozen.p.requires_grad


def cirtorch_rmac(x: torch.Tensor, L: int = 3, eps: float = 1e-6) -> torch.Tensor:
    """cirtorch.layers.functional.rmac, transcribed as the naive reference."""
    ovr = 0.4
    steps = torch.Tensor([2, 3, 4, 5, 6, 7])
    W, H = x.size(3), x.size(2)
    w = min(W, H)
    b = (max(H, W) - w) / (steps - 1)
    _, idx = torch.min(torch.abs(((w**2 - w * b) / w**2) - ovr), 0)
    Wd = Hd = 0
    if H < W:
        Wd = idx.item() + 1
    elif H > W:
        Hd = idx.item() + 1
    v = x.amax(dim=(-2, -1), keepdim=True)
    v = v / (torch.norm(v, p=2, dim=1, keepdim=True) + eps)
    for l in range(1, L + 1):
        wl = math.floor(2 * w / (l + 1))
        wl2 = math.floor(wl / 2 - 1)
        b = 0 if l + Wd == 1 else (W - wl) / (l + Wd - 1)
        cenW = torch.floor(wl2 + torch.Tensor(range(l - 1 + Wd + 1)) * b) - wl2
        b = 0 if l + Hd == 1 else (H - wl) / (l + Hd - 1)
        cenH = torch.floor(wl2 + torch.Tensor(range(l - 1 + Hd + 1)) * b) - wl2
        for i_ in cenH.tolist():
            for j_ in cenW.tolist():
                if wl == 0:
                    continue
                R = x[:, :, int(i_) : int(i_) + wl, int(j_) : int(j_) + wl]
                vt = R.amax(dim=(-2, -1), keepdim=True)
                v = v + vt / (torch.norm(vt, p=2, dim=1, keepdim=True) + eps)
    return v.squeeze(-1).squeeze(-1)


@pytest.mark.parametrize("shape", [(7, 11), (11, 7), (9, 9), (16, 12), (3, 30)])
def test_rmac_matches_cirtorch(shape):
    x = torch.relu(torch.randn(2, 4, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    np.testing.assert_allclose(rmac(x).numpy(), cirtorch_rmac(x).numpy(), rtol=1e-10)
    for y, xx, h, w in rmac_regions(*shape):
        assert 0 <= y and y + h <= shape[0] and 0 <= xx and xx + w <= shape[1]


def test_crow_direct(fmap):
    x = fmap.numpy()[0]  # (C, H, W)
    s = x.sum(0)
    spatial = np.sqrt(s / np.sqrt((s**2).sum()))  # a = b = 2
    q = np.array([(x[k] > 0).mean() for k in range(x.shape[0])])
    omega = np.log((x.shape[0] * 1e-6 + q.sum()) / (1e-6 + q))
    expected = np.array([(x[k] * spatial).sum() for k in range(x.shape[0])]) * omega
    np.testing.assert_allclose(crow(fmap).numpy()[0], expected, rtol=1e-6)


@pytest.mark.parametrize("name", ["mac", "spoc", "gem", "rmac", "crow"])
def test_registry_shapes(name, fmap):
    out = l2n(create_pooling(name)(fmap.float()))
    assert out.shape == (2, 5)
    np.testing.assert_allclose(out.norm(dim=1).detach().numpy(), 1.0, rtol=1e-5)


def test_registry_rejects_unknown():
    with pytest.raises(ValueError, match="pooling"):
        create_pooling("avgmax")
    with pytest.raises(ValueError, match="p"):
        GeM(p=0)
