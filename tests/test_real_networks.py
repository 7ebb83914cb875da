"""The pruning core on networks users bring: torchvision's resnet18 and mobilenet_v3_small
(random init, never downloaded), grouped and depthwise convolutions, and a small
transformer whose ``nn.MultiheadAttention`` in-projection is a raw parameter, not a layer."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from dtp_search.models import build_model, export
from dtp_search.pruning import (
    Activation,
    ConstantThreshold,
    DynamicPruner,
    LayerSelection,
    attach_masks,
    build_policy,
    compact_model,
    count_parameters,
    layer_sparsity,
    one_shot_sweep,
    prunable_layers,
    prunable_tensors,
    sparsity,
    strip_masks,
    trace_channels,
)
from dtp_search.training import FoldTrainer

IMAGE = (1, 3, 32, 32)


def _producers(model: nn.Module, x: torch.Tensor) -> dict[str, list[str]]:
    """``{group name: its producers}`` of the removable channel groups."""
    return {g.name: g.producers for g in trace_channels(model, x).groups}


def _group(model: nn.Module, x: torch.Tensor, name: str):
    return next(g for g in trace_channels(model, x).groups if g.name == name)


class Block(nn.Module):
    """Pre-norm transformer block: self-attention and an MLP, each in a residual branch."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """A Conv1d token embedding over [B, C, L], two transformer blocks, a linear head."""

    def __init__(
        self,
        num_classes: int = 5,
        in_channels: int = 3,
        dim: int = 16,
        heads: int = 2,
        depth: int = 2,
    ) -> None:
        super().__init__()
        self.embed = nn.Conv1d(in_channels, dim, 3, padding=1)
        self.encoder = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).transpose(1, 2)  # [B, L, dim]
        for block in self.encoder:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


SEQ = (2, 3, 6)  # [B, C, L] for TinyTransformer


def _resnet18() -> nn.Module:
    return _lively(torchvision.models.resnet18(num_classes=10))


def _mobilenet() -> nn.Module:
    return _lively(torchvision.models.mobilenet_v3_small(num_classes=10))


@torch.no_grad()
def _lively(model: nn.Module) -> nn.Module:
    """Fan-in initialisation and non-trivial batch-norm statistics, so that outputs are of
    order 1 (torchvision's mobilenet init gives ~1e-10 logits) and exactness is tested."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            m.reset_parameters()
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _random_masks(masks: dict, p: float = 0.5) -> None:
    for m in masks.values():
        m.set_(torch.rand_like(m.mask) > p)


# --------------------------------------------------------------- convolutions, any groups

CONVS = [
    (nn.Conv1d, (2, 8, 9)),
    (nn.Conv2d, (2, 8, 7, 7)),
    (nn.Conv3d, (1, 8, 4, 4, 4)),
]


@pytest.mark.parametrize(("conv", "shape"), CONVS)
@pytest.mark.parametrize("groups", [1, 2, 8])  # plain, grouped, depthwise
def test_weight_masks_on_grouped_and_depthwise_convs_are_exact(conv, shape, groups):
    torch.manual_seed(0)
    layer = conv(8, 16, 3, padding=1, groups=groups)
    w = layer.weight.detach().clone()
    masks = attach_masks(layer)
    assert list(masks) == [""] and masks[""].mask.shape == (16, 8 // groups) + (3,) * (
        len(shape) - 2
    )
    _random_masks(masks)
    keep = masks[""].mask
    x = torch.randn(shape)
    f = {
        nn.Conv1d: nn.functional.conv1d,
        nn.Conv2d: nn.functional.conv2d,
        nn.Conv3d: nn.functional.conv3d,
    }[conv]
    expected = f(x, w * keep, layer.bias, padding=1, groups=groups)
    torch.testing.assert_close(layer(x), expected)
    assert sparsity(layer) == pytest.approx(float((keep == 0).float().mean()))


def _grouped_net(conv: type[nn.Module], pool: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        conv(3, 8, 3, padding=1),
        nn.ReLU(),
        conv(8, 8, 3, padding=1, groups=8),
        nn.ReLU(),  # depthwise
        conv(8, 16, 1),
        nn.ReLU(),  # feeds a grouped conv
        conv(16, 8, 1, groups=2),
        nn.ReLU(),  # grouped producer
        conv(8, 12, 1),
        nn.ReLU(),  # the only exactly removable channels
        conv(12, 8, 1),
        nn.ReLU(),
        pool(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


@pytest.mark.parametrize(
    ("conv", "pool", "shape"),
    [
        (nn.Conv1d, nn.AdaptiveAvgPool1d, (1, 3, 9)),
        (nn.Conv2d, nn.AdaptiveAvgPool2d, (1, 3, 6, 6)),
        (nn.Conv3d, nn.AdaptiveAvgPool3d, (1, 3, 4, 4, 4)),
    ],
)
def test_depthwise_convs_go_with_their_channels_and_grouped_convs_stay_whole(conv, pool, shape):
    torch.manual_seed(0)
    net = _grouped_net(conv, pool)
    x = torch.randn(shape)
    # The depthwise conv's filter j goes with its input channel j (conv 0's channel j);
    # the grouped conv (groups=2) and the conv that feeds it keep all their channels.
    assert _producers(net, x) == {"0": ["0", "2"], "8": ["8"], "10": ["10"]}
    pruner = DynamicPruner(
        net, ConstantThreshold(0.0), granularity="channel", min_keep=1, example_input=x
    )
    assert pruner.layer_names == ["0", "8", "10"]
    pruner.write(
        {
            "0": torch.arange(8) % 4 != 0,
            "8": torch.arange(12) % 3 != 0,
            "10": torch.arange(8) % 2 == 0,
        }
    )
    small = compact_model(net, x)
    torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=1e-4)
    assert count_parameters(small) < count_parameters(strip_masks(net))
    for m in small.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            assert m.in_channels == m.weight.shape[1] * m.groups
            assert m.out_channels == m.weight.shape[0]
    assert small[0].out_channels == 6 and small[2].groups == small[2].out_channels == 6
    assert small[4].in_channels == 6 and small[6].groups == 2  # the grouped conv: untouched
    assert small[8].out_channels == 8 and small[10].in_channels == 8


# ------------------------------------------------------------------ attention in-projection


def _reference(mha: nn.MultiheadAttention) -> nn.MultiheadAttention:
    """An unmasked copy of ``mha`` whose projections hold the masked values."""
    ref = strip_masks(mha)
    assert not parametrize.is_parametrized(ref)
    return ref


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_in_projection_masks_reach_the_attention_forward_exactly(
    batch_first, training, monkeypatch
):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    dense = mha.in_proj_weight.detach().clone()
    assert [t.name for t in prunable_tensors(mha)] == ["in_proj", "out_proj"]
    masks = attach_masks(mha)
    _random_masks(masks)
    keep = masks["in_proj"].mask
    assert torch.equal(mha.in_proj_weight, dense * keep)
    ref = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    with torch.no_grad():
        ref.in_proj_weight.copy_(dense * keep)
        ref.in_proj_bias.copy_(mha.in_proj_bias)
        ref.out_proj.weight.copy_(mha.out_proj.weight)
        ref.out_proj.bias.copy_(mha.out_proj.bias)
    fast = []
    native = torch._native_multi_head_attention

    def spy(*args, **kwargs):
        fast.append(args[5])  # the in-projection weight the fused kernel receives
        return native(*args, **kwargs)

    monkeypatch.setattr(torch, "_native_multi_head_attention", spy)
    mha.train(training)
    ref.train(training)
    x = torch.randn(3, 5, 8)
    with torch.set_grad_enabled(training):
        torch.manual_seed(1)
        out = mha(x, x, x)[0]
        torch.manual_seed(1)
        expected = ref(x, x, x)[0]
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    # PyTorch's eval fast path runs for batch_first self-attention without grad.
    fused = [w for w in fast if w is not None]
    assert len(fused) == (1 if batch_first and not training else 0) * 2  # mha and ref
    if fused:
        assert torch.equal(fused[0], dense * keep)
    if training:
        out.sum().backward()
        grad = mha.parametrizations.in_proj_weight.original.grad
        assert torch.all(grad[keep == 0] == 0) and grad[keep != 0].abs().sum() > 0


def test_separate_query_key_value_projections_are_three_layers():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    names = [t.name for t in prunable_tensors(mha)]
    assert names == ["q_proj", "k_proj", "v_proj", "out_proj"]
    q, k, v = torch.randn(5, 2, 8), torch.randn(7, 2, 4), torch.randn(7, 2, 6)
    masks = attach_masks(mha)
    _random_masks(masks)
    out = mha(q, k, v)[0]
    ref = _reference(mha)
    for attr in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        assert isinstance(getattr(ref, attr), nn.Parameter)
        assert (getattr(ref, attr) == 0).any()
    torch.testing.assert_close(out, ref(q, k, v)[0], atol=0, rtol=0)
    biases = {t.name: t.bias for t in prunable_tensors(mha)}
    torch.testing.assert_close(
        torch.cat([biases[n] for n in ("q_proj", "k_proj", "v_proj")]), mha.in_proj_bias
    )


def test_the_transformer_encoder_fast_path_sees_the_masked_in_projection(monkeypatch):
    fused_calls = []
    native = torch._transformer_encoder_layer_fwd

    def spy(*args, **kwargs):
        fused_calls.append(1)
        return native(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", spy)
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
        num_layers=2,
        enable_nested_tensor=False,
    ).eval()
    names = [t.name for t in prunable_tensors(enc)]
    assert "layers.0.self_attn.in_proj" in names and "layers.1.linear2" in names
    masks = attach_masks(enc)
    _random_masks(masks)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        fused = enc(x)
        assert len(fused_calls) == 2  # both layers ran PyTorch's fused inference kernel
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            plain = enc(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(strip_masks(enc)(x), plain, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ names and selection


def test_layer_names_of_a_transformer_and_of_torchvision_networks():
    names = [t.name for t in prunable_tensors(TinyTransformer())]
    assert names == [
        "embed",
        "encoder.0.self_attn.in_proj",
        "encoder.0.self_attn.out_proj",
        "encoder.0.mlp.0",
        "encoder.0.mlp.2",
        "encoder.1.self_attn.in_proj",
        "encoder.1.self_attn.out_proj",
        "encoder.1.mlp.0",
        "encoder.1.mlp.2",
        "head",
    ]
    # prunable_layers keeps listing the Linear/Conv modules (whose tensor is .weight).
    assert [n for n, _ in prunable_layers(TinyTransformer())] == [
        n for n in names if not n.endswith(".in_proj")
    ]
    mobilenet = [t.name for t in prunable_tensors(torchvision.models.mobilenet_v3_small())]
    assert mobilenet[0] == "features.0.0" and mobilenet[-1] == "classifier.3"
    assert "features.1.block.1.fc1" in mobilenet


@pytest.mark.parametrize(
    ("selection", "chosen"),
    [
        (
            LayerSelection(include=["*.in_proj"]),
            ["encoder.0.self_attn.in_proj", "encoder.1.self_attn.in_proj"],
        ),
        (
            LayerSelection(include=["encoder.1.*"], exclude=["*.mlp.*"]),
            ["encoder.1.self_attn.in_proj", "encoder.1.self_attn.out_proj"],
        ),
        (
            LayerSelection(include=["*self_attn*"], exclude=["encoder.0.self_attn.in_proj"]),
            [
                "encoder.0.self_attn.out_proj",
                "encoder.1.self_attn.in_proj",
                "encoder.1.self_attn.out_proj",
            ],
        ),
        (LayerSelection(exclude=["embed", "encoder.*"], exclude_classifier=True), None),
    ],
)
def test_layer_selection_globs_reach_attention_projections(selection, chosen):
    torch.manual_seed(0)
    model = TinyTransformer()
    if chosen is None:
        with pytest.raises(ValueError, match=r"selects no layer.*encoder.0.self_attn.in_proj"):
            DynamicPruner(model, ConstantThreshold(0.05), layers=selection)
        return
    pruner = DynamicPruner(model, ConstantThreshold(0.05), layers=selection)
    assert list(pruner.masks) == chosen
    assert [t.name for t in pruner.tensors.values()] == chosen
    pruner.update(1.0)
    assert set(pruner.last_thresholds) == set(chosen)
    for name, s in layer_sparsity(model).items():
        assert (s > 0.05) == (name in chosen), name


def test_exclude_classifier_on_a_transformer_spares_its_head_only():
    model = TinyTransformer()
    pruner = DynamicPruner(
        model, ConstantThreshold(0.05), layers=LayerSelection(exclude_classifier=True)
    )
    assert "head" not in pruner.masks and "encoder.1.mlp.2" in pruner.masks
    assert "encoder.0.self_attn.in_proj" in pruner.masks


def test_a_glob_that_matches_no_layer_lists_the_attention_names():
    with pytest.raises(
        ValueError, match=r"matches no prunable layer.*'encoder.0.self_attn.in_proj'"
    ):
        DynamicPruner(
            TinyTransformer(),
            ConstantThreshold(0.05),
            layers=LayerSelection(include=["*.in_proj_weight"]),
        )


# ---------------------------------------------------------------- pruning to a target


@pytest.mark.parametrize("build", [_mobilenet, TinyTransformer], ids=["mobilenet", "transformer"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_agp_reaches_its_target_sparsity_on_user_networks(build, scope):
    torch.manual_seed(0)
    model = build()
    policy = build_policy(
        "agp", {"final_sparsity": 0.7, "end_epoch": 1.0, "update_every": 1, "scope": scope}
    )
    pruner = DynamicPruner(model, policy)
    assert pruner.step(1, 2.0) is not None
    assert sparsity(model) == pytest.approx(pruner.sparsity())
    if scope == "layer":  # every layer, the attention in-projections included, at 70 %
        assert pruner.sparsity() == pytest.approx(0.7, abs=1e-3)
        for name, s in pruner.layer_sparsity().items():
            assert s == pytest.approx(0.7, abs=0.02), name
    else:  # one θ over all layers; min_keep restores a little of the smallest-scale layers
        assert pruner.sparsity() == pytest.approx(0.7, abs=0.01)
        assert pruner.sparsity() <= 0.7 + 1e-3
    if isinstance(model, TinyTransformer):
        in_proj = model.encoder[0].self_attn.in_proj_weight
        assert float((in_proj == 0).float().mean()) > 0.3


def test_the_l1_penalty_covers_in_projections_and_their_biases():
    torch.manual_seed(0)
    model = TinyTransformer(depth=1)
    pruner = DynamicPruner(
        model, ConstantThreshold(0.0), layers=LayerSelection(include=["*.in_proj", "head"])
    )
    trainer = SimpleNamespace(
        l1_layers=list(pruner.tensors.values()), settings=SimpleNamespace(l1_bias=True)
    )
    terms = FoldTrainer._l1_terms(trainer)
    attn = model.encoder[0].self_attn
    assert len(terms) == 4
    assert terms[0] is not attn.parametrizations.in_proj_weight.original  # the masked W ⊙ M
    assert torch.equal(terms[0], attn.in_proj_weight) and terms[1] is attn.in_proj_bias
    assert terms[3] is model.head.bias
    sum(t.abs().sum() for t in terms).backward()
    assert attn.parametrizations.in_proj_weight.original.grad is not None


# ------------------------------------------------------------ strip, pickle, export, sweep


@pytest.mark.parametrize("build", [_mobilenet, TinyTransformer], ids=["mobilenet", "transformer"])
def test_strip_masks_gives_the_users_class_back_and_pickles(build):
    torch.manual_seed(0)
    model = build().eval()
    _random_masks(attach_masks(model))
    x = torch.randn(IMAGE if build is _mobilenet else SEQ)
    with torch.no_grad():
        expected = model(x)
        plain = strip_masks(model)
        assert type(plain) is type(model)
        for m in plain.modules():
            assert not parametrize.is_parametrized(m)
            assert "Parametrized" not in type(m).__name__
        torch.testing.assert_close(plain(x), expected, atol=0, rtol=0)
        buf = io.BytesIO()
        torch.save(plain, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert type(loaded) is type(model)
        torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)
        torch.testing.assert_close(model(x), expected)  # the masked model is unharmed
    if isinstance(model, TinyTransformer):
        attn = plain.encoder[0].self_attn
        assert type(attn) is nn.MultiheadAttention
        assert isinstance(attn.in_proj_weight, nn.Parameter) and (attn.in_proj_weight == 0).any()


def test_save_pruned_packs_every_prunable_tensor_by_its_state_dict_key(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    _random_masks(attach_masks(model))
    path = export.save_pruned(model, {"model": {}}, tmp_path / "pruned.pt")
    blob = torch.load(path, weights_only=True)
    expected = strip_masks(model).state_dict()
    assert set(blob["sparse"]) == {t.state_key for t in prunable_tensors(TinyTransformer())}
    assert "encoder.0.self_attn.in_proj_weight" in blob["sparse"]
    assert "encoder.0.self_attn.in_proj_bias" in blob["dense"]
    state = dict(blob["dense"])
    state.update({k: export._unpack(v) for k, v in blob["sparse"].items()})
    assert set(state) == set(expected)
    for key, t in expected.items():
        assert torch.equal(state[key], t), key
    fresh = TinyTransformer().eval()
    fresh.load_state_dict(state)
    x = torch.randn(SEQ)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_one_shot_sweep_on_a_transformer_restores_the_masks():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    pruner = DynamicPruner(model, ConstantThreshold(0.02))
    pruner.update(1.0)
    before = pruner.snapshot()
    x = torch.randn(SEQ)
    points = one_shot_sweep(pruner, lambda m: float(m(x).abs().mean()), n_points=4)
    assert len(points) == 4
    sparsities = [p.sparsity for p in points]
    assert sparsities == sorted(sparsities) and sparsities[-1] > 0.95
    after = pruner.snapshot()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _attention_flops(dim: int, tokens: int) -> int:
    return 2 * tokens * dim * 3 * dim


def test_measure_counts_the_in_projection_flops_at_its_density(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer(depth=1).eval()
    pruner = DynamicPruner(
        model, ConstantThreshold(0.0), layers=LayerSelection(include=["*.in_proj"])
    )
    # Half of every row of in_proj goes: the query, key and value blocks are each 50 % zero.
    pruner.write(
        {"encoder.0.self_attn.in_proj": (torch.arange(16) % 2 == 0).expand(48, 16)}, protect=False
    )
    x = torch.randn(1, 3, 6)
    path = export.save_pruned(model, {"model": {}}, tmp_path / "pruned.pt")
    m = export.measure(model, x, path)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert m["flops_dense"] == counter.get_total_flops()
    assert m["flops_dense"] - m["flops_effective"] == _attention_flops(16, 6) / 2
    dense = sum(int((p != 0).sum()) for p in TinyTransformer(depth=1).parameters())
    assert m["nonzero_params"] == dense - 16 * 48 / 2
    assert m["file_bytes_sparse"] > 0 and m["compression"] > 1


def test_measure_of_a_pruned_mobilenet(tmp_path):
    torch.manual_seed(0)
    model = _mobilenet()
    _random_masks(attach_masks(model), p=0.8)
    x = torch.randn(IMAGE)
    path = export.save_pruned(model, {"model": {}}, tmp_path / "pruned.pt")
    m = export.measure(model, x, path)
    assert m["flops_effective"] < 0.5 * m["flops_dense"]
    assert m["nonzero_params"] < 0.5 * m["params"]
    assert m["file_bytes_sparse"] < 0.5 * m["file_bytes_dense"]


def test_measure_of_a_neuron_pruned_transformer_and_its_compact_form(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x = torch.randn(SEQ)
    pruner = DynamicPruner(
        model, ConstantThreshold(0.0), granularity="neuron", min_keep=1, example_input=x
    )
    pruner.write({n: torch.arange(32) % 2 == 0 for n in pruner.layer_names})
    path = export.save_pruned(model, {"model": {}}, tmp_path / "pruned.pt", compact_input=x)
    blob = torch.load(path, weights_only=True)
    assert blob["sparse"]["encoder.0.mlp.0.weight"]["shape"] == [16, 16]  # compacted
    m = export.measure(model, x, path, structured=True)
    assert m["flops_effective"] < m["flops_dense"]
    assert m["compact_params"] < m["params"]
    assert m["nonzero_params"] < m["params"]
    assert set(m) == set(export.MEASURE_KEYS)
    assert all(math.isfinite(v) and v > 0 for v in m.values())


# --------------------------------------------------------------- channels of torchvision nets


def test_resnet18_and_mobilenet_units_follow_the_architecture():
    x = torch.zeros(IMAGE)
    groups = _producers(torchvision.models.resnet18(num_classes=10), x)
    # The residual stream of each stage is one group: the stem (or the projection
    # shortcut) and every block's second conv write into it.
    assert groups["conv1"] == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert groups["layer4.0.conv2"] == ["layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv2"]
    assert {f"layer{s}.{b}.conv1" for s in (1, 2, 3, 4) for b in (0, 1)} <= set(groups)
    assert not any("fc" in p for ps in groups.values() for p in ps)  # the output
    net = torchvision.models.mobilenet_v3_small(num_classes=10)
    groups = _producers(net, x)
    # Inverted residual with squeeze-excitation: the expansion's channel j, the depthwise
    # filter j and the excitation's output j (x * scale) are one unit; fc1 is its own.
    assert groups["features.4.block.0.0"] == [
        "features.4.block.0.0",
        "features.4.block.1.0",
        "features.4.block.2.fc2",
    ]
    assert groups["features.4.block.2.fc1"] == ["features.4.block.2.fc1"]
    assert _group(net, x, "features.12.0").norms.keys() == {"features.12.1"}
    assert "classifier.3" in _group(net, x, "classifier.0").columns
    assert not any("classifier.3" in ps for ps in groups.values())


@pytest.mark.parametrize("build", [_resnet18, _mobilenet], ids=["resnet18", "mobilenet"])
def test_channel_pruning_compacts_torchvision_networks_exactly(build):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(IMAGE)
    policy = build_policy("agp", {"final_sparsity": 0.5, "end_epoch": 1.0, "update_every": 1})
    pruner = DynamicPruner(model, policy, granularity="channel", min_keep=1, example_input=x)
    assert pruner.step(1, 2.0) is not None
    assert pruner.sparsity() > 0.15
    with torch.no_grad():
        expected = model(x)
        small = compact_model(model, x)
        assert type(small) is type(model)
        torch.testing.assert_close(small(x), expected, atol=1e-5, rtol=1e-4)
    assert expected.abs().mean() > 1e-2  # a meaningful comparison
    assert count_parameters(small) < count_parameters(strip_masks(model))


def test_neuron_pruning_of_a_transformer_mlp_on_tokens_is_exact():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x = torch.randn(SEQ)
    # Units of a Linear on tokens [B, T, F] live on the last axis: the MLP's first Linear
    # feeds the second through a GELU; everything else meets a LayerNorm or a residual sum.
    assert set(_producers(model, x)) == {"encoder.0.mlp.0", "encoder.1.mlp.0"}
    criterion = Activation()
    pruner = DynamicPruner(
        model, ConstantThreshold(0.0), criterion, granularity="neuron", min_keep=1, example_input=x
    )
    model.train()
    model(x)
    assert criterion.unit_scores("encoder.0.mlp.0").shape == (32,)
    model.eval()
    pruner.write({n: torch.arange(32) % 4 != 0 for n in pruner.layer_names})
    with torch.no_grad():
        small = compact_model(model, x)
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-4)
    assert small.encoder[0].mlp[0].out_features == 24 and small.encoder[1].mlp[2].in_features == 24


def test_norms_that_mix_units_or_sit_on_another_axis_keep_a_layer_dense():
    x = torch.randn(2, 5, 4)  # [B, T, F]
    cases = {
        "layernorm": nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)),
        "batchnorm over T": nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(5), nn.Linear(6, 3)),
        "groupnorm": nn.Sequential(nn.Conv1d(5, 6, 1), nn.GroupNorm(2, 6), nn.Conv1d(6, 3, 1)),
        "linear on positions": nn.Sequential(nn.Conv1d(5, 6, 1), nn.ReLU(), nn.Linear(4, 3)),
    }
    for why, net in cases.items():
        assert "0" not in _producers(net, x), why
    ok = nn.Sequential(nn.Conv1d(5, 6, 1), nn.BatchNorm1d(6), nn.Hardswish(), nn.Conv1d(6, 3, 1))
    assert _group(ok, x, "0").norms.keys() == {"1"} and not _group(ok, x, "0").inexact
    # hardsigmoid(0) = 1/2: a removed channel is exact only with the consumer's columns masked.
    lossy = nn.Sequential(nn.Conv1d(5, 6, 1), nn.Hardsigmoid(), nn.Conv1d(6, 3, 1))
    assert _group(lossy, x, "0").inexact == {"2"}


class MyAttention(nn.MultiheadAttention):
    """A user's subclass of the attention: fx cannot trace through its forward's branches."""


class MyLinear(nn.Linear):
    pass


def test_user_subclasses_of_layers_and_attention_are_traced_whole():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = MyAttention(8, 2, batch_first=True)
            self.fc1 = MyLinear(8, 12)
            self.fc2 = nn.Linear(12, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.attn(x, x, x, need_weights=False)[0]
            return self.fc2(torch.relu(self.fc1(x))).mean(dim=1)

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 4, 8)
    assert [t.name for t in prunable_tensors(net)] == [
        "attn.in_proj",
        "attn.out_proj",
        "fc1",
        "fc2",
    ]
    pruner = DynamicPruner(
        net, ConstantThreshold(0.0), granularity="neuron", min_keep=1, example_input=x
    )
    assert pruner.layer_names == ["fc1"]
    pruner.write({"fc1": torch.arange(12) < 5})
    with torch.no_grad():
        small = compact_model(net, x)
        torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=1e-4)
    assert type(small.attn) is MyAttention and type(small.fc1) is MyLinear
    assert small.fc1.out_features == 5


@pytest.mark.parametrize("target", ["resnet18", "mobilenet_v3_small", "resnet20"])
def test_channel_pruned_networks_reload_from_the_compact_export(target, tmp_path):
    from dtp_search.models.export import load_pruned, save_pruned

    torch.manual_seed(0)
    settings = (
        {"name": target, "arch": "resnet20", "depth_n": 3, "widths": [16, 32, 64]}
        if target == "resnet20"
        else {"name": target, "arch": "custom", "_target_": f"torchvision.models.{target}"}
    )
    model = build_model(settings, (3, 32, 32), 10).eval()
    x = torch.randn(2, 3, 32, 32)
    pruner = DynamicPruner(
        model, ConstantThreshold(0.0), granularity="channel", min_keep=1, example_input=x[:1]
    )
    pruner.write({v.name: torch.rand(v.keep.numel()) > 0.5 for v in pruner.layer_views()})
    config = {"model": settings, "input_shape": [3, 32, 32], "num_classes": 10}
    path = save_pruned(model, config, tmp_path / "pruned.pt", compact_input=x[:1])
    loaded = load_pruned(path)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(loaded(x), expected, atol=1e-4, rtol=1e-4)
    assert count_parameters(loaded) < 0.7 * count_parameters(strip_masks(model))
    depthwise = [m for m in loaded.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)


class TinyDenseNet(nn.Module):
    """Two DenseNet layers: each concatenates its new channels to what came before."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grow1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
        self.grow2 = nn.Sequential(nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 4, 3, padding=1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.grow1(x)], 1)
        x = torch.cat([x, self.grow2(x)], dim=1)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_concatenated_channels_keep_their_offsets_and_compact_exactly():
    torch.manual_seed(0)
    net = TinyDenseNet().eval()
    x = torch.randn(2, 3, 8, 8)
    groups = {g.name: g for g in trace_channels(net, x[:1]).groups}
    assert groups["grow1.2"].columns["grow2.2"].flatten().tolist() == [8, 9, 10, 11]
    assert groups["grow1.2"].columns["fc"].flatten().tolist() == [8, 9, 10, 11]
    assert groups["grow2.2"].columns["fc"].flatten().tolist() == [12, 13, 14, 15]
    assert groups["stem"].norms.keys() == {"grow1.0", "grow2.0"}
    pruner = DynamicPruner(
        net, ConstantThreshold(0.0), granularity="channel", min_keep=1, example_input=x[:1]
    )
    pruner.write(
        {
            "stem": torch.arange(8) % 2 == 0,
            "grow1.2": torch.tensor([True, False, True, True]),
            "grow2.2": torch.tensor([False, True, True, False]),
        }
    )
    small = compact_model(net, x[:1]).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=1e-4)
    assert small.fc.in_features == 4 + 3 + 2 and small.grow2[2].in_channels == 4 + 3
