"""Importance criteria on hand-made tensors: build_criterion's arguments, gradient (GSP),
taylor with beta=0 (AGSP) and activation_gradient (GSAP)."""

import pytest
import torch
from torch import nn

from dtp_search.pruning import (
    CRITERIA,
    ActivationGradient,
    AGPThreshold,
    ConstantThreshold,
    DynamicPruner,
    Gradient,
    Magnitude,
    Taylor,
    build_criterion,
)


def _linear(weight, bias=False):
    lin = nn.Linear(len(weight[0]), len(weight), bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(weight))
    return lin


def _set_grad(module, grad):
    w = (
        module.parametrizations.weight.original
        if hasattr(module, "parametrizations")
        else module.weight
    )
    w.grad = torch.tensor(grad, dtype=w.dtype).reshape(w.shape)


# --- build_criterion ---------------------------------------------------------------


def test_build_criterion_without_arguments_keeps_working():
    assert isinstance(build_criterion("magnitude"), Magnitude)
    assert build_criterion("taylor").beta == 0.9
    assert build_criterion("taylor", None).beta == 0.9
    assert build_criterion("taylor", {}).beta == 0.9
    assert set(CRITERIA) == {"magnitude", "taylor", "gradient", "activation", "activation_gradient"}


@pytest.mark.parametrize("name", ["taylor", "gradient", "activation", "activation_gradient"])
def test_build_criterion_passes_beta(name):
    crit = build_criterion(name, {"beta": 0.0})
    assert type(crit) is CRITERIA[name] and crit.beta == 0.0


def test_unknown_argument_names_the_criterion_the_key_and_the_allowed_keys():
    with pytest.raises(
        ValueError, match=r"criterion taylor has no argument 'gamma'; allowed: \['beta'\]"
    ):
        build_criterion("taylor", {"gamma": 0.5})
    with pytest.raises(
        ValueError, match="criterion magnitude has no argument 'beta'; allowed: none"
    ):
        build_criterion("magnitude", {"beta": 0.5})


def test_unknown_criterion_lists_the_allowed_ones():
    with pytest.raises(
        ValueError, match=r"policy.criterion='hessian' is not supported; allowed: \["
    ):
        build_criterion("hessian", {"beta": 0.5})


@pytest.mark.parametrize("beta", [1.0, -0.1, 1.5, True, "0.5", None])
@pytest.mark.parametrize("name", ["taylor", "gradient", "activation", "activation_gradient"])
def test_beta_must_be_in_zero_one(name, beta):
    with pytest.raises(ValueError, match=f"criterion {name}: beta must be a number in \\[0, 1\\)"):
        build_criterion(name, {"beta": beta})


# --- taylor with beta = 0 (AGSP) ---------------------------------------------------------


def test_taylor_with_beta_zero_is_the_last_steps_weight_times_gradient():
    lin = _linear([[1.0, -2.0, 0.5]])
    crit = Taylor(beta=0.0)
    crit.attach({"l": lin})
    assert crit.scores("l").tolist() == [[1.0, 2.0, 0.5]]  # before a step: |w|
    _set_grad(lin, [3.0, 1.0, -4.0])
    crit.observe()
    assert crit.scores("l").tolist() == [[3.0, 2.0, 2.0]]
    _set_grad(lin, [0.5, -0.25, 2.0])
    crit.observe()
    assert crit.scores("l").tolist() == [[0.5, 0.5, 1.0]]  # |g·w| of step 2 alone
    lin.weight.grad = None  # a step without a gradient keeps the last one
    crit.observe()
    assert crit.scores("l").tolist() == [[0.5, 0.5, 1.0]]


def test_taylor_with_beta_zero_forgets_an_overflowing_step():
    lin = _linear([[1.0, 1.0]])
    crit = Taylor(beta=0.0)
    crit.attach({"l": lin})
    _set_grad(lin, [float("inf"), 1.0])
    crit.observe()
    _set_grad(lin, [2.0, 1.0])
    crit.observe()  # 0·inf would be nan
    assert crit.scores("l").tolist() == [[2.0, 1.0]]


# --- gradient (GSP) ------------------------------------------------------------------


def test_gradient_score_is_a_moving_average_of_absolute_gradients():
    lin = _linear([[1.0, -2.0], [0.5, 4.0]])
    crit = Gradient(beta=0.5)
    crit.attach({"l": lin})
    assert crit.scores("l").tolist() == [[1.0, 2.0], [0.5, 4.0]]  # before a step: |w|
    _set_grad(lin, [2.0, -4.0, 0.0, 1.0])
    crit.observe()
    assert crit.scores("l").tolist() == [[2.0, 4.0], [0.0, 1.0]]
    _set_grad(lin, [-1.0, 0.0, 3.0, 1.0])
    crit.observe()
    # EMA(0.5): [[1.5, 2.0], [1.5, 1.0]]; units: mean over each row
    assert crit.scores("l").tolist() == [[1.5, 2.0], [1.5, 1.0]]
    assert crit.unit_scores("l").tolist() == [1.75, 1.25]


