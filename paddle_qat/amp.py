"""AMP (O1 mixed and O2 pure FP16/BF16) with QAT: quant state stays fp32 and canonically named.

Paddle's quant passes create each scale / zero point / moving-average state and accum from the
tensor they quantize. Under AMP that tensor is the ``.cast_fp16`` copy AMP made, so the state
comes out float16 and named after the copy (``conv2d_0.w_0.cast_fp16@scale``): the FP32 eval
program cannot load it, fp16 scales overflow above 65504 and underflow below 6e-8, and a weight
read through a cast is not even recognised as a weight (it gets a per-tensor moving-average
quantizer instead of per-channel abs-max, and a ``mul`` weight none at all). NVIDIA's Paddle
RN50 QAT worked around this by editing the saved ``.pdopt`` afterwards. Here it is fixed in the
program, around Paddle's passes:

1. :func:`hoist_casts` (before the passes): a quantizable op (and its grad op) that reads an
   fp32 -> low-precision ``cast`` output is pointed at the cast's fp32 source, so the passes
   quantize the fp32 tensor, with its own name, as the FP32 eval program does.
2. :func:`restore_low_precision` (after the passes): every quantizer runs in fp32, with fp32
   state. Where the quantized tensor is low precision (an activation inside an FP16 region, an
   O2 weight) it is cast to fp32 before the quantizer; where the consumer computes in low
   precision the dequantized fp32 tensor is cast back for it. What is quantized does not
   change: the same tensor, read by the same op, through the same Q/DQ.
"""

from __future__ import annotations

import numpy as np

# Input slots that the weight-op quant pass quantizes, per op type.
QUANTIZED_SLOTS = {
    "conv2d": ("Input", "Filter"),
    "depthwise_conv2d": ("Input", "Filter"),
    "conv2d_transpose": ("Input", "Filter"),
    "mul": ("X", "Y"),
    "matmul": ("X", "Y"),
    "matmul_v2": ("X", "Y"),
    "elementwise_add": ("X", "Y"),
    "pool2d": ("X",),
}
OBSERVER_OPS = ("quantize_linear", "moving_average_abs_max_scale")


def _types():
    from paddle.base import core

    t = core.VarDesc.VarType
    return t.FP32, (t.FP16, t.BF16)


def _is_low(var) -> bool:
    return var is not None and var.dtype in _types()[1]


def _cast_sources(block) -> dict[str, str]:
    """Low-precision tensor -> its fp32 source, for every fp32 -> fp16/bf16 ``cast``."""
    fp32, low = _types()
    sources = {}
    for op in block.ops:
        if op.type != "cast":
            continue
        if op.attr("in_dtype") == fp32 and op.attr("out_dtype") in low:
            sources[op.output("Out")[0]] = op.input("X")[0]
    return sources


def hoist_casts(program, op_types) -> dict[str, str]:
    """Point quantizable inputs read through an AMP cast at the fp32 source.

    Returns ``{fp32 source: cast output}`` for :func:`restore_low_precision`, which casts
    each dequantized tensor back and re-points inputs the passes did not quantize.
    """
    hoisted = {}
    for block in program.blocks:
        sources = _cast_sources(block)
        if not sources:
            continue
        for op in block.ops:
            for slot in _slots(op, op_types):
                for name in op.input(slot):
                    if name in sources:
                        op._rename_input(name, sources[name])
                        hoisted[sources[name]] = name
    return hoisted


def _slots(op, op_types):
    base = op.type[:-5] if op.type.endswith("_grad") else op.type
    if base not in op_types or base not in QUANTIZED_SLOTS:
        return ()
    return [s for s in QUANTIZED_SLOTS[base] if s in op.input_names]


def _unhoist(block, hoisted: dict[str, str], op_types) -> None:
    """Inputs hoisted for the passes but left unquantized go back to their AMP cast."""
    for op in block.ops:
        if not _writes_low_precision(block, op):
            continue
        for slot in _slots(op, op_types):
            for name in op.input(slot):
                if name in hoisted and block.has_var(hoisted[name]):
                    op._rename_input(name, hoisted[name])


def _remove_unread_casts(block, outputs: set[str]) -> None:
    read = {name for op in block.ops for name in op.input_arg_names}
    for index in reversed(range(len(block.ops))):
        op = block.ops[index]
        if op.type == "cast" and op.output("Out")[0] in outputs and op.output("Out")[0] not in read:
            block._remove_op(index, sync=False)  # the caller syncs once


def _insert_cast(block, index, source, target_dtype, suffix):
    from paddle.base import core

    src = block._find_var_recursive(source)
    name = f"{source}{suffix}"
    if not block.has_var(name):
        block.create_var(name=name, shape=src.shape, dtype=target_dtype, persistable=False,
                         stop_gradient=src.stop_gradient)
    op_role = core.op_proto_and_checker_maker.OpRole.Forward
    block._insert_op(index, type="cast", inputs={"X": [source]}, outputs={"Out": [name]},
                     attrs={"in_dtype": src.dtype, "out_dtype": target_dtype,
                            "op_role": int(op_role)})
    return name


def _writes_low_precision(block, op) -> bool:
    return any(_is_low(block._find_var_recursive(n)) for n in op.output_arg_names)


def restore_low_precision(program, scope, place, hoisted: dict[str, str] | None = None,
                          op_types=()) -> list[str]:
    """Make every quantizer and its state fp32; cast around it where AMP computes in fp16.

    Returns the quant state variables whose dtype was changed (for logs and tests).
    """
    fp32, _ = _types()
    changed: list[str] = []
    for block in program.blocks:
        casts: dict[tuple[str, int], str] = {}  # (tensor, dtype) -> its cast, made once
        index = 0
        while index < len(block.ops):
            op = block.ops[index]
            if op.type not in OBSERVER_OPS and op.type != "dequantize_linear":
                index += 1
                continue
            # 1. quant state and outputs of the quantizer become fp32
            for name in op.input_arg_names + op.output_arg_names:
                var = block._find_var_recursive(name)
                if _is_low(var) and name != op.input("X")[0]:
                    var.desc.set_dtype(fp32)
                    if var.persistable:
                        changed.append(name)
            # 2. a low-precision input is cast to fp32 first
            x_name = op.input("X")[0]
            if _is_low(block._find_var_recursive(x_name)):
                if (x_name, fp32) not in casts:
                    casts[(x_name, fp32)] = _insert_cast(block, index, x_name, fp32, ".fp32")
                    index += 1
                op._rename_input(x_name, casts[(x_name, fp32)])
            # 3. a low-precision reader of the dequantized tensor gets it cast back
            if op.type == "dequantize_linear":
                out = op.output("Y")[0]
                readers = [r for r in block.ops[index + 1:]
                           if out in r.input_arg_names and _writes_low_precision(block, r)]
                if readers:
                    low = next(block._find_var_recursive(n).dtype for r in readers
                               for n in r.output_arg_names
                               if _is_low(block._find_var_recursive(n)))
                    cast = _insert_cast(block, index + 1, out, low, ".low_precision")
                    for reader in readers:
                        reader._rename_input(out, cast)
                    index += 1
            index += 1
        if hoisted:
            _unhoist(block, hoisted, op_types)
            _remove_unread_casts(block, set(hoisted.values()))
    changed = sorted(set(changed))
    for name in changed:
        holder = scope.find_var(name)
        if holder is not None and holder.get_tensor()._is_initialized():
            value = np.array(holder.get_tensor()).astype(np.float32)
            holder.get_tensor().set(value, place)
    program._sync_with_cpp()
    return changed
