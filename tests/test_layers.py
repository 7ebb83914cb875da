"""Layer selection: which prunable layers a pruner masks, and what the rest of the core
(sparsity, one-shot sweep, structured units, compact export) makes of the others."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dtp_search.models import build_model
from dtp_search.pruning import (
    AGPThreshold,
    ConstantThreshold,
    DynamicPruner,
    LayerSelection,
    Taylor,
    compact_model,
    get_mask,
    layer_sparsity,
    one_shot_sweep,
    prunable_layers,
    sparsity,
)

CNN_LAYERS = ["features.0", "features.3", "classifier.0", "classifier.2", "classifier.4"]
CIFAR = (3, 32, 32)
MNIST = (1, 28, 28)


def _model(arch, shape=CIFAR, **kw):
    return build_model(OmegaConf.create({"arch": arch, **kw}), shape, 10)


def _masked(model):
    return [name for name, m in prunable_layers(model) if get_mask(m) is not None]


# --- LayerSelection.select -------------------------------------------------------------


@pytest.mark.parametrize(
    ("selection", "chosen"),
    [
        (LayerSelection(), CNN_LAYERS),
        (LayerSelection(include=("features.*",)), ["features.0", "features.3"]),
        (LayerSelection(exclude=("classifier.*",)), ["features.0", "features.3"]),
        (
            LayerSelection(include=["classifier.*"], exclude=["classifier.4"]),
            ["classifier.0", "classifier.2"],
        ),
        (LayerSelection(include=["*.0"]), ["features.0", "classifier.0"]),
        (
            LayerSelection(include=["features.[03]", "classifier.2"]),
            ["features.0", "features.3", "classifier.2"],
        ),
        (LayerSelection(exclude_classifier=True), CNN_LAYERS[:-1]),
        (
            LayerSelection(include=["classifier.*"], exclude_classifier=True),
            ["classifier.0", "classifier.2"],
        ),
        (
            LayerSelection(include=["features.*"], exclude_classifier=True),
            ["features.0", "features.3"],
        ),
        (LayerSelection(include="features.3"), ["features.3"]),  # one glob, not its letters
    ],
)
def test_select_applies_include_then_exclude_globs_in_model_order(selection, chosen):
    assert selection.select(CNN_LAYERS) == chosen


def test_selection_stores_tuples_and_is_hashable():
    sel = LayerSelection(include=["a*"], exclude=["ab"])
    assert sel.include == ("a*",) and sel.exclude == ("ab",)
    assert hash(sel) == hash(LayerSelection(include=("a*",), exclude=("ab",)))
    assert LayerSelection(include=OmegaConf.create(["features.*"])).include == ("features.*",)


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        (
            LayerSelection(include=["feature.*"]),
            "layers.include glob 'feature.*' matches no prunable layer",
        ),
        (
            LayerSelection(include=["features"]),
            "layers.include glob 'features' matches no prunable layer",
        ),
        (LayerSelection(exclude=["fc*"]), "layers.exclude glob 'fc\\*' matches no prunable layer"),
        (LayerSelection(exclude=["*"]), "selects no layer"),
        (LayerSelection(include=["classifier.4"], exclude_classifier=True), "selects no layer"),
    ],
)
def test_a_selection_that_matches_nothing_lists_the_prunable_layers(selection, message):
    with pytest.raises(ValueError, match=message) as err:
        selection.select(CNN_LAYERS)
    assert (
        "prunable layers: ['features.0', 'features.3', 'classifier.0', 'classifier.2', "
        "'classifier.4']" in str(err.value)
    )


def test_bad_selection_values_are_rejected():
    with pytest.raises(ValueError, match="exclude_classifier must be true or false"):
        LayerSelection(exclude_classifier="yes")
    with pytest.raises(ValueError, match=r"layers\.include must be a list of non-empty globs"):
        LayerSelection(include=["ok", 3])
    with pytest.raises(ValueError, match=r"layers\.exclude must be a list of globs, got 3"):
        LayerSelection(exclude=3)
    assert LayerSelection(include=None, exclude=None) == LayerSelection()


def test_the_pruner_reports_a_bad_selection_with_the_models_layer_names():
    with pytest.raises(
        ValueError, match=r"matches no prunable layer; prunable layers: \['net.1', "
    ):
        DynamicPruner(
            _model("mlp", MNIST), ConstantThreshold(0.1), layers=LayerSelection(include=["fc1"])
        )


# --- which layers get masks --------------------------------------------------------------


def test_exclude_classifier_leaves_the_output_layer_of_an_mlp_unmasked():
    model = _model("mlp", MNIST)
    pruner = DynamicPruner(
        model, ConstantThreshold(0.1), layers=LayerSelection(exclude_classifier=True)
    )
    assert list(pruner.masks) == ["net.1", "net.3"] == _masked(model) == pruner.layer_names
    assert not hasattr(model.net[5], "parametrizations")


def test_exclude_classifier_on_a_cnn_and_the_criterion_sees_only_the_selected_layers():
    model = _model("simple_cnn")
    crit = Taylor()
    pruner = DynamicPruner(
        model,
        ConstantThreshold(0.1),
        crit,
        layers=LayerSelection(include=["classifier.*"], exclude_classifier=True),
    )
    assert _masked(model) == ["classifier.0", "classifier.2"] == pruner.layer_names
    assert set(crit.layers) == {"classifier.0", "classifier.2"}
    model(torch.randn(2, *CIFAR)).sum().backward()
    pruner.step(1, 0.0)
    assert set(crit.state_dict()["avg"]) == {"classifier.0", "classifier.2"}


def test_no_selection_masks_every_prunable_layer():
    model = _model("simple_cnn")
    DynamicPruner(model, ConstantThreshold(0.1))
    assert _masked(model) == CNN_LAYERS


# --- sparsity accounting ---------------------------------------------------------------


def test_pruner_sparsity_is_over_the_selected_layers():
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))  # 20 + 10 weights
    pruner = DynamicPruner(
        net, ConstantThreshold(0.0), min_keep=0, layers=LayerSelection(exclude=["2"])
    )
    keep = torch.ones(5, 4, dtype=torch.bool)
    keep[:2] = False  # 8 of 20
    pruner.write({"0": keep})
    assert pruner.sparsity() == pytest.approx(8 / 20)
    assert sparsity(net) == pytest.approx(8 / 30)  # every prunable layer, masked or not
    assert sparsity(net, ["0"]) == pytest.approx(8 / 20)
    assert layer_sparsity(net) == {"0": pytest.approx(0.4), "2": 0.0}
    assert pruner.layer_sparsity() == {"0": pytest.approx(0.4)}


def test_agp_step_prunes_the_selected_layers_to_target_and_leaves_excluded_ones_untouched():
    torch.manual_seed(0)
    model = _model("simple_cnn")
    before = {n: m.weight.detach().clone() for n, m in prunable_layers(model)}
    pruner = DynamicPruner(
        model,
        AGPThreshold(0.8, end_epoch=1.0, update_every=1),
        layers=LayerSelection(exclude=["features.*"], exclude_classifier=True),
    )
    assert pruner.step(1, 2.0) is not None
    assert pruner.sparsity() == pytest.approx(0.8, abs=1e-3)
    layers = dict(prunable_layers(model))
    for name in ("features.0", "features.3", "classifier.4"):
        assert get_mask(layers[name]) is None
        assert torch.equal(layers[name].weight, before[name])
    for name in ("classifier.0", "classifier.2"):
        assert float((layers[name].weight == 0).float().mean()) > 0.3  # one global θ
    selected = sum(before[n].numel() for n in ("classifier.0", "classifier.2"))
    total = sum(t.numel() for t in before.values())
    assert sparsity(model) == pytest.approx(pruner.sparsity() * selected / total)


def test_one_shot_sweep_leaves_unselected_layers_dense():
    torch.manual_seed(0)
    model = _model("mlp", MNIST)
    pruner = DynamicPruner(model, ConstantThreshold(0.0), layers=LayerSelection(include=["net.3"]))
    classifier, first = model.net[5].weight.detach().clone(), model.net[1].weight.detach().clone()
    seen = []

    def evaluate(m):
        assert torch.equal(m.net[5].weight, classifier) and torch.equal(m.net[1].weight, first)
        seen.append((sparsity(m, ["net.3"]), sparsity(m)))
        return 0.5

    points = one_shot_sweep(pruner, evaluate, n_points=4, max_sparsity=0.99)
    assert len(points) == 4 and points[-1].sparsity == pytest.approx(0.99, abs=1e-3)
    assert [p.sparsity for p in points] == pytest.approx([s for s, _ in seen])
    share = model.net[3].weight.numel() / sum(m.weight.numel() for _, m in prunable_layers(model))
    assert seen[-1][1] == pytest.approx(seen[-1][0] * share)
    assert pruner.sparsity() == 0.0  # masks restored


# --- structured units and unselected layers ----------------------------------------------


def _same_function(model, compact, shape):
    model.eval()
    compact.eval()
    x = torch.randn(4, *shape)
    with torch.no_grad():
        return torch.allclose(model(x), compact(x), atol=1e-5)


def test_a_unit_consumed_by_an_unselected_layer_is_still_removable_and_exported_exactly():
    torch.manual_seed(0)
    model = _model("simple_cnn")
    # classifier.0 reads features.3's 16 channels through a flatten (25 inputs each)
    pruner = DynamicPruner(
        model,
        AGPThreshold(0.5, end_epoch=1.0, update_every=1),
        granularity="channel",
        min_keep=0,
        example_input=torch.zeros(1, *CIFAR),
        layers=LayerSelection(exclude=["classifier.*"]),
    )
    assert pruner.layer_names == ["features.0", "features.3"]
    pruner.step(1, 2.0)
    dead = ~pruner.snapshot()["units:features.3"]
    assert 0 < int(dead.sum()) < 16
    fc = model.classifier[0]
    assert get_mask(fc) is None and (fc.weight != 0).all()  # untouched, columns included
    compact = compact_model(model, torch.zeros(1, *CIFAR))
    assert compact.features[3].out_channels == 16 - int(dead.sum())
    assert compact.classifier[0].in_features == 25 * (16 - int(dead.sum()))
    assert _same_function(model, compact, CIFAR)


def test_an_unselected_producer_keeps_its_units_and_its_consumer_its_columns():
    torch.manual_seed(0)
    model = _model("mlp", MNIST)
    pruner = DynamicPruner(
        model,
        AGPThreshold(0.5, end_epoch=1.0, update_every=1),
        granularity="neuron",
        min_keep=0,
        example_input=torch.zeros(1, *MNIST),
        layers=LayerSelection(exclude=["net.1"]),
    )
    assert pruner.layer_names == ["net.3"]  # net.5, the classifier, has no removable units
    pruner.step(1, 2.0)
    dead = ~pruner.snapshot()["units:net.3"]
    assert get_mask(model.net[1]) is None
    assert (model.net[3].weight[dead] == 0).all() and (model.net[3].weight[~dead] != 0).all()
    assert (model.net[5].weight[:, dead] == 0).all()  # a selected consumer loses its columns
    compact = compact_model(model, torch.zeros(1, *MNIST))
    assert compact.net[1].out_features == 300 and compact.net[3].out_features == int((~dead).sum())
    assert _same_function(model, compact, MNIST)


def test_a_unit_behind_a_norm_without_affine_entries_needs_its_consumers_selected():
    def net():
        return nn.Sequential(
            nn.Linear(4, 6),
            nn.BatchNorm1d(6, affine=False),
            nn.ReLU(),
            nn.Linear(6, 5),
            nn.ReLU(),
            nn.Linear(5, 3),
            nn.ReLU(),
            nn.Linear(3, 2),
        )

    def pruner(**kw):
        return DynamicPruner(
            net(),
            ConstantThreshold(0.0),
            granularity="neuron",
            example_input=torch.zeros(2, 4),
            **kw,
        )

    assert pruner().layer_names == ["0", "3", "5"]
    # a pruned unit of "0" emits −mean/σ, not 0: only "3"'s masked columns cancel it
    assert pruner(layers=LayerSelection(exclude=["3"])).layer_names == ["5"]
    # without a norm a pruned unit emits exactly 0, whatever its consumer
    assert pruner(layers=LayerSelection(exclude=["5"])).layer_names == ["0", "3"]


def test_a_selection_without_removable_units_says_so():
    with pytest.raises(
        ValueError, match=r"among the selected layers \['net.5'\].*allowed here: \['weight'\]"
    ):
        DynamicPruner(
            _model("mlp", MNIST),
            ConstantThreshold(0.0),
            granularity="neuron",
            example_input=torch.zeros(1, *MNIST),
            layers=LayerSelection(include=["net.5"]),
        )