def test_gradient_with_beta_zero_is_the_last_steps_gradient():
    lin = _linear([[1.0, 1.0, 1.0]])
    crit = Gradient(beta=0.0)
    crit.attach({"l": lin})
    for grad in ([5.0, -1.0, 2.0], [0.25, 3.0, -0.5]):
        _set_grad(lin, grad)
        crit.observe()
    assert crit.scores("l").tolist() == [[0.25, 3.0, 0.5]]


def test_gradient_scores_a_pruned_weight_zero_unless_dense():
    lin = _linear([[1.0, 2.0, 3.0]])
    crit = Gradient(beta=0.0)
    DynamicPruner(lin, ConstantThreshold(0.0), crit)
    lin.parametrizations.weight[0].set_(torch.tensor([[True, False, True]]))
    _set_grad(lin, [1.0, 2.0, -3.0])  # a straight-through mask would let g reach w₁
    crit.observe()
    assert crit.scores("").tolist() == [[1.0, 0.0, 3.0]]
    assert crit.scores("", dense=True).tolist() == [[1.0, 2.0, 3.0]]
    assert crit.unit_scores("").tolist() == [pytest.approx(4.0 / 3.0)]  # mean over the row


def test_gradient_unit_score_of_a_conv_channel_is_the_mean_over_its_filter():
    conv = nn.Conv2d(2, 2, kernel_size=2, bias=False)
    crit = Gradient(beta=0.0)
    crit.attach({"c": conv})
    grad = torch.arange(16, dtype=torch.float32).reshape(2, 2, 2, 2) - 4.0
    conv.weight.grad = grad.clone()
    crit.observe()
    assert crit.unit_scores("c").tolist() == pytest.approx(
        grad.abs().reshape(2, -1).mean(1).tolist()
    )
    assert crit.unit_scores("c").tolist() == pytest.approx([2.0, 7.5])


def test_gradient_gets_its_gradients_from_a_training_step():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2, bias=False)
    crit = Gradient(beta=0.0)
    pruner = DynamicPruner(lin, ConstantThreshold(0.0), crit)
    x = torch.tensor([[1.0, -2.0, 3.0]])
    lin(x).sum().backward()  # ∂J/∂W = 1 ⊗ x
    pruner.step(1, 0.5)
    assert crit.scores("").tolist() == [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]


def test_gradient_state_dict_round_trips():
    lin = _linear([[1.0, 1.0]])
    crit = Gradient(beta=0.5)
    crit.attach({"l": lin})
    _set_grad(lin, [2.0, -6.0])
    crit.observe()
    other = Gradient(beta=0.5)
    other.attach({"l": lin})
    other.load_state_dict(crit.state_dict())
    assert other.scores("l").tolist() == [[2.0, 6.0]]
    _set_grad(lin, [0.0, 0.0])
    other.observe()
    assert other.scores("l").tolist() == [[1.0, 3.0]]
    assert crit.scores("l").tolist() == [[2.0, 6.0]]  # a copy, not shared


# --- activation_gradient (GSAP) --------------------------------------------------------


def test_activation_gradient_is_a_moving_average_of_output_gradients():
    lin = _linear([[1.0, 0.0], [0.0, 1.0]])
    crit = ActivationGradient(beta=0.5)
    crit.attach({"l": lin})
    x = torch.ones(2, 2)
    c1 = torch.tensor([[1.0, -2.0], [3.0, 0.0]])  # J = Σ c ⊙ z, so ∂J/∂z = c
    (lin(x) * c1).sum().backward()
    crit.observe()
    assert crit.unit_scores("l").tolist() == [2.0, 1.0]  # mean over the batch of |c|
    c2 = torch.tensor([[0.0, 4.0], [-2.0, 2.0]])
    (lin(x) * c2).sum().backward()
    crit.observe()
    assert crit.unit_scores("l").tolist() == [1.5, 2.0]  # EMA(0.5) of [2, 1] and [1, 3]


def test_activation_gradient_averages_over_batch_and_positions_of_a_conv():
    conv = nn.Conv2d(1, 2, kernel_size=1)
    crit = ActivationGradient(beta=0.0)
    crit.attach({"c": conv})
    c = torch.arange(16, dtype=torch.float32).reshape(2, 2, 2, 2) - 8.0  # B, C, H, W
    (conv(torch.randn(2, 1, 2, 2)) * c).sum().backward()
    crit.observe()
    assert crit.unit_scores("c").tolist() == pytest.approx(c.abs().mean(dim=(0, 2, 3)).tolist())
    assert crit.unit_scores("c").tolist() == pytest.approx([4.0, 4.0])


