"""Rewrite a Q/DQ ONNX model so ONNX Runtime's CPU optimizer finds INT8 kernels for it.

ONNX Runtime replaces ``DequantizeLinear -> op -> QuantizeLinear`` with an INT8 kernel
(``QLinearConv``, ``QLinearAdd``, ...) and otherwise runs the op in float between the Q/DQ:
slower than FP32. A Paddle QAT export, even with ``QATConfig(target="onnxruntime")``, keeps
it from matching in six places, each rewritten here without changing what is computed
(beyond rounding biases to int32, as every INT8 runtime does):

1. ``Conv -> BatchNormalization``: the norm is folded into the conv. The int8 weight stays as
   trained; its per-channel DequantizeLinear scale is multiplied by ``gamma / sigma`` (a
   negative factor flips the sign of that channel's int8 values instead, or, where a value
   is -128, stays in the scale: ONNX Runtime's QLinearConv computes it exactly) and the
   norm's shift becomes the conv bias.
2. A float conv or fully-connected bias: ``QLinearConv`` and ``QGemm`` take an int32 bias in
   units of input scale x weight scale, so the bias is given as such (rounded to half such a
   unit). A conv channel whose bias would overflow int32 (gamma near 0) gets a coarser
   weight scale, see :func:`_fit_bias`.
3. ``op -> QuantizeLinear`` where ``op`` is MaxPool or a data-movement op (quantization
   commutes with them exactly; a Split when every output has such a quantizer, as in
   ShuffleNetV2's channel shuffle) and the quantizer is the op's only reader: the same Q/DQ is
   put on the op's input too, so the op before it ends in a quantizer and ONNX Runtime moves
   the op itself to INT8.
4. ``Relu -> QuantizeLinear`` with zero point 0 (an unsigned quantizer): the quantizer's
   saturation at 0 is the ReLU, so it reads the ReLU's input and the ReLU goes (ONNX Runtime
   would otherwise fuse Conv + Relu into a float ``FusedConv`` first).
5. Quantizers of one tensor with one scale and zero point become one, and a ``Shape`` that
   reads a quantized tensor reads its dequantized copy (same shape), so the op that made the
   tensor has the quantizer as its only reader, as the fusions require.
6. ``Mul(positive scalar) -> QuantizeLinear``: the factor moves into the quantizer's scale
   (see :func:`fold_scalar_muls_into_quantizers`), so the op before the Mul ends in the
   quantizer.

Example::

    model = prepare_for_onnxruntime(onnx.load("qat.onnx"))
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..errors import QATError
from .qdq_insert import sort_nodes

# Ops Q(op(x)) == Q(op(DQ(Q(x)))) holds for: monotone selections and pure data movement.
COMMUTING_OPS = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                           "Split"})


class _Graph:
    def __init__(self, model):
        from onnx import numpy_helper

        self.model, self.graph, self.numpy_helper = model, model.graph, numpy_helper
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.refresh()

    def refresh(self):
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                self.consumers[name].append(node)

    def value(self, name: str) -> np.ndarray:
        if name in self.initializers:
            return self.numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return self.numpy_helper.to_array(node.attribute[0].t)
        raise QATError(f"{name!r} is not a constant in the ONNX graph")

    def is_constant(self, name: str) -> bool:
        node = self.producer.get(name)
        return name in self.initializers or (node is not None and node.op_type == "Constant")

    def set_initializer(self, name: str, value: np.ndarray) -> str:
        tensor = self.numpy_helper.from_array(value, name)
        if name in self.initializers:
            self.initializers[name].CopyFrom(tensor)
        else:
            self.graph.initializer.append(tensor)
            self.initializers[name] = self.graph.initializer[-1]
        return name

    def dequantizer(self, name: str):
        """The DequantizeLinear producing ``name`` with constant int input, or None."""
        node = self.producer.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        return node if all(self.is_constant(i) for i in node.input[1:]) else None


def _weight_dequantizer(g: _Graph, conv):
    dq = g.dequantizer(conv.input[1])
    if dq is None or not g.is_constant(dq.input[0]) or len(g.consumers[conv.input[1]]) != 1:
        return None
    return dq


def _per_channel(g: _Graph, dq, channels: int) -> np.ndarray:
    scale = g.value(dq.input[1]).astype(np.float32).reshape(-1)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if scale.size == 1:
        return np.full(channels, scale[0], np.float32)
    if axis != 0 or scale.size != channels:
        raise QATError(f"{dq.name}: weight scale is not per output channel (axis {axis})")
    return scale


def _set_weight_scale(g: _Graph, dq, scale: np.ndarray) -> None:
    from onnx import helper

    g.set_initializer(dq.input[1], scale.astype(np.float32))
    zero = g.value(dq.input[2]) if len(dq.input) > 2 else np.zeros((), np.int8)
    g.set_initializer(dq.input[2] if len(dq.input) > 2 else f"{dq.name}.zero_point",
                      np.zeros(scale.shape, zero.dtype))
    if len(dq.input) < 3:
        dq.input.append(f"{dq.name}.zero_point")
    kept = [a for a in dq.attribute if a.name != "axis"]
    del dq.attribute[:]
    dq.attribute.extend(kept + [helper.make_attribute("axis", 0)])


def fold_batch_norms(model) -> int:
    """Fold every ``BatchNormalization`` that is a Q/DQ conv's only reader into that conv;
    returns how many were folded."""
    g = _Graph(model)
    folded = 0
    for conv in [n for n in g.graph.node if n.op_type == "Conv"]:
        readers = g.consumers[conv.output[0]]
        dq = _weight_dequantizer(g, conv)
        if dq is None or len(readers) != 1 or readers[0].op_type != "BatchNormalization":
            continue
        norm = readers[0]
        eps = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (g.value(n).astype(np.float64) for n in norm.input[1:5])
        factor = gamma / np.sqrt(var + eps)
        weight = g.value(dq.input[0])
        # A negative factor flips the channel's int8 values, unless one of them is the
        # type's minimum (no positive counterpart): that channel keeps a negative scale.
        holds_min = np.any(weight.reshape(len(factor), -1) == np.iinfo(weight.dtype).min, 1)
        flip = np.where((factor < 0) & ~holds_min, -1, 1)
        g.set_initializer(dq.input[0], (weight * flip.reshape(-1, *[1] * (weight.ndim - 1))
                                        ).astype(weight.dtype))
        _set_weight_scale(g, dq, _per_channel(g, dq, len(factor)) * factor * flip)
        bias = g.value(conv.input[2]).astype(np.float64) if len(conv.input) > 2 else 0.0
        shift = (beta + (bias - mean) * factor).astype(np.float32)
        bias_name = g.set_initializer(f"{conv.name}.folded_bias", shift)
        del conv.input[2:]
        conv.input.append(bias_name)
        conv.output[0] = norm.output[0]
        g.graph.node.remove(norm)
        g.refresh()
        folded += 1
    return folded


# A bias in int32 units of input scale x weight scale must stay below this.
_BIAS_LIMIT = 2.0 ** 30


def _fit_bias(g: _Graph, weight_dq, bias: np.ndarray, input_scale: float) -> None:
    """Raise the weight scale of channels whose bias would overflow int32 (a folded norm with
    gamma near 0 makes the scale tiny, and the channel is then its bias), re-rounding their
    int8 weights to the coarser scale. Their weights' share of the output changes by at most
    ``|bias| * fan_in * 255 / 2**31`` (3e-4 of the bias for a 3x3x256 conv); channels that
    fit are untouched. ONNX Runtime's own quantizer adjusts such scales the same way."""
    scale = _per_channel(g, weight_dq, bias.size).astype(np.float64)
    needed = np.abs(bias) / (abs(input_scale) * _BIAS_LIMIT)
    small = np.abs(scale) < needed
    if not np.any(small):
        return
    new = np.where(small, np.sign(scale) * needed, scale)
    weight = g.value(weight_dq.input[0])
    ratio = (scale / new).reshape(-1, *[1] * (weight.ndim - 1))
    g.set_initializer(weight_dq.input[0], np.round(weight * ratio).astype(weight.dtype))
    _set_weight_scale(g, weight_dq, new.astype(np.float32))


