"""Torch handlers for ONNX's shape, data-movement and reduction ops; they register into `compressor.torch_ops`."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import reduce

import torch
import torch.nn.functional as F

from compressor.torch_ops import CHECKS, Call, Result, Tensor, _axes, _torch_pads, axis_of, ints, op

# --- shapes and data movement -------------------------------------------------------------------


@op("Flatten")
def _flatten(inputs: list[Tensor | None], call: Call) -> Tensor:
    x = inputs[0]
    axis = axis_of(call.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Reshape")
def _reshape(inputs: list[Tensor | None], call: Call) -> Tensor:
    x = inputs[0]
    shape = ints(inputs[1]) if call.opset >= 5 else list(call.get("shape"))
    if not call.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@op("Transpose")
def _transpose(inputs: list[Tensor | None], call: Call) -> Tensor:
    x = inputs[0]
    return x.permute(call.get("perm", list(range(x.dim() - 1, -1, -1))))


@op("Concat")
def _concat(inputs: list[Tensor | None], call: Call) -> Tensor:
    return torch.cat([t for t in inputs if t is not None], call.get("axis"))


@op("Split")
def _split(inputs: list[Tensor | None], call: Call) -> Result:
    x = inputs[0]
    axis = axis_of(call.get("axis", 0), x.dim())
    sizes = ints(inputs[1]) if call.opset >= 13 and len(inputs) > 1 and inputs[1] is not None else call.get("split")
    if not sizes:
        parts = call.get("num_outputs", call.n_outputs)
        chunk = math.ceil(x.shape[axis] / parts)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    return torch.split(x, list(sizes), axis)


@op("Slice")
def _slice(inputs: list[Tensor | None], call: Call) -> Tensor:
    x = inputs[0]
    if call.opset < 10:
        starts, ends, axes, steps = list(call.get("starts")), list(call.get("ends")), call.get("axes"), None
    else:
        starts, ends = ints(inputs[1]), ints(inputs[2])
        axes = ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
        steps = ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else None
    axes = list(range(len(starts))) if axes is None else [axis_of(a, x.dim()) for a in axes]
    index: list[slice] = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps or [1] * len(starts), strict=True):
        dim = x.shape[axis]
        start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
        if step > 0:
            index[axis] = slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
        else:  # torch has no negative steps: flip, then slice forwards
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            index[axis] = slice(dim - 1 - start, dim - 1 - end, -step) if start > end else slice(0, 0)
            flips.append(axis)
    if flips:
        x = x.flip(flips)
    return x[tuple(index)]


@op("Squeeze")
def _squeeze(inputs: list[Tensor | None], call: Call) -> Tensor:
    x, axes = inputs[0], _axes(inputs, call, 1, 13)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(axis_of(a, x.dim()) for a in axes)) if axes else x


@op("Unsqueeze")
def _unsqueeze(inputs: list[Tensor | None], call: Call) -> Tensor:
    x, axes = inputs[0], _axes(inputs, call, 1, 13) or []
    rank = x.dim() + len(axes)
    for axis in sorted(axis_of(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return x


@op("Shape")
def _shape(inputs: list[Tensor | None], call: Call) -> Tensor:
    x = inputs[0]
    dims = list(x.shape)[call.get("start", 0) : call.get("end", x.dim())]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


@op("Size")
def _size(inputs: list[Tensor | None], call: Call) -> Tensor:
    return torch.tensor(inputs[0].numel(), dtype=torch.int64, device=inputs[0].device)


@op("Gather")
def _gather(inputs: list[Tensor | None], call: Call) -> Tensor:
    x, indices = inputs[0], inputs[1].long()
    axis = axis_of(call.get("axis", 0), x.dim())
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    picked = x.index_select(axis, indices.reshape(-1))
    return picked.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :]))


@op("GatherElements")
def _gather_elements(inputs: list[Tensor | None], call: Call) -> Tensor:
    x, indices = inputs[0], inputs[1].long()
    axis = axis_of(call.get("axis", 0), x.dim())
    return torch.gather(x, axis, torch.where(indices < 0, indices + x.shape[axis], indices))


@op("Tile")
def _tile(inputs: list[Tensor | None], call: Call) -> Tensor:
    return inputs[0].repeat(ints(inputs[1]))


@op("Expand")
def _expand(inputs: list[Tensor | None], call: Call) -> Tensor:
    x = inputs[0]
    return x.expand(torch.broadcast_shapes(x.shape, tuple(ints(inputs[1]))))


@op("ConstantOfShape")
def _constant_of_shape(inputs: list[Tensor | None], call: Call) -> Tensor:
    value = call.get("value")
    fill = torch.zeros((), dtype=torch.float32) if value is None else value.reshape(())
    return torch.full(ints(inputs[0]), fill.item(), dtype=fill.dtype, device=inputs[0].device)


@op("Range")
def _range(inputs: list[Tensor | None], call: Call) -> Tensor:
    start, limit, delta = inputs[0], inputs[1], inputs[2]
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


@op("Pad")
def _pad(inputs: list[Tensor | None], call: Call) -> Tensor:
    x, mode = inputs[0], call.get("mode", "constant")
    if call.opset < 11:
        pads, value = list(call.get("pads")), call.get("value", 0.0)
    else:
        pads = ints(inputs[1])
        value = inputs[2].item() if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel() else 0
    axes = ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(x.dim()))
    begin, end = [0] * x.dim(), [0] * x.dim()
    for i, axis in enumerate(axis_of(a, x.dim()) for a in axes):
        begin[axis], end[axis] = pads[i], pads[len(axes) + i]
    if mode == "constant":
        return F.pad(x, _torch_pads(begin, end), value=value)
    first = next((i for i in range(x.dim()) if begin[i] or end[i]), x.dim())
    kept = x.shape[:first]  # F.pad's reflect/replicate/circular pad the last 1-3 dims of a batch
    y = x.reshape(1, math.prod(kept), *x.shape[first:])
    y = F.pad(y, _torch_pads(begin[first:], end[first:]), mode=_PAD_MODES[mode])
    return y.reshape(*kept, *y.shape[2:])


_PAD_MODES = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}
CHECKS["Pad"] = lambda call: None if call.get("mode", "constant") in {"constant", *_PAD_MODES} else "this mode"


def _source_coordinates(out: int, size: int, scale: float, mode: str, device: torch.device) -> Tensor:
    x = torch.arange(out, dtype=torch.float64, device=device)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out > 1 else torch.zeros_like(x)
    if mode == "align_corners":
        return x * (size - 1) / (out - 1) if out > 1 else torch.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nearest":
        return (x + 0.5) / scale
    if mode == "half_pixel_symmetric":
        return size / 2 * (1 - out / (scale * size)) + (x + 0.5) / scale - 0.5
    raise ValueError(f"coordinate_transformation_mode {mode!r} is not supported")


_NEAREST = {
    "round_prefer_floor": lambda x: torch.ceil(x - 0.5),
    "round_prefer_ceil": lambda x: torch.floor(x + 0.5),
    "floor": torch.floor,
    "ceil": torch.ceil,
}


@op("Resize", "Upsample")
def _resize(inputs: list[Tensor | None], call: Call) -> Tensor:
    x = inputs[0]
    if call.op_type == "Upsample" or call.opset < 11:
        scales = list(call.get("scales")) if call.get("scales") is not None else inputs[1].reshape(-1).tolist()
        sizes, coordinates, nearest = None, "asymmetric", "floor"
    else:
        given = [inputs[i] if len(inputs) > i and inputs[i] is not None and inputs[i].numel() else None for i in (2, 3)]
        scales = None if given[0] is None else given[0].reshape(-1).tolist()
        sizes = None if given[1] is None else ints(given[1])
        coordinates = call.get("coordinate_transformation_mode", "half_pixel")
        nearest = call.get("nearest_mode", "round_prefer_floor")
    axes = [axis_of(a, x.dim()) for a in call.get("axes", range(x.dim()))]
    mode = call.get("mode", "nearest")
    for i, axis in enumerate(axes):
        size = x.shape[axis]
        out = sizes[i] if sizes is not None else math.floor(size * scales[i])
        scale = out / size if sizes is not None else scales[i]
        if out == size and scale == 1.0:
            continue
        source = _source_coordinates(out, size, scale, coordinates, x.device)
        if mode == "nearest":
            index = _NEAREST[nearest](source).clamp(0, size - 1).long()
            x = x.index_select(axis, index)
            continue
        source = source.clamp(0, size - 1)
        low = source.floor().long()
        high = (low + 1).clamp(max=size - 1)
        shape = [1] * x.dim()
        shape[axis] = out
        weight = (source - low).to(x.dtype).reshape(shape)
        x = x.index_select(axis, low) * (1 - weight) + x.index_select(axis, high) * weight
    return x


def _check_resize(call: Call) -> str | None:
    mode = call.get("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear"):
        return f"mode={mode}"
    if call.get("coordinate_transformation_mode") == "tf_crop_and_resize":
        return "coordinate_transformation_mode=tf_crop_and_resize"
    if call.get("antialias", 0):
        return "antialias=1"
    if call.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return f"keep_aspect_ratio_policy={call.get('keep_aspect_ratio_policy')}"
    return None


CHECKS["Resize"] = CHECKS["Upsample"] = _check_resize


# --- reductions -----------------------------------------------------------------------------------

_REDUCE: dict[str, Callable[[Tensor, list[int], bool], Tensor]] = {
    "ReduceMean": lambda x, d, k: x.mean(d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(d, keepdim=k),
    "ReduceProd": lambda x, d, k: reduce(lambda t, a: t.prod(a, keepdim=True), d, x) if k else x.prod(),
    "ReduceL2": lambda x, d, k: (x * x).sum(d, keepdim=k).sqrt(),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}
_AXES_INPUT_SINCE = {"ReduceSum": 13}  # the others take axes as an input from opset 18


@op(*_REDUCE)
def _reduce(inputs: list[Tensor | None], call: Call) -> Tensor:
    x, name = inputs[0], call.op_type
    axes = _axes(inputs, call, 1, _AXES_INPUT_SINCE.get(name, 18))
    if not axes:
        if axes is not None and call.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    keep = bool(call.get("keepdims", 1))
    axes = sorted(axis_of(a, x.dim()) for a in axes)
    if name == "ReduceProd" and not keep:
        return reduce(lambda t, a: t.prod(a), reversed(axes), x)
    return _REDUCE[name](x, axes, keep)


@op("ArgMax", "ArgMin")
def _arg(inputs: list[Tensor | None], call: Call) -> Tensor:
    x, axis, keep = inputs[0], call.get("axis", 0), bool(call.get("keepdims", 1))
    if call.get("select_last_index", 0):
        flipped = x.flip(axis)
        found = (flipped.argmax if call.op_type == "ArgMax" else flipped.argmin)(axis, keepdim=keep)
        return x.shape[axis] - 1 - found
    return (x.argmax if call.op_type == "ArgMax" else x.argmin)(axis, keepdim=keep)


@op("NonZero")
def _non_zero(inputs: list[Tensor | None], call: Call) -> Tensor:
    return torch.nonzero(inputs[0]).t()