def test_activation_gradient_sees_the_output_before_an_inplace_relu():
    lin = _linear([[1.0], [-1.0]])
    net = nn.Sequential(lin, nn.ReLU(inplace=True), _linear([[2.0, 3.0]]))
    crit = ActivationGradient(beta=0.0)
    crit.attach({"0": lin})
    net(torch.ones(1, 1)).sum().backward()
    crit.observe()
    assert crit.unit_scores("0").tolist() == [2.0, 0.0]  # relu'(−1) = 0 stops unit 1's gradient


def test_activation_gradient_with_beta_zero_is_the_last_steps_mean_over_backward_passes():
    lin = _linear([[1.0, 0.0], [0.0, 1.0]])
    crit = ActivationGradient(beta=0.0)
    crit.attach({"l": lin})
    (lin(torch.ones(1, 2)) * torch.tensor([[9.0, 9.0]])).sum().backward()
    crit.observe()
    # two backward passes before one step (gradient accumulation): their mean
    for c in ([[1.0, -2.0]], [[3.0, 0.0]]):
        (lin(torch.ones(1, 2)) * torch.tensor(c)).sum().backward()
    crit.observe()
    assert crit.unit_scores("l").tolist() == [2.0, 1.0]
    crit.observe()  # a step without a backward pass keeps the last score
    assert crit.unit_scores("l").tolist() == [2.0, 1.0]


def test_activation_gradient_ignores_eval_mode_and_no_grad_passes():
    lin = _linear([[1.0, 2.0], [3.0, 4.0]])
    crit = ActivationGradient()
    crit.attach({"l": lin})
    with torch.no_grad():
        lin(torch.ones(1, 2))
    lin.eval()
    lin(torch.ones(1, 2)).sum().backward()
    crit.observe()
    # nothing recorded: the fallback, each unit's weight RMS
    assert crit.unit_scores("l").tolist() == pytest.approx([(2.5) ** 0.5, (12.5) ** 0.5])
    assert crit.state_dict() == {"avg": {}}


def test_activation_gradient_detach_removes_the_hooks():
    lin = _linear([[1.0, 0.0], [0.0, 1.0]])
    crit = ActivationGradient(beta=0.0)
    crit.attach({"l": lin})
    crit.attach({"l": lin})  # attaching again does not record twice
    assert len(lin._forward_hooks) == 1
    (lin(torch.ones(1, 2)) * torch.tensor([[1.0, 2.0]])).sum().backward()
    crit.observe()
    crit.detach()
    assert not lin._forward_hooks
    (lin(torch.ones(1, 2)) * torch.tensor([[5.0, 5.0]])).sum().backward()
    crit.observe()
    assert crit.unit_scores("l").tolist() == [1.0, 2.0]  # scores of the last state stay


def test_activation_gradient_scores_units_only():
    crit = ActivationGradient()
    crit.attach({"l": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="scores units"):
        crit.scores("l")
    with pytest.raises(ValueError, match="not supported by criterion activation_gradient"):
        DynamicPruner(nn.Linear(2, 2), ConstantThreshold(0.0), ActivationGradient())


def test_activation_gradient_state_dict_round_trips():
    lin = _linear([[1.0, 0.0], [0.0, 1.0]])
    crit = ActivationGradient(beta=0.5)
    crit.attach({"l": lin})
    (lin(torch.ones(1, 2)) * torch.tensor([[2.0, -4.0]])).sum().backward()
    crit.observe()
    other = ActivationGradient(beta=0.5)
    other.attach({"l": lin})
    other.load_state_dict(crit.state_dict())
    assert other.unit_scores("l").tolist() == [2.0, 4.0]
    crit.detach()  # only `other` records from now on
    (lin(torch.ones(1, 2)) * torch.tensor([[0.0, 0.0]])).sum().backward()
    other.observe()
    assert other.unit_scores("l").tolist() == [1.0, 2.0]
    assert crit.unit_scores("l").tolist() == [2.0, 4.0]


def test_activation_gradient_drives_a_structured_pruner_during_training():
    net = nn.Sequential(
        _linear([[1.0], [1.0], [1.0]], bias=True),
        nn.ReLU(inplace=True),
        _linear([[1.0, -3.0, 0.5]], bias=True),
    )
    crit = ActivationGradient(beta=0.0)
    pruner = DynamicPruner(
        net,
        AGPThreshold(1 / 3, end_epoch=1.0, update_every=1),
        crit,
        granularity="neuron",
        min_keep=0,
        example_input=torch.zeros(1, 1),
    )
    assert pruner.layer_names == ["0"]
    net(torch.ones(4, 1)).sum().backward()  # ∂J/∂z_j = W₂[0, j] for every sample (all z > 0)
    pruner.step(1, 2.0)  # past end_epoch: a third of the units go
    assert crit.unit_scores("0", dense=True).tolist() == [1.0, 3.0, 0.5]
    assert pruner.snapshot()["units:0"].tolist() == [True, True, False]
    # the pruned unit scores 0 on the effective weights at once, though its average still
    # holds the last step's 0.5
    assert crit.unit_scores("0").tolist() == [1.0, 3.0, 0.0]
    assert (net[2].weight[:, 2] == 0).all()
