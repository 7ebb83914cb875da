"""Sparse export of a pruned model, its loader, and the measures of what pruning saved.

File format (``torch.save`` of plain containers, so ``torch.load(weights_only=True)``
reads it without unpickling code)::

    {"format": "dtp_search.sparse/1",
     "config": {"model": {...}, "input_shape": [C, H, W], "num_classes": K,
                "mean": [...], "std": [...], ...},
     "dense":  {name: tensor},                      # biases, norms, unpruned tensors
     "sparse": {name: {"shape": [...], "bits": uint8 tensor, "values": tensor}}}

The names are the model's ``state_dict`` keys; ``sparse`` holds the prunable tensors of
:func:`dtp_search.pruning.prunable_tensors` (``"fc.weight"``, an attention's
``"encoder.0.self_attn.in_proj_weight"``), ``dense`` everything else.

A sparse tensor is its non-zero values in row-major order plus its occupancy as a bit
mask packed 8 entries per byte (``numpy.packbits``): 1 bit per entry + one value per
non-zero, smaller than dense storage above ~3 % sparsity and smaller than CSR/COO
index lists (4–8 bytes per non-zero) at every sparsity a pruning study reaches.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from dtp_search.files import atomic_save
from dtp_search.models.build import build_model
from dtp_search.pruning import (
    apply_layout,
    compact_model,
    count_flops,
    layout,
    median_latency_ms,
    prunable_tensors,
    strip_masks,
    structural_cost,
)
from dtp_search.pruning.cost import no_fastpath

FORMAT = "dtp_search.sparse/1"


def _pack(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().cpu().contiguous()
    nz = (t != 0).reshape(-1)
    bits = np.packbits(nz.numpy())
    return {
        "shape": list(t.shape),
        "bits": torch.from_numpy(bits),
        "values": t.reshape(-1)[nz].clone(),
    }


def _unpack(entry: dict[str, Any]) -> torch.Tensor:
    shape = [int(s) for s in entry["shape"]]
    n = int(np.prod(shape)) if shape else 1
    nz = torch.from_numpy(np.unpackbits(entry["bits"].numpy(), count=n).astype(bool))
    out = torch.zeros(n, dtype=entry["values"].dtype)
    out[nz] = entry["values"]
    return out.reshape(shape)


def save_pruned(
    model: nn.Module,
    config: dict[str, Any],
    path: str | os.PathLike,
    *,
    compact_input: torch.Tensor | None = None,
) -> Path:
    """Write ``model`` (masks baked in) sparsely, with the ``config`` needed to rebuild it.

    With ``compact_input`` (structured pruning) the physically smaller network of
    :func:`dtp_search.pruning.compact_model` is written instead; :func:`load_pruned`
    resizes the layers to the stored tensors.
    """
    plain = (
        strip_masks(model) if compact_input is None else compact_model(model, compact_input)
    ).cpu()
    weights = {t.state_key for t in prunable_tensors(plain)}
    dense, sparse = {}, {}
    for key, t in plain.state_dict().items():
        if key in weights:
            sparse[key] = _pack(t)
        else:
            dense[key] = t.detach().cpu().clone()
    path = Path(path)
    if compact_input is not None:  # what no tensor records (depthwise groups, channel pads)
        config = {**config, "layout": layout(plain)}
    # atomic_save: a full disk is one DiskFullError naming the file, and no half-written
    # export is left where a reader (MLflow's artifact copy) would take it for a whole one.
    atomic_save({"format": FORMAT, "config": config, "dense": dense, "sparse": sparse}, path)
    return path


def load_pruned(
    source: str | os.PathLike,
    *,
    tracking_uri: str | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a model written by :func:`save_pruned`.

    ``source`` is a file path, or the id of a refit MLflow run (its ``model/pruned.pt``
    artifact is downloaded from ``tracking_uri``, or the current MLflow tracking URI).
    The file is read with ``torch.load(..., weights_only=True)``. The returned model is
    in eval mode; ``model.dtp_config`` holds the exported config (normalisation included).
    """
    path = Path(source)
    if not path.exists():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        path = Path(client.download_artifacts(str(source), "model/pruned.pt"))
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dtp_search export (format={blob.get('format')!r})")
    cfg = blob["config"]
    model = build_model(OmegaConf.create(cfg["model"]), cfg["input_shape"], cfg["num_classes"])
    state = dict(blob["dense"])
    state.update({k: _unpack(v) for k, v in blob["sparse"].items()})
    apply_layout(model, cfg.get("layout", {}))
    _resize_to(model, state)
    model.load_state_dict(state)
    model.dtp_config = cfg
    return model.to(map_location).eval()


