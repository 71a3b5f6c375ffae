"""Where paddle2onnx 1.3.1 translates a Paddle op into a different function, put it right.

* ``gelu(approximate=True)`` (the tanh approximation) is written as the exact GELU
  (``Div -> Erf -> Add -> Mul -> Mul``): up to about 1e-3 off per activation, which the
  export's fidelity tests measured as 0.9 % of the largest logit on a small CNN. Its nodes
  are replaced by ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``, Paddle's formula
  (with ``x + 0.044715 x^3`` computed as ``x (1 + 0.044715 x^2)``).

Example::

    restore_approximate_gelus(model, float_program)
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import QATError


def _exact_gelu_nodes(output: str, producer: dict) -> tuple[list, str] | None:
    """(paddle2onnx's exact-GELU nodes ending in ``output``, input to output; their input x),
    or None when ``output`` is not made that way."""
    last = producer.get(output)
    if last is None or last.op_type != "Mul":
        return None
    product = next((producer[i] for i in last.input
                    if i in producer and producer[i].op_type == "Mul"), None)
    if product is None:
        return None
    one_plus = next((producer[i] for i in product.input
                     if i in producer and producer[i].op_type == "Add"), None)
    erf = producer.get(one_plus.input[0]) if one_plus is not None else None
    div = producer.get(erf.input[0]) if erf is not None and erf.op_type == "Erf" else None
    if div is None or div.op_type != "Div":
        return None
    x = div.input[0]
    if x not in product.input:
        return None
    return [div, erf, one_plus, product, last], x


def restore_approximate_gelus(model, float_program) -> int:
    """Give every ``gelu(approximate=True)`` of ``float_program`` its tanh formula in
    ``model`` (paddle2onnx's translation of it); returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    gelus = [op for op in float_program.global_block().ops
             if op.type == "gelu" and op.attr("approximate")]
    rewritten = 0
    for index, op in enumerate(gelus):
        output = op.output("Out")[0]
        producer = {o: n for n in graph.node for o in n.output}
        if output not in producer:
            continue  # not computed by the exported outputs
        found = _exact_gelu_nodes(output, producer)
        if found is None:
            raise QATError(
                f"gelu(approximate=True) {output!r}: paddle2onnx wrote neither the tanh "
                f"formula nor its usual exact-GELU nodes, so the export cannot make it compute "
                f"what Paddle does; train with approximate=False")
        nodes, x = found
        position = min(i for i, n in enumerate(graph.node) if n in nodes)
        for node in nodes:
            graph.node.remove(node)
        tag = f"paddle_qat.gelu_tanh.{index}"
        constants = {"cubic": 0.044715, "slope": math.sqrt(2.0 / math.pi), "one": 1.0,
                     "half": 0.5, "two": 2.0}
        for name, value in constants.items():
            graph.initializer.append(numpy_helper.from_array(np.float32(value),
                                                             f"{tag}.{name}"))
        c = {name: f"{tag}.{name}" for name in constants}
        # x + 0.044715 x^3 as x (1 + 0.044715 x^2): no Add of two data tensors, which
        # TensorRT's rules would read as a residual add after the conv that made x; x^2 as a
        # Pow, not x * x, which ONNX Runtime's check would take for an elementwise multiply
        # of two quantized tensors left in float
        steps = [("Pow", [x, c["two"]], "square"),
                 ("Mul", [f"{tag}.square", c["cubic"]], "cubic_x2"),
                 ("Add", [f"{tag}.cubic_x2", c["one"]], "poly"),
                 ("Mul", [x, f"{tag}.poly"], "inner"),
                 ("Mul", [f"{tag}.inner", c["slope"]], "scaled"),
                 ("Tanh", [f"{tag}.scaled"], "tanh"),
                 ("Add", [f"{tag}.tanh", c["one"]], "one_plus"),
                 ("Mul", [x, f"{tag}.one_plus"], "product")]
        new = [helper.make_node(kind, inputs, [f"{tag}.{name}"], name=f"{tag}.{name}")
               for kind, inputs, name in steps]
        new.append(helper.make_node("Mul", [f"{tag}.product", c["half"]], [output],
                                    name=f"{tag}.out"))
        for offset, node in enumerate(new):
            graph.node.insert(position + offset, node)
        rewritten += 1
    return rewritten