def quantize_conv_biases(model) -> int:
    """Give every Q/DQ conv's float bias as int32 + DequantizeLinear (scale: input scale x
    weight scale per channel), the form ONNX Runtime's QLinearConv fusion needs."""
    g = _Graph(model)
    changed = 0
    for conv in [n for n in g.graph.node if n.op_type == "Conv" and len(n.input) > 2]:
        source, weight_dq = g.dequantizer(conv.input[0]), g.dequantizer(conv.input[1])
        if source is None or weight_dq is None or not g.is_constant(conv.input[2]):
            continue
        bias = g.value(conv.input[2]).astype(np.float64)
        input_scale = float(g.value(source.input[1]).reshape(-1)[0])
        _fit_bias(g, weight_dq, bias, input_scale)
        scale = (input_scale * _per_channel(g, weight_dq, bias.size).astype(np.float64)
                 ).astype(np.float32)
        conv.input[2] = _int32_bias(g, f"{conv.name}.bias", np.round(bias / scale), scale,
                                    before=conv)
        changed += 1
    return changed


def _int32_bias(g: _Graph, name: str, values: np.ndarray, scale: np.ndarray, before) -> str:
    """An int32 initializer + per-channel DequantizeLinear placed before ``before``; returns
    the dequantized tensor's name."""
    from onnx import helper

    g.set_initializer(f"{name}.int32", values.astype(np.int32))
    g.set_initializer(f"{name}.scale", scale)
    g.set_initializer(f"{name}.zero_point", np.zeros(values.size, np.int32))
    node = helper.make_node("DequantizeLinear", [f"{name}.int32", f"{name}.scale",
                                                 f"{name}.zero_point"],
                            [f"{name}.dequantized"], name=f"{name}.DequantizeLinear", axis=0)
    g.graph.node.insert(list(g.graph.node).index(before), node)
    return f"{name}.dequantized"


