"""Rewrite the fully connected head of a classifier exported to ONNX as convolutions, on the ONNX graph.

A classifier someone else exported (``torch.onnx`` with either exporter, or a graph
written by other tools) has a fixed input size and collapses its feature map with a
Flatten or Reshape before Gemm or MatMul(+Add) layers. Here the graph itself is
rewritten, with onnx's own tools:

* the *chain* between the last N×C×H×W feature map and the collapse (Transpose,
  Reshape, Flatten, element-wise layers, a global pooling) is read exactly: the
  order in which it lays the map's elements out is found by passing an index array
  through it, so an NHWC flatten (a Transpose(0, 2, 3, 1) first, as Keras and
  TensorFlow exports have), a (W, H, C) flatten or a channel shuffle all give the
  first kernel in the right order, and the layout nodes disappear;
* the first Gemm or MatMul after the collapse becomes a k×k Conv whose kernel is
  its weight in that order (``transB`` and MatMul's (in, out) order honoured),
  every later one a 1×1 Conv, a MatMul's following Add its bias;
* the nodes between them that act on each feature (activations, Dropout,
  per-feature constants, BatchNormalization, PRelu, LayerNormalization over the
  features, softmax over the class axis) act on each position of the map;
* a global pooling before the collapse stays, so the output is N×K×1×1 at any size,
  unless ``dense`` drops it: each position of the map then feeds the head, and the
  output is the per-position score map;
* ``pool`` ends each output with a global pooling of its score map and a Flatten,
  so that it is (N, K) at any size (test-time pooling), channels-last input or not;
* the trunk's shape-dependent Reshapes are made size-free (their target computed from
  the input's shape) where that is exact;
* a channels-last input (N×H×W×C with a Transpose to N×C×H×W inside, as keras2onnx
  and tf2onnx write) stays channels-last, and each output ends with a Transpose to
  (N, h, w, K), as a natively fully convolutional NHWC model answers;
* several outputs that branch off the same head (class scores beside box
  regression) are each converted, in their order and with their names.

:func:`truncate_onnx_classifier` cuts the input model first where asked (``--logits``,
``--until``), so that the conversion and its verification start from the cut model.

Anything else raises :class:`NotConvertibleError` naming the node and its op.
The results are plain dataclasses; :mod:`fcconv.onnx_verify` checks them.
"""

from fcconv.files import is_onnx_file
from fcconv.onnx_graph.assemble import write_onnx
from fcconv.onnx_graph.classifier import (
    LAYOUTS,
    MAP_AXES,
    SCORE_AXES,
    OnnxClassifier,
    OnnxConversion,
    OnnxOutput,
    load_onnx_classifier,
)
from fcconv.onnx_graph.rewrite import rewrite_onnx
from fcconv.onnx_graph.truncate import truncate_onnx_classifier

__all__ = [
    "LAYOUTS",
    "MAP_AXES",
    "SCORE_AXES",
    "OnnxClassifier",
    "OnnxConversion",
    "OnnxOutput",
    "is_onnx_file",
    "load_onnx_classifier",
    "rewrite_onnx",
    "truncate_onnx_classifier",
    "write_onnx",
]
