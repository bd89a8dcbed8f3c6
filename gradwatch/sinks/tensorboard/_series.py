"""Per-layer and per-block values as one tensor per metric and step, not one scalar tag per layer.

A scalar tag per layer and metric made ~640 cards for a ResNet-56 and ~3,000 for a 70B model: TensorBoard's
Time Series paginates them alphabetically and slows down, and the health cards drown. The values still
belong in the event file (``gradwatch report``, the Parquet table read them back), so each step writes,
per metric, a float32 vector ``<group>/series/<metric>`` and, beside it, the names it is aligned with
(``<group>/series/_names``, and the layers' kinds, ``<group>/series/_kinds``) as string tensors. They carry
the plugin name :data:`PLUGIN`, which no TensorBoard dashboard lists. Names are written at every step (a few
KB): a reader needs no state, and a run whose blocks change (found late, or a merge that disappears) reads
right at every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

__all__ = ["PLUGIN", "values", "strings", "decode"]

#: The plugin name of the series tensors: no TensorBoard dashboard shows it.
PLUGIN = "gradwatch_series"
_META = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN))


def _shape(n: int) -> TensorShapeProto:
    return TensorShapeProto(dim=[TensorShapeProto.Dim(size=n)])


def values(tag: str, data: np.ndarray) -> Summary.Value:
    """``data`` (one value per name) as a float32 tensor value of ``tag``."""
    arr = np.asarray(data, dtype="<f4")
    tensor = TensorProto(dtype=1, tensor_shape=_shape(arr.size), tensor_content=arr.tobytes())  # 1: DT_FLOAT
    return Summary.Value(tag=tag, tensor=tensor, metadata=_META)


def strings(tag: str, items: Sequence[str]) -> Summary.Value:
    """``items`` as a string tensor value of ``tag``."""
    tensor = TensorProto(dtype=7, tensor_shape=_shape(len(items)),  # 7: DT_STRING
                         string_val=[s.encode("utf-8") for s in items])
    return Summary.Value(tag=tag, tensor=tensor, metadata=_META)


def decode(tensor: TensorProto) -> np.ndarray | list[str]:
    """A series tensor read back: a float64 array, or the list of strings."""
    if tensor.dtype == 7:
        return [s.decode("utf-8") for s in tensor.string_val]
    if tensor.tensor_content:
        return np.frombuffer(tensor.tensor_content, dtype="<f4").astype(np.float64)
    return np.asarray(tensor.float_val, dtype=np.float64)
