"""`ModelSource`: every dict form people's configs use names the same model, and one loader loads it."""

from __future__ import annotations

import pytest
import torch

from raytrieval.retrieval.checkpoint import save_checkpoint
from raytrieval.retrieval.model import ModelSpec, build_model
from raytrieval.retrieval.source import ModelSource, find_checkpoint, load_model


def test_dict_forms_round_trip(tmp_path):
    spec = ModelSpec(max_size=64, weights=None)
    plain = ModelSource.from_dict(spec.to_dict())  # mining's flat ModelSpec dict
    tagged = ModelSource.from_dict({"spec": spec.to_dict()})  # index meta / selection.json
    assert plain == tagged == ModelSource(spec=spec)
    assert tagged.to_dict() == {"spec": spec.to_dict()}
    assert ModelSource.from_dict(tagged.to_dict()) == tagged
    ckpt = ModelSource.from_dict(tmp_path)  # a checkpoint path
    assert ckpt == ModelSource.from_dict({"checkpoint": str(tmp_path)}) and ckpt.to_dict() == {"checkpoint": str(tmp_path)}
    uri = ModelSource.from_dict({"model_uri": "models:/m@champion", "tracking_uri": None})
    assert uri.to_dict() == {"model_uri": "models:/m@champion", "tracking_uri": None}
    assert ModelSource.from_dict(uri) is uri
    assert spec.scales == ModelSource(spec=spec).preprocessing()[0] and ModelSource(spec=spec).preprocessing()[1] == 64


@pytest.mark.parametrize("bad, match", [
    ({"checkpoint": None, "spec": None}, "expected checkpoint, spec or model_uri"),
    ({"checkpoint": "a", "colour": 1}, "unknown keys"),
    ({"backbone": "nope"}, "backbone"),
    (3, "expected a dict"),
])
def test_bad_sources_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelSource.from_dict(bad)


def test_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        ModelSource(checkpoint="a", model_uri="models:/m@1")
    with pytest.raises(ValueError, match="tracking_uri"):
        ModelSource(checkpoint="a", tracking_uri="sqlite:///x")
    with pytest.raises(ValueError, match="model_uri"):
        ModelSource(model_uri="models:/m@1").preprocessing()


def test_one_loader_for_spec_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = build_model(weights=None, whiten_dim=16, max_size=64, scales=(1.0, 0.5))
    save_checkpoint(net, tmp_path / "run" / "ckpt")
    x = torch.rand(1, 3, 64, 64)
    for form in (tmp_path / "run" / "ckpt", {"checkpoint": str(tmp_path / "run" / "ckpt")}):
        loaded = load_model(form)
        assert not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), net(x))
    assert ModelSource.from_dict(tmp_path / "run" / "ckpt").preprocessing() == ((1.0, 0.5), 64)
    spec_model = load_model({"spec": net.spec.to_dict()})
    assert spec_model.dim == 16 and not spec_model.training
    assert find_checkpoint(tmp_path) == tmp_path / "run" / "ckpt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_checkpoint(tmp_path / "empty")
