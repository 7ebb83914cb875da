import torch
from torch import nn

from dtp_search.pruning import attach_masks, get_mask, sparsity
from dtp_search.pruning.masks import original_weight, restore_masks, snapshot_masks


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def test_masks_attach_to_every_linear_and_conv_once():
    net = _net()
    masks = attach_masks(net)
    assert set(masks) == {"0", "3"}
    assert attach_masks(net)["0"] is masks["0"]  # idempotent
    assert torch.equal(net[0].weight, original_weight(net[0]))  # all-ones mask
    assert "0.parametrizations.weight.0.mask" in net.state_dict()


def test_pruned_weights_stay_exactly_zero_under_momentum_and_weight_decay():
    net = _net()
    masks = attach_masks(net)
    for m in masks.values():
        m.set_(torch.rand_like(m.mask) > 0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 5, (16,))
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    for name, layer in (("0", net[0]), ("3", net[3])):
        pruned = ~masks[name].bool_mask
        assert pruned.any()
        assert torch.all(layer.weight[pruned] == 0)  # effective weight: exactly zero
        assert torch.any(original_weight(layer)[pruned] != 0)  # dense parameter still there


def test_relaxed_mask_lets_the_weight_recover():
    lin = nn.Linear(3, 2)
    mask = attach_masks(lin)[""]
    w0 = original_weight(lin).detach().clone()
    mask.set_(torch.zeros(2, 3, dtype=torch.bool))
    assert torch.all(lin.weight == 0)
    mask.set_(torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(lin.weight, w0)


def test_gradient_reaches_pruned_weights_only_with_straight_through():
    for st in (False, True):
        lin = nn.Linear(4, 3)
        mask = attach_masks(lin, straight_through=st)[""]
        keep = torch.tensor([[1, 0, 1, 0]] * 3, dtype=torch.bool)
        mask.set_(keep)
        lin(torch.randn(8, 4)).pow(2).sum().backward()
        g = original_weight(lin).grad
        assert torch.all(g[~keep] != 0) if st else torch.all(g[~keep] == 0)
        assert torch.all(lin.weight[~keep] == 0)


def test_sparsity_counts_prunable_weights_only():
    net = _net()
    masks = attach_masks(net)
    masks["3"].set_(torch.zeros_like(masks["3"].mask, dtype=torch.bool))
    n_conv, n_fc = net[0].weight.numel(), net[3].weight.numel()
    assert sparsity(net) == n_fc / (n_conv + n_fc)  # biases are not counted


def test_snapshot_and_restore():
    net = _net()
    masks = attach_masks(net)
    saved = snapshot_masks(net)
    masks["0"].set_(torch.zeros_like(masks["0"].mask, dtype=torch.bool))
    restore_masks(net, saved)
    assert get_mask(net[0]).mask.all()
