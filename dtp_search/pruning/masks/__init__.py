"""Binary masks on the prunable weights of a network: what is prunable (:mod:`.tensors`),
which layers a pruner masks (:mod:`.selection`), the mask parametrizations
(:mod:`.parametrization`) and whole-network operations on them (:mod:`.network`)."""

from dtp_search.pruning.masks.network import (
    attach_masks,
    layer_sparsity,
    restore_masks,
    snapshot_masks,
    sparsity,
)
from dtp_search.pruning.masks.parametrization import (
    SoftThresholdMask,
    WeightMask,
    attach_mask,
    effective_weight,
    get_mask,
    original_weight,
)
from dtp_search.pruning.masks.selection import LayerSelection
from dtp_search.pruning.masks.tensors import (
    PRUNABLE_TYPES,
    PrunableTensor,
    prunable_layers,
    prunable_tensors,
)

__all__ = [
    "PRUNABLE_TYPES",
    "LayerSelection",
    "PrunableTensor",
    "SoftThresholdMask",
    "WeightMask",
    "attach_mask",
    "attach_masks",
    "effective_weight",
    "get_mask",
    "layer_sparsity",
    "original_weight",
    "prunable_layers",
    "prunable_tensors",
    "restore_masks",
    "snapshot_masks",
    "sparsity",
]
