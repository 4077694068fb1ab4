"""The classifier head, in terms neither torch.fx nor ONNX: one vocabulary of head operations and one interpreter
that decides how each carries over to every position of a feature map. Both front ends map their nodes to it."""