def quantize_matmul_biases(model) -> int:
    """Give the constant bias added to a Q/DQ MatMul (a fully connected layer) as int32 +
    DequantizeLinear, scale input scale x weight scale per output column: ONNX Runtime then
    runs MatMul + Add as one integer ``QGemm`` with float output. A bias beyond int32 at
    that scale stays float (the check then names the MatMul)."""
    g = _Graph(model)
    changed = 0
    for matmul in [n for n in g.graph.node if n.op_type == "MatMul"]:
        source, weight_dq = g.dequantizer(matmul.input[0]), g.dequantizer(matmul.input[1])
        readers = g.consumers[matmul.output[0]]
        if source is None or weight_dq is None or len(readers) != 1 or \
                readers[0].op_type != "Add":
            continue
        add = readers[0]
        bias_name = add.input[1] if add.input[0] == matmul.output[0] else add.input[0]
        if not g.is_constant(bias_name):
            continue
        bias = g.value(bias_name).astype(np.float64).reshape(-1)
        weight_scale = g.value(weight_dq.input[1]).astype(np.float64).reshape(-1)
        scale = (float(g.value(source.input[1]).reshape(-1)[0]) *
                 np.broadcast_to(weight_scale, bias.shape)).astype(np.float32)
        values = np.round(bias / scale)
        if np.any(np.abs(values) > np.iinfo(np.int32).max):
            continue
        add.input[list(add.input).index(bias_name)] = _int32_bias(
            g, f"{matmul.name}.bias", values, scale, before=add)
        changed += 1
    return changed


def _same_quantizers(g: _Graph, nodes) -> bool:
    if not nodes or any(n.op_type != "QuantizeLinear" for n in nodes):
        return False
    params = [tuple(g.value(i).tobytes() for i in n.input[1:]) for n in nodes]
    return all(p == params[0] for p in params) and all(g.is_constant(i) for i in nodes[0].input[1:])


def quantize_through_commuting_ops(model) -> int:
    """Put each quantizer that is the only reader of a MaxPool / data-movement output (of
    every output of a Split, all with one scale) on that op's input as well (see the module
    doc); returns how many Q/DQ pairs were added."""
    from onnx import helper

    g = _Graph(model)
    added = 0
    changed = True
    while changed:
        changed = False
        for node in list(g.graph.node):
            if node.op_type not in COMMUTING_OPS:
                continue
            source = node.input[0]
            readers = [g.consumers[out] for out in node.output]  # Split has several outputs
            quantizers = [q for group in readers for q in group]
            if g.dequantizer(source) is not None or not all(readers) or \
                    not _same_quantizers(g, quantizers):
                continue
            q = quantizers[0]
            tag = f"{source}.{node.name}"
            new_q = helper.make_node("QuantizeLinear", [source, *q.input[1:]],
                                     [f"{tag}.quantized"], name=f"{tag}.QuantizeLinear")
            new_dq = helper.make_node("DequantizeLinear", [f"{tag}.quantized", *q.input[1:]],
                                      [f"{tag}.dequantized"], name=f"{tag}.DequantizeLinear")
            position = list(g.graph.node).index(node)
            g.graph.node.insert(position, new_dq)
            g.graph.node.insert(position, new_q)
            node.input[0] = f"{tag}.dequantized"
            g.refresh()
            added += 1
            changed = True
    return added


def _quant_params(g: _Graph, q) -> tuple:
    return tuple(g.value(i).tobytes() + str(g.value(i).dtype).encode() for i in q.input[1:])


