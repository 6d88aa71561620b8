import json

import pytest
import torch

from conftest import SHARED
from models import (CIFAR_MODELS, FEATURE_POINTS, classifier, create_model, feature_shapes, resize_map, stage_features,
                    state_dict_classes, to_map, to_tokens)

ZOO = SHARED / "reference" / "cifar_model_zoo.json"
ZOO_NAMES = [n for n in CIFAR_MODELS if n not in ("vit", "mlp_mixer")]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as error:
        create_model("resnet9000")
    assert "resnet9000" in str(error.value) and "resnet32x4" in str(error.value) and "mlp_mixer" in str(error.value)


@pytest.mark.skipif(not ZOO.exists(), reason="../shared/reference not beside the checkout")
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_state_dict_matches_zoo_and_loads_strictly(name):
    zoo = json.loads(ZOO.read_text())["models"][name]
    model = create_model(name, num_classes=100)
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == [(k, s) for k, s in zoo["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == zoo["params"]
    # A state_dict built from the JSON alone (as a public checkpoint would be) loads with strict=True.
    fake = {k: torch.randn(s) if s else torch.tensor(7) for k, s in zoo["state_dict"]}
    model.load_state_dict(fake, strict=True)
    assert torch.equal(classifier(model).weight, fake[zoo["state_dict"][-2][0]])
    assert state_dict_classes(fake) == 100
    assert feature_shapes(model) == [tuple(zoo["is_feat_shapes"][i]) for i in FEATURE_POINTS.get(name, (1, 2, 3))]


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_stages_then_head_equal_forward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    keys = list(model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features, logits = stage_features(model, x)
        assert torch.equal(logits, model(x))
    assert len(features) == 3
    assert list(model.state_dict()) == keys  # views add no state_dict names
    model_params = {id(p) for p in model.parameters()}
    stage_params = [{id(p) for p in s.parameters()} for s in model.stages() + [model.head()]]
    assert set().union(*stage_params) == model_params  # stages and head cover the model...
    assert sum(len(s) for s in stage_params) == len(model_params)  # ...and do not overlap


def test_stage_view_mode_and_gradients_reach_the_model():
    model = create_model("resnet8", 10)
    model.eval()
    stage2 = model.stages()[1]
    stage2.train()
    assert model.layer2.training and not model.layer1.training and not model.layer3.training
    stage2(torch.randn(2, 16, 32, 32)).sum().backward()
    assert model.layer2[0].conv1.weight.grad is not None and model.layer1[0].conv1.weight.grad is None


def test_feature_shapes_leave_batchnorm_untouched():
    model = create_model("resnet8", 10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert feature_shapes(model) == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_token_models_shapes():
    for name, dim in (("vit", 192), ("mlp_mixer", 128)):
        assert feature_shapes(create_model(name, 10)) == [(64, dim)] * 3


def test_tokens_and_maps_round_trip_in_patch_order():
    x = torch.randn(2, 5, 8, 8)
    assert torch.equal(to_map(to_tokens(x)), x)
    tokens = torch.randn(2, 64, 7)
    assert torch.equal(to_tokens(to_map(tokens)), tokens)
    mixer = create_model("mlp_mixer", 10)  # no position embedding: patch tokens are the conv map, row-major
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(to_map(mixer.patch_embed(image)), mixer.patch_embed.proj(image))


def test_resize_map():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(resize_map(x, 4), x)
    assert resize_map(x, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # 2x2 averages
    assert resize_map(x, 8).shape == (1, 1, 8, 8)


@pytest.mark.skipif(not (SHARED / "data" / "resnet56_cifar100_public.pth").exists(), reason="no ../shared/data")
def test_public_resnet56_scores_616_of_916():
    import numpy as np
    import common

    model = create_model("resnet56", 100)
    common.load_weights(model, SHARED / "data" / "resnet56_cifar100_public.pth")
    images = np.load(SHARED / "data" / "cifar100_test_first916.npz")
    x = torch.from_numpy(images["x"]).permute(0, 3, 1, 2)
    mean, std = common.NORMALIZATION["cifar100"]
    data = common.Data(x, torch.from_numpy(images["y"]), x, torch.from_numpy(images["y"]), 100, mean, std, "c100")
    with torch.no_grad():
        correct = (model.eval()(data.normalize(x)).argmax(1) == data.test_y).sum().item()
    assert correct == 616
