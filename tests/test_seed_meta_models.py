"""Seed methods, items 1 and 2 of issue 16: metadata fusion (common/meta.py, model.meta) and seed
004's ResNets and transfer regimes (common/models.py: model.arch, model.freeze)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from chestfed.common.config import ModelConfig, TrainConfig, config_from_tree
from chestfed.common.errors import ChestFedError, ConfigError
from chestfed.common.meta import FIELDS, absent_fields, columns, encode, site_inputs
from chestfed.common.models import MetaFusion, build_model, trainable_names
from chestfed.common.training import predict, train_epochs

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_encoding_sets_missing_indicators_never_a_silent_zero():
    df = pd.DataFrame({"age": [70.0, np.nan, 50.0], "sex": ["F", None, "M"],
                       "view": ["AP", "PA", "weird"]})
    got = encode(df, list(FIELDS))
    assert columns(FIELDS) == ["age", "age_missing", "sex_M", "sex_F", "sex_missing",
                               "view_PA", "view_AP", "view_LATERAL", "view_missing"]
    np.testing.assert_array_equal(got, np.array([
        [1.0, 0, 0, 1, 0, 0, 1, 0, 0],   # (70 - 50) / 20 = 1; F; AP
        [0.0, 1, 0, 0, 1, 1, 0, 0, 0],   # age missing, sex missing, PA
        [0.0, 0, 1, 0, 0, 0, 0, 0, 1],   # age 50 is 0 *with* indicator 0; unknown view: missing
    ], dtype=np.float32))
    # a field the table lacks: missing on every row, and named by absent_fields
    assert absent_fields(df.drop(columns="view"), ["age", "view"]) == ["view"]
    assert encode(df.drop(columns="view"), ["view"])[:, -1].tolist() == [1, 1, 1]
    with pytest.raises(ChestFedError, match="model.meta_missing: allow"):
        site_inputs("h", df.drop(columns="view"), ["view"], allow_missing=False)
    assert site_inputs("h", df, [], allow_missing=False) is None


def test_a_site_without_a_requested_field_fails_before_the_run(tmp_path):
    from chestfed.sites.preflight import check_sites
    from tests.test_adapters_csv import OPTS, hospital

    root = hospital(tmp_path / "h")
    opts = {k: v for k, v in OPTS.items() if k != "view_column"}
    tree = {"sites": [{"name": "h", "kind": "csv", "root": str(root), "options": opts}],
            "data": {"cache_dir": str(tmp_path / "c"), "split": {"val": 0.2, "test": 0.2, "train": 0.6}},
            "model": {"meta": ["age", "view"]}}
    problems = check_sites(config_from_tree(tree, "x.yaml"))
    errors = [p.message for p in problems if p.error]
    assert len(errors) == 1 and "asks for view" in errors[0] and "\n" not in errors[0]
    tree["model"]["meta_missing"] = "allow"
    problems = check_sites(config_from_tree(tree, "x.yaml"))
    assert not [p for p in problems if p.error]
    assert any("encoded as missing" in p.message for p in problems)


def test_meta_config_is_validated():
    for model, needle in (({"meta": ["age", "height"]}, "model.meta.1"),
                          ({"meta": ["age", "age"]}, "names a field twice"),
                          ({"meta_missing": "skip"}, "model.meta_missing"),
                          ({"freeze": "all"}, "model.freeze"),
                          ({"arch": "resnet34"}, "model.arch")):
        with pytest.raises(ConfigError, match=needle):
            config_from_tree({"sites": [{"name": "a", "kind": "phantom"}], "model": model}, "x.yaml")


def test_meta_model_beats_image_only_where_view_is_informative():
    """A phantom site where view is informative (population.view_effect: AP images carry the
    findings far more often) and the images are poor (heavy noise and blur, 24 px): the same
    small CNN and budget learn much more with model.meta than without."""
    from chestfed.common.labels import Task, targets
    from chestfed.sites.phantom import PhantomAdapter

    site = PhantomAdapter("icu", None, {"preset": "a", "population": {
        "size": 300, "ap_fraction": 0.5, "view_effect": 4.0},
        "acquisition": {"noise": 0.6, "blur": 8.0}})
    rec = site.records()
    images = torch.from_numpy(np.stack([site.read_image(i, 24) for i in range(len(rec))]))
    y = torch.from_numpy(targets(rec.labels, Task("binary", ()), rec.annotated).astype(np.float32))
    meta = torch.from_numpy(encode(rec.meta, list(FIELDS)))
    train, test = slice(0, 200), slice(200, 300)
    auroc = {}
    for fields in ((), FIELDS):
        torch.manual_seed(0)
        net = build_model(ModelConfig(width=4, meta=list(fields)), 1)
        kw = {"meta": meta[train]} if fields else {}
        train_epochs(net, images[train], y[train], TrainConfig(batch_size=16, lr=3e-3), epochs=6,
                     seed=0, device=CPU, **kw)
        p = predict(net, images[test], CPU, **({"meta": meta[test]} if fields else {}))[:, 0]
        auroc[bool(fields)] = roc_auc_score(y[test, 0].numpy(), p)
    assert auroc[True] > auroc[False] + 0.1, auroc  # measured: 0.77 vs 0.52


def test_fusion_forward_with_and_without_metadata():
    net = build_model(ModelConfig(width=4, meta=["sex", "view"]), 2).eval()
    assert isinstance(net, MetaFusion) and net.classifier.in_features == 256 + 32
    x = torch.randn(3, 1, 32, 32)
    missing = torch.tensor([[0, 0, 1, 0, 0, 0, 1]] * 3, dtype=torch.float32)
    assert torch.equal(net(x), net(x, missing))  # no metadata = every field missing
    raw = build_model(ModelConfig(width=4, meta=["age"], meta_hidden=0), 2)
    assert raw.classifier.in_features == 256 + 2  # Baltruschat et al.: concatenated as they are


def _bottleneck_params(inplanes: int, planes: int) -> int:
    from torchvision.models.resnet import Bottleneck
    return sum(p.numel() for p in Bottleneck(inplanes, planes).parameters())


def test_seed004_resnets_shapes_and_parameter_counts():
    import torchvision.models as tvm

    def count(m):
        return sum(p.numel() for p in m.parameters())

    ref50 = tvm.resnet50(weights=None, num_classes=3)
    ref101 = tvm.resnet101(weights=None, num_classes=3)
    c1 = 64 * 3 * 49 - 64 * 1 * 49  # the 1-channel stem's difference
    large = build_model(ModelConfig(arch="resnet50_large"), 3)
    r101 = build_model(ModelConfig(arch="resnet101", in_channels=3), 3)
    r38 = build_model(ModelConfig(arch="resnet38"), 3)
    assert count(large) == count(ref50) - c1
    assert set(large.state_dict()) == set(ref50.state_dict())  # ResNet-50 weights load into it
    assert count(r101) == count(ref101)
    # ResNet-50 less one conv2_x, two conv3_x and three conv4_x bottleneck blocks
    removed = _bottleneck_params(256, 64) + 2 * _bottleneck_params(512, 128) + 3 * _bottleneck_params(1024, 256)
    assert count(r38) == count(ref50) - c1 - removed
    assert [len(r38.layer1), len(r38.layer2), len(r38.layer3), len(r38.layer4)] == [2, 2, 3, 3]
    x = torch.randn(2, 1, 64, 64)
    for net in (large.eval(), r38.eval()):
        assert net(x).shape == (2, 3)
    # the extra max-pool: layer2 sees half the size it sees in ResNet-50
    seen = []
    large.layer2.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-1]))
    large(torch.randn(1, 1, 448, 448))
    assert seen == [56]  # 448 / 4 (stem) / 2 (extra pool): what plain ResNet-50 sees at 224 px
    fused = build_model(ModelConfig(arch="resnet38", meta=["age"]), 3).eval()
    assert fused(x, torch.zeros(2, 2)).shape == (2, 3)


@pytest.mark.parametrize("meta", [[], ["age", "view"]])
def test_frozen_backbone_does_not_change_in_training(meta):
    torch.manual_seed(0)
    net = build_model(ModelConfig(arch="resnet38", freeze="backbone", meta=meta), 2)
    keep = set(trainable_names(net))
    assert keep == ({"fc.weight", "fc.bias"} if not meta else
                    {"classifier.weight", "classifier.bias", "meta.0.weight", "meta.0.bias"})
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    images = torch.randint(0, 255, (8, 32, 32), dtype=torch.uint8)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 4)
    kw = {"meta": torch.from_numpy(encode(pd.DataFrame({"age": [60.0] * 8, "view": ["AP"] * 8}), meta))} if meta else {}
    train_epochs(net, images, y, TrainConfig(batch_size=4, lr=0.01, weight_decay=0.1), 1, 0, CPU, **kw)
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]) == (n not in keep), n
    assert build_model(ModelConfig(arch="resnet38"), 2).fc.weight.requires_grad  # freeze: none


def test_freeze_without_weights_is_warned():
    cfg = config_from_tree({"sites": [{"name": "a", "kind": "phantom"}],
                            "model": {"freeze": "backbone"}}, "x.yaml")
    assert any("model.freeze" in w for w in cfg.warnings())
