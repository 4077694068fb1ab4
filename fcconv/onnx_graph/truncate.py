"""Cutting the input model before its conversion (``--logits``, ``--until``), so that the conversion and its
verification start from the cut model."""

from __future__ import annotations

import onnx
from onnx import helper

from fcconv.errors import BadInputError
from fcconv.onnx_graph.classifier import OnnxClassifier
from fcconv.onnx_graph.collapse import _Analysis, _analyze
from fcconv.onnx_graph.graph import _Graph, _sub_model, _value_info
from fcconv.onnx_head import label as _label

_FINAL_ACTIVATIONS = ("Softmax", "LogSoftmax", "Sigmoid")  # what --logits drops from the end of an output


def _until_names(analysis: _Analysis) -> dict[str, str]:
    """What ``--until`` accepts, each with the tensor it cuts at: a head node's name and the tensor it computes."""
    graph, names = analysis.graph, {}
    for node in analysis.head.nodes:
        output = node.output[0] if node.output else ""
        if not output or not graph.is_float(output) or len(graph.shapes.get(output) or ()) != 2:
            continue
        if node.name:
            names[node.name] = output
        names[output] = output
    return names


def truncate_onnx_classifier(
    classifier: OnnxClassifier, *, logits: bool = False, until: str | None = None
) -> OnnxClassifier:
    """``classifier`` cut before its conversion, so that the verification compares with the cut model.

    ``until`` (a head node's name, or a tensor it computes) ends the model at that
    tensor, its one output; ``logits`` drops the Softmax, LogSoftmax or Sigmoid that
    ends an output (each output that has one), leaving the raw scores under the
    output's name. Raises :class:`BadInputError` for a name that is not in the head,
    or ``logits`` on a model none of whose outputs ends in one of those.
    """
    if not logits and until is None:
        return classifier
    model = classifier.model
    if until is not None:
        analysis = _analyze(classifier)
        accepted = _until_names(analysis)
        if until not in accepted:
            shown = ", ".join(accepted) or "none"
            raise BadInputError(f"--until {until}: not a node or tensor of the head; it accepts {shown}")
        model = _cut_at(classifier, analysis.graph, accepted[until])
    if logits:
        model = _without_final_activations(model)
    return OnnxClassifier(
        model, classifier.path, classifier.input_name, classifier.input_shape, classifier.batch,
        classifier.elem_type, classifier.layout, logits=logits, until=until,
    )  # fmt: skip


def _cut_at(classifier: OnnxClassifier, graph: _Graph, tensor: str) -> onnx.ModelProto:
    """The input model ending at ``tensor``: the nodes it is computed from, with ``tensor`` the one output."""
    source = classifier.model
    needed, kept = {tensor}, []
    for node in reversed(graph.nodes):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(n for n in node.input if n)
    graph_input = next(i for i in source.graph.input if i.name == classifier.input_name)
    batch = "batch" if classifier.batch is None else classifier.batch
    output = _value_info(tensor, graph.types[tensor], [batch, graph.shape(tensor)[1]])
    cut = _sub_model(source, kept[::-1], {}, [graph_input], [output])
    cut.producer_name, cut.producer_version = source.producer_name, source.producer_version
    cut.metadata_props.extend(source.metadata_props)
    return cut


def _without_final_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the Softmax, LogSoftmax or Sigmoid that ends each output replaced by an Identity."""
    producer = {o: node for node in model.graph.node for o in node.output if o}
    ends = {}
    for output in model.graph.output:
        node = producer.get(output.name)
        ends[output.name] = node
    if not any(node is not None and node.op_type in _FINAL_ACTIVATIONS for node in ends.values()):
        shown = "; ".join(
            f"{name} ends in {_label(node) if node is not None else 'the input'}" for name, node in ends.items()
        )
        raise BadInputError(
            f"--logits: no output ends in a {', '.join(_FINAL_ACTIVATIONS[:-1])} or {_FINAL_ACTIVATIONS[-1]} "
            f"({shown}); its scores are raw already"
        )
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, node in enumerate(copy.graph.node):
        if node.op_type in _FINAL_ACTIVATIONS and node.output[0] in ends:
            identity = helper.make_node(
                "Identity", [node.input[0]], [node.output[0]], name=f"{node.name or node.output[0]}/fcconv_logits"
            )
            copy.graph.node[index].CopyFrom(identity)
    return copy
