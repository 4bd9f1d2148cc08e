"""IR glue: load ONNX files into onnx-ir safely and write them back atomically.

Loading never trusts the file: it must parse, pass the ONNX checker, and every
external-data reference must stay inside the model's folder and fit inside the
file it names. Writing goes to a temporary file in the destination folder and is
renamed into place, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from compressor.errors import ModelError
from compressor.files import atomic_write_bytes

# Protobuf cannot serialise a message larger than 2 GiB; bigger models keep
# their weights in a side file.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
# Leave head-room for the graph itself when deciding to go external.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


def load_model(path: str | os.PathLike, *, check: bool = True) -> ir.Model:
    """Load and validate an ONNX file into an `onnx_ir.Model`.

    Raises `ModelError` with a one-line message when the file is missing,
    empty, not ONNX, invalid, or references external data outside its folder.
    ``check=False`` skips the ONNX checker, for a file already checked in this run.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}; check the path")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}; pass the .onnx file itself")
    if path.stat().st_size == 0:
        raise ModelError(f"model file is empty: {path}; re-export the model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise ModelError(
            f"{path} is not a valid ONNX file (protobuf parse failed: {_first_line(exc)}); "
            "re-export the model or check that the download is complete"
        ) from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelError(f"{path} parsed but holds no graph; it is probably not an ONNX model")
    _check_external_data(proto, path.parent)
    if check:
        _check(path)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    return model


def _check(path: Path) -> None:
    try:
        # A path, not the proto: external data then resolves against the model's folder, not the cwd.
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{path} fails the ONNX checker: {_first_line(exc)}; re-export the model") from None


def _check_external_data(proto: onnx.ModelProto, model_dir: Path) -> None:
    """Refuse external-data references that escape the model folder or overrun their file."""
    root = model_dir.resolve()
    for tensor in _all_initializers(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (root / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(root):
            raise ModelError(
                f"initializer '{tensor.name}' points to external data outside the model folder "
                f"({location!r}); move the data file next to the model and re-save it"
            )
        if not target.is_file():
            raise ModelError(
                f"external data file for initializer '{tensor.name}' is missing: {target}; copy it next to the model"
            )
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > target.stat().st_size:
            raise ModelError(
                f"external data for initializer '{tensor.name}' runs past the end of {target.name}; "
                "the data file is truncated, re-copy it"
            )


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _all_initializers(sub)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


class UniqueNames:
    """The value names a graph uses, to mint fresh ones without rescanning the graph each time.

    Names minted here are recorded; values added to the graph by other means
    after construction are not seen, so make one per rewrite.
    """

    __slots__ = ("_taken",)

    def __init__(self, graph: ir.Graph) -> None:
        self._taken = {v.name for v in ir.convenience.create_value_mapping(graph).values()} | set(graph.initializers)

    def fresh(self, name: str) -> str:
        """``name``, or ``name_1``, ``name_2``... whichever is free first; it is taken from now on."""
        unique, counter = name, 1
        while unique in self._taken:
            unique, counter = f"{name}_{counter}", counter + 1
        self._taken.add(unique)
        return unique


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray, names: UniqueNames | None = None) -> ir.Value:
    """Register ``array`` as a new initializer named ``name``, suffixed until unique in the graph.

    Pass the rewrite's ``names`` when adding many: building it scans the graph.
    """
    unique = (names or UniqueNames(graph)).fresh(name)
    value = ir.Value(name=unique, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    value.const_value = ir.Tensor(array, name=unique)  # not ir.tensor: its protocol checks cost 30 µs a call
    graph.register_initializer(value)
    return value


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """``value``'s data when it is a constant (an initializer or a Constant's output), else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def weight_bytes(model: ir.Model) -> int:
    """Total bytes held by the main graph's initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def file_bytes(path: str | os.PathLike, model: ir.Model) -> int:
    """Bytes on disk of the ONNX file ``path`` (loaded as ``model``) and of the external-data files it references."""
    files = {Path(path)}
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            files.add(Path(value.const_value.path))
    return sum(file.stat().st_size for file in files)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialise to a self-contained `ModelProto`, reading external weights into memory."""
    if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES:
        raise ModelError("model is larger than 2 GB and cannot be held in one protobuf; save it to a file instead")
    proto = ir.to_proto(model)
    for index, tensor in enumerate(proto.graph.initializer):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            array = model.graph.initializers[tensor.name].const_value.numpy()
            proto.graph.initializer[index].CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    return proto


def to_bytes(model: ir.Model) -> bytes:
    """Serialise to bytes for an onnxruntime session."""
    return to_proto(model).SerializeToString()


def save_model(model: ir.Model | onnx.ModelProto, path: str | os.PathLike, *, force: bool = False) -> list[Path]:
    """Write a model atomically and return the files written.

    Models whose weights exceed ~1.8 GB are saved with their weights in
    ``<name>.data`` beside the ONNX file. Refuses to overwrite an existing file
    unless ``force`` is set.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ModelError(f"output folder does not exist: {path.parent}; create it first")
    if path.exists() and not force:
        raise ModelError(f"output file already exists: {path}; pass --force to overwrite it")
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() <= EXTERNAL_DATA_THRESHOLD_BYTES:
            return [atomic_write_bytes(path, model.SerializeToString())]  # as given: the IR would add value_info back
        model = ir.serde.deserialize_model(model)
    external = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
    data_name = path.name + ".data"
    if not external:
        return [atomic_write_bytes(path, to_bytes(model))]
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".compressor-") as tmp:
        tmp_model = Path(tmp) / path.name
        ir.save(model, tmp_model, external_data=data_name)
        # The data file goes first so the model never points at missing weights.
        os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    return [path.parent / data_name, path]