def _resize_to(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every parameter/buffer the shape it has in ``state`` (compacted exports)."""
    modules = dict(model.named_modules())
    for key, t in state.items():
        owner, _, attr = key.rpartition(".")
        module = modules[owner]
        current = getattr(module, attr)
        if current is None or current.shape == t.shape:
            continue
        if attr in module._parameters:
            setattr(module, attr, nn.Parameter(torch.empty_like(t)))
        else:
            module.register_buffer(attr, torch.empty_like(t))
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and w is not None:
            module.out_features, module.in_features = w.shape[0], w.shape[1]
        elif isinstance(module, nn.modules.conv._ConvNd) and w is not None:
            module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_features = t.shape[0]


# --------------------------------------------------------------------------- measures


# One piece of a prunable tensor's FLOPs: the FLOPs and the rows of the tensor they use.
_Piece = tuple[int, slice]


def _tokens(t: torch.Tensor) -> int:
    """Vectors an attention projection multiplies: every entry but the feature axis."""
    return t.numel() // t.shape[-1]


def _attention_pieces(
    mha: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> dict[str, list[_Piece]]:
    """Projection FLOPs of one ``nn.MultiheadAttention`` call, 2·(tokens)·(fan-in)·(fan-out)
    per matrix product: the query, key and value projections
    2·T_q·E·E, 2·T_k·E·kdim, 2·T_v·E·vdim (rows 0…E−1, E…2E−1, 2E…3E−1 of a packed
    ``in_proj_weight``), and the output projection 2·T_q·E·E. The attention reads its
    weights itself (``F.multi_head_attention_forward``), so ``out_proj``'s own forward
    hook never runs."""
    e = mha.embed_dim
    fq, fk, fv = (
        2 * _tokens(q) * e * e,
        2 * _tokens(k) * e * mha.kdim,
        2 * _tokens(v) * e * mha.vdim,
    )
    if mha._qkv_same_embed_dim:
        inproj = {
            "in_proj_weight": [(fq, slice(0, e)), (fk, slice(e, 2 * e)), (fv, slice(2 * e, 3 * e))]
        }
    else:
        inproj = {
            "q_proj_weight": [(fq, slice(None))],
            "k_proj_weight": [(fk, slice(None))],
            "v_proj_weight": [(fv, slice(None))],
        }
    inproj["out_proj"] = [(2 * _tokens(q) * e * e, slice(None))]
    return inproj


def _layer_flops(model: nn.Module, x: torch.Tensor) -> dict[str, list[_Piece]]:
    """Dense FLOPs of every prunable tensor in one forward pass of ``x``, as pieces
    (FLOPs, rows of the tensor they use): a Linear/Conv layer's own forward, summed over its
    calls (``FlopCounterMode``), in one piece; an attention's projections as
    :func:`_attention_pieces` counts them."""
    tensors = list(prunable_tensors(model))
    names = {(id(t.module), t.attr): t.name for t in tensors}
    layer_inputs: dict[str, list[torch.Tensor]] = {}
    attention: dict[str, list[_Piece]] = {}

    def on_layer(name: str):
        def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            layer_inputs.setdefault(name, []).append(inp[0])

        return hook

    def on_attention(mha: nn.MultiheadAttention):
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
            q, k, v = (
                args[i] if len(args) > i else kwargs[key]
                for i, key in enumerate(("query", "key", "value"))
            )
            for attr, pieces in _attention_pieces(mha, q, k, v).items():
                name = (
                    names.get((id(mha.out_proj), "weight"))
                    if attr == "out_proj"
                    else names.get((id(mha), attr))
                )
                if name is not None:
                    attention.setdefault(name, []).extend(pieces)

        return hook

    hooks = []
    for t in tensors:
        if t.has_units:
            hooks.append(t.module.register_forward_hook(on_layer(t.name)))
        elif t.attr in ("in_proj_weight", "q_proj_weight"):  # one hook per attention
            hooks.append(t.module.register_forward_hook(on_attention(t.module), with_kwargs=True))
    try:
        with torch.no_grad(), no_fastpath():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    modules = {t.name: t.module for t in tensors}
    out = {
        name: [(sum(count_flops(modules[name], inp) for inp in inps), slice(None))]
        for name, inps in layer_inputs.items()
    }
    out.update(attention)
    return out


# Every metric measure() can return. The compacted network's own figures (compact_params,
# flops_compact, latency_ms_compact) exist for neuron/channel exports only; the fractions
# (compacted / dense) for every export: weight-level masks remove no unit, so theirs are 1.
MEASURE_KEYS = (
    "params",
    "nonzero_params",
    "compression",
    "flops_dense",
    "flops_effective",
    "file_bytes_dense",
    "file_bytes_sparse",
    "latency_ms_dense",
    "flops_fraction",
    "params_fraction",
    "latency_fraction",
    "compact_params",
    "flops_compact",
    "latency_ms_compact",
)


def measure(
    model: nn.Module,
    example_input: torch.Tensor,
    export_path: str | os.PathLike,
    *,
    structured: bool = False,
    batch_size: int = 64,
    warmup: int = 3,
    repeats: int = 20,
) -> dict[str, float]:
    """Parameters, non-zeros, compression, FLOPs dense vs effective, file sizes, and the
    cost of the network on ordinary dense kernels: the compacted network's FLOPs,
    parameters and latency against the dense network's (:mod:`dtp_search.pruning.cost`).

    Effective FLOPs count a pruned layer at its weight density: total − Σ_l F_l·(1 − d_l),
    with F_l the layer's dense FLOPs from ``torch.utils.flop_counter.FlopCounterMode`` and
    d_l the fraction of its weights that are non-zero. An attention's packed in-projection
    counts as three pieces, F_q·(1 − d_q) + F_k·(1 − d_k) + F_v·(1 − d_v) over the query,
    key and value rows (their token counts differ in cross-attention); attention's fused
    inference kernels are switched off while counting, so that every projection counts.
    That is what sparse kernels could save; dense kernels save only what compaction removes:

    with ``structured`` (neuron/channel masks, :func:`~dtp_search.pruning.compact_model`),
    ``flops_compact``/``flops_dense`` at batch 1 (``flops_fraction``),
    ``compact_params``/``params`` (``params_fraction``), and
    ``latency_ms_compact``/``latency_ms_dense`` (``latency_fraction``): the median forward
    time of a batch of ``batch_size`` copies of ``example_input`` over ``repeats`` runs
    after ``warmup`` (:func:`~dtp_search.pruning.median_latency_ms`), on
    ``example_input``'s device. Weight-level masks remove no unit: the compacted network
    is the dense one, every fraction is 1, and only ``latency_ms_dense`` is timed.
    """
    plain = strip_masks(model).cpu().eval()
    x = example_input[:1].cpu()
    params = sum(p.numel() for p in plain.parameters())
    nonzero = sum(int((p != 0).sum()) for p in plain.parameters())
    dense_flops = count_flops(plain, x)
    weights = {t.name: t.weight.detach() for t in prunable_tensors(plain)}
    saved = sum(
        f * float((weights[name][rows] == 0).float().mean())
        for name, pieces in _layer_flops(plain, x).items()
        for f, rows in pieces
    )
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    out = {
        "params": float(params),
        "nonzero_params": float(nonzero),
        "compression": params / max(nonzero, 1),
        "flops_dense": float(dense_flops),
        "flops_effective": float(round(dense_flops - saved)),
        "file_bytes_dense": float(buf.getbuffer().nbytes),
        "file_bytes_sparse": float(Path(export_path).stat().st_size),
    }
    one = example_input[:1]
    batch = one.expand(batch_size, *one.shape[1:]).contiguous()

    def time_ms(m: nn.Module) -> float:
        return median_latency_ms(m, batch, warmup=warmup, repeats=repeats)

    out["latency_ms_dense"] = time_ms(strip_masks(model).eval())
    if not structured:
        out.update(flops_fraction=1.0, params_fraction=1.0, latency_fraction=1.0)
        return out
    compact = compact_model(model, one).eval()
    cost = structural_cost(model, one, compact=compact, dense=(dense_flops, params))
    out["compact_params"] = float(cost.params_compact)
    out["flops_compact"] = float(cost.flops_compact)
    out["flops_fraction"] = cost.flops
    out["params_fraction"] = cost.params
    out["latency_ms_compact"] = time_ms(compact)
    out["latency_fraction"] = out["latency_ms_compact"] / out["latency_ms_dense"]
    return out
