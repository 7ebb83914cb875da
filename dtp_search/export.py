"""Sparse export of a pruned model, its loader, and the measures of what pruning saved.

File format (``torch.save`` of plain containers, so ``torch.load(weights_only=True)``
reads it without unpickling code)::

    {"format": "dtp_search.sparse/1",
     "config": {"model": {...}, "input_shape": [C, H, W], "num_classes": K,
                "mean": [...], "std": [...], ...},
     "dense":  {name: tensor},                      # biases, norms, unpruned tensors
     "sparse": {name: {"shape": [...], "bits": uint8 tensor, "values": tensor}}}

A sparse tensor is its non-zero values in row-major order plus its occupancy as a bit
mask packed 8 entries per byte (``numpy.packbits``): 1 bit per entry + one value per
non-zero, smaller than dense storage above ~3 % sparsity and smaller than CSR/COO
index lists (4–8 bytes per non-zero) at every sparsity a pruning study reaches.
"""

from __future__ import annotations

import io
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dtp_search.models import build_model
from dtp_search.pruning import compact_model, prunable_layers, strip_masks

FORMAT = "dtp_search.sparse/1"


def _pack(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().cpu().contiguous()
    nz = (t != 0).reshape(-1)
    bits = np.packbits(nz.numpy())
    return {"shape": list(t.shape), "bits": torch.from_numpy(bits), "values": t.reshape(-1)[nz].clone()}


def _unpack(entry: dict[str, Any]) -> torch.Tensor:
    shape = [int(s) for s in entry["shape"]]
    n = int(np.prod(shape)) if shape else 1
    nz = torch.from_numpy(np.unpackbits(entry["bits"].numpy(), count=n).astype(bool))
    out = torch.zeros(n, dtype=entry["values"].dtype)
    out[nz] = entry["values"]
    return out.reshape(shape)


def save_pruned(model: nn.Module, config: dict[str, Any], path: str | os.PathLike, *,
                compact_input: torch.Tensor | None = None) -> Path:
    """Write ``model`` (masks baked in) sparsely, with the ``config`` needed to rebuild it.

    With ``compact_input`` (structured pruning) the physically smaller network of
    :func:`dtp_search.pruning.compact_model` is written instead; :func:`load_pruned`
    resizes the layers to the stored tensors.
    """
    plain = (strip_masks(model) if compact_input is None
             else compact_model(model, compact_input)).cpu()
    weights = {f"{name}.weight" for name, _ in prunable_layers(plain)}
    dense, sparse = {}, {}
    for key, t in plain.state_dict().items():
        if key in weights:
            sparse[key] = _pack(t)
        else:
            dense[key] = t.detach().cpu().clone()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "config": config, "dense": dense, "sparse": sparse}, path)
    return path


def load_pruned(source: str | os.PathLike, *, tracking_uri: str | None = None,
                map_location: str | torch.device = "cpu") -> nn.Module:
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


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def _layer_flops(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """FLOPs of every prunable layer's own forward (per sample batch ``x``)."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=name: inputs.__setitem__(n, inp[0]))
             for name, m in prunable_layers(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    layers = dict(prunable_layers(model))
    return {name: _flops(layers[name], inp) for name, inp in inputs.items()}


def _latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 20) -> float:
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


# Every metric measure() can return (the last three for neuron/channel exports only).
MEASURE_KEYS = ("params", "nonzero_params", "compression", "flops_dense", "flops_effective",
                "file_bytes_dense", "file_bytes_sparse", "compact_params", "latency_ms_dense",
                "latency_ms_compact")


def measure(model: nn.Module, example_input: torch.Tensor, export_path: str | os.PathLike,
            *, structured: bool = False) -> dict[str, float]:
    """Parameters, non-zeros, compression, FLOPs dense vs effective, file sizes, and (for
    structured pruning) CPU latency of the dense versus the compacted network.

    Effective FLOPs count a pruned layer at its weight density: total − Σ_l F_l·(1 − d_l),
    with F_l the layer's dense FLOPs from ``torch.utils.flop_counter.FlopCounterMode``.
    """
    plain = strip_masks(model).cpu().eval()
    x = example_input[:1].cpu()
    params = sum(p.numel() for p in plain.parameters())
    nonzero = sum(int((p != 0).sum()) for p in plain.parameters())
    dense_flops = _flops(plain, x)
    layers = dict(prunable_layers(plain))
    saved = sum(f * float((layers[name].weight == 0).float().mean())
                for name, f in _layer_flops(plain, x).items())
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    out = {
        "params": float(params), "nonzero_params": float(nonzero),
        "compression": params / max(nonzero, 1),
        "flops_dense": float(dense_flops), "flops_effective": float(round(dense_flops - saved)),
        "file_bytes_dense": float(buf.getbuffer().nbytes),
        "file_bytes_sparse": float(Path(export_path).stat().st_size),
    }
    if structured:
        compact = compact_model(model, example_input[:1]).cpu().eval()
        batch = example_input[:1].cpu().expand(64, *example_input.shape[1:]).contiguous()
        out["compact_params"] = float(sum(p.numel() for p in compact.parameters()))
        out["latency_ms_dense"] = _latency_ms(plain, batch)
        out["latency_ms_compact"] = _latency_ms(compact, batch)
    return out
