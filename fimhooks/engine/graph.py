"""Where Î₂ needs the network's curvature, read from the autograd graph (general path).

``∂²h/∂θᵢ² = 0`` for a parameter of a layer that is affine in its parameters when every
operation between the layer's output and the model output is piecewise linear in that
output: then Î₂ equals the exact diagonal and has no label noise (docs/math.md §3). This module
walks the graph from the model output down to each watched output and names the first
operation that breaks the condition. Products of two tensors that both depend on layer
outputs (attention scores, gates) count as curved.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

#: Operations (autograd node names without the trailing version digit) linear or piecewise
#: linear in each input.
_PIECEWISE_LINEAR = {
    "Relu", "LeakyRelu", "Threshold", "Hardtanh", "Prelu", "Rrelu", "Abs", "Clamp",
    "ClampMin", "ClampMax", "Maximum", "Minimum", "Max", "Min", "Amax", "Amin",
    "MaxPool1DWithIndices", "MaxPool2DWithIndices", "MaxPool3DWithIndices",
    "AvgPool2D", "AvgPool3D", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D",
    "View", "UnsafeView", "Reshape", "ReshapeAlias", "Expand", "Permute", "Transpose",
    "T", "Squeeze", "SqueezeDim", "SqueezeDims", "Unsqueeze", "Slice", "Select", "Index",
    "IndexSelect", "Gather", "Cat", "Stack", "Split", "SplitWithSizes", "Unbind", "Clone",
    "Add", "Sub", "Neg", "Sum", "Mean", "Flip", "Roll", "Repeat", "ConstantPadNd",
    "NativeDropout", "ToCopy", "Alias", "AsStrided", "Unfold", "Im2Col", "Col2Im",
    "BackwardHookFunction", "MaskedFill", "Where",
}  # fmt: skip
#: BatchNorm with the batch's statistics held constant (``batchnorm``): affine in its input.
_FROZEN_STATISTICS = "_FrozenStatistics"
#: Operations linear in each input separately: piecewise linear while at most one input
#: depends on a layer output.
_PRODUCTS = {
    "Mul",
    "Mm",
    "Bmm",
    "Addmm",
    "Addbmm",
    "Baddbmm",
    "Convolution",
    "Embedding",
    "Dot",
    "Mv",
}


def curved_layer(output_node, layer_nodes: Dict[object, str]) -> Optional[Tuple[str, str]]:
    """The first watched layer reached through a curved operation, or ``None``.

    Returns:
        ``(layer path, operation name)``.

    Args:
        output_node: ``grad_fn`` of the model output.
        layer_nodes: ``{grad_fn of a watched output: layer path}``.
    """
    depends = _DependsOnLayers(layer_nodes)
    stack, seen = [(output_node, None)], set()
    while stack:
        node, curved_by = stack.pop()
        if node is None or (node, curved_by) in seen:
            continue
        seen.add((node, curved_by))
        if curved_by is not None and node in layer_nodes:
            return layer_nodes[node], curved_by
        name = _op_name(node)
        if name == _FROZEN_STATISTICS:  # the monitor's backward takes its input branch only
            stack.append((node.next_functions[0][0], curved_by))
            continue
        if curved_by is None and not _piecewise_linear(node, name, depends):
            curved_by = name
        stack.extend((child, curved_by) for child, _ in node.next_functions)
    return None


def _piecewise_linear(node, name: str, depends) -> bool:
    if name in _PIECEWISE_LINEAR or name == "AccumulateGrad":
        return True
    if name == "NativeBatchNorm":  # affine in its input in eval mode (running statistics)
        return not node._saved_training
    if name == "Div":  # linear in the numerator only
        children = [c for c, _ in node.next_functions]
        return len(children) < 2 or not depends(children[1])
    if name in _PRODUCTS:
        return sum(depends(c) for c, _ in node.next_functions) <= 1
    return False


class _DependsOnLayers:
    """Whether a node's value depends on a watched layer output (memoised)."""

    def __init__(self, layer_nodes: Iterable):
        self._known = {node: True for node in layer_nodes}

    def __call__(self, node) -> bool:
        if node is None:
            return False
        stack = [node]
        while stack:
            top = stack[-1]
            if top in self._known:
                stack.pop()
                continue
            pending = [c for c, _ in top.next_functions if c is not None and c not in self._known]
            if pending:
                stack.extend(pending)
                continue
            self._known[top] = any(self._known.get(c, False) for c, _ in top.next_functions)
            stack.pop()
        return self._known[node]


def _op_name(node) -> str:
    name = type(node).__name__
    if name.endswith("Backward") or name[-1].isdigit():
        name = name.rstrip("0123456789")
    return name[: -len("Backward")] if name.endswith("Backward") else name


#: Operations that only reshape a value (on the way from a shared value to its sum).
_RESHAPES = {"Unsqueeze", "View", "UnsafeView", "Reshape", "ReshapeAlias", "Expand"}


def broadcast_sums(output_node, nodes: Iterable, num_inputs: int) -> Dict[object, tuple]:
    """For each of ``nodes``, the addition that broadcasts its value over the batch.

    A value shared by all inputs (position embeddings computed once, ``[T, d]`` or
    ``[1, T, d]``) that is added to a per-input tensor has, per input, the gradient of the
    sum. Returns ``{node: (the sum's node, the sum's shape)}`` where the node's value
    reaches one addition through reshapes only, the sum has ``num_inputs`` rows, and one
    row holds as many entries as the value.
    """
    wanted, consumers, seen, stack = set(nodes), {}, set(), [output_node]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                consumers.setdefault(child, []).append(node)
            stack.append(child)
    found = {}
    for node in wanted:
        user = node
        while len(consumers.get(user, ())) == 1:
            user = consumers[user][0]
            if _op_name(user) not in _RESHAPES:
                break
        if user is node or _op_name(user) != "Add" or getattr(user, "_saved_alpha", 1) != 1:
            continue
        shape = tuple(user._input_metadata[0].shape)
        if len(shape) and shape[0] == num_inputs:
            found[node] = (user, shape)
    return found


def reentrant_checkpoint(output_node) -> bool:
    """Whether ``torch.utils.checkpoint(..., use_reentrant=True)`` ran in the graph.

    Its layers run without gradient in the forward pass and are differentiated by a
    backward pass of their own, which neither the monitor's backward passes nor
    ``torch.autograd.grad`` reach.
    """
    stack, seen = [output_node], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False