def merge_quantizers(model) -> int:
    """One quantizer per (tensor, scale, zero point), and ``Shape`` nodes reading a quantized
    tensor read its dequantized copy; returns how many quantizers went."""
    g = _Graph(model)
    merged = 0
    for name in list(g.consumers):
        readers = list(g.consumers[name])
        quantizers = [n for n in readers if n.op_type == "QuantizeLinear" and n.input[0] == name
                      and all(g.is_constant(i) for i in n.input[1:])]
        if not quantizers:
            continue
        kept: dict[tuple, object] = {}
        changed = False
        for q in quantizers:
            first = kept.setdefault(_quant_params(g, q), q)
            if first is q:
                continue
            for dq in list(g.consumers[q.output[0]]):
                dq.input[0] = first.output[0]
            g.graph.node.remove(q)
            merged += 1
            changed = True
        shapes = [n for n in readers if n.op_type == "Shape" and n.input[0] == name]
        dequantized = [n.output[0] for q in kept.values() for n in g.consumers[q.output[0]]
                       if n.op_type == "DequantizeLinear"] if shapes else []
        for node in shapes if dequantized else ():
            node.input[0] = dequantized[0]
            changed = True
        if changed:  # only an edit stales the maps (one refresh per edit, not per tensor)
            g.refresh()
    _drop_duplicate_dequantizers(g)
    return merged


def _drop_duplicate_dequantizers(g: _Graph) -> None:
    seen: dict[tuple, str] = {}
    for dq in [n for n in g.graph.node if n.op_type == "DequantizeLinear"]:
        key = (tuple(dq.input), tuple(a.SerializeToString() for a in dq.attribute))
        if key not in seen:
            seen[key] = dq.output[0]
            continue
        for reader in g.consumers[dq.output[0]]:
            for index, name in enumerate(reader.input):
                if name == dq.output[0]:
                    reader.input[index] = seen[key]
        g.graph.node.remove(dq)
    g.refresh()


def remove_relu_before_unsigned(model) -> int:
    """Drop every Relu whose readers are all quantizers with zero point at the type's minimum
    (their saturation is the ReLU); returns how many went."""
    g = _Graph(model)
    removed = 0
    for relu in [n for n in g.graph.node if n.op_type == "Relu"]:
        readers = g.consumers[relu.output[0]]
        if relu.output[0] in {o.name for o in g.graph.output} or not readers:
            continue
        if not all(q.op_type == "QuantizeLinear" and len(q.input) > 2 and g.is_constant(q.input[2])
                   and np.all(g.value(q.input[2]) == np.iinfo(g.value(q.input[2]).dtype).min)
                   for q in readers):
            continue
        for q in readers:
            q.input[0] = relu.input[0]
        g.graph.node.remove(relu)
        g.refresh()
        removed += 1
    return removed


def fold_scalar_muls_into_quantizers(model) -> int:
    """``x -> Mul(c) -> QuantizeLinear(s)`` with ``c`` a positive scalar constant and only
    quantizers reading the product becomes ``x -> QuantizeLinear(s / c)``: the same integers
    (``x * c / s`` is ``x / (s / c)``, up to a float ulp at a tie), while their
    DequantizeLinear keeps ``s``. A Paddle inference-time dropout (``downgrade_in_infer``,
    SqueezeNet's) or ``scale`` op is such a Mul; without this the op before it (SqueezeNet's
    last concat) ends in no quantizer and runs in float. Returns how many Muls went."""
    g = _Graph(model)
    outputs = {o.name for o in g.graph.output}
    folded = 0
    for mul in [n for n in g.graph.node if n.op_type == "Mul"]:
        constant = [i for i in mul.input if g.is_constant(i)]
        data = [i for i in mul.input if not g.is_constant(i)]
        if len(constant) != 1 or len(data) != 1 or mul.output[0] in outputs:
            continue
        factor = g.value(constant[0])
        readers = g.consumers[mul.output[0]]
        if factor.size != 1 or not float(factor.reshape(())) > 0 or not readers or not all(
                q.op_type == "QuantizeLinear" and q.input[0] == mul.output[0]
                and g.is_constant(q.input[1]) for q in readers):
            continue
        for q in readers:
            scale = g.value(q.input[1])
            q.input[1] = g.set_initializer(f"{q.output[0]}.scale_over_{mul.output[0]}",
                                           (scale / factor.reshape(())).astype(scale.dtype))
            q.input[0] = data[0]
        g.graph.node.remove(mul)
        g.refresh()
        folded += 1
    return folded


def prepare_for_onnxruntime(model):
    """All six rewrites; returns ``model`` (changed in place)."""
    fold_batch_norms(model)
    quantize_conv_biases(model)
    quantize_matmul_biases(model)
    fold_scalar_muls_into_quantizers(model)
    merge_quantizers(model)
    quantize_through_commuting_ops(model)
    merge_quantizers(model)
    remove_relu_before_unsigned(model)
    _drop_unread_initializers(model)
    sort_nodes(model.graph)
    return model


def _drop_unread_initializers(model) -> None:
    """Folded norms' parameters and float biases now in int32 are read by no node (as
    initializers or, from paddle2onnx, Constant nodes)."""
    read = {name for node in model.graph.node for name in node.input}
    read |= {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    unread = [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] not in read]
    for node in unread:
        model.graph.node.remove(node)
