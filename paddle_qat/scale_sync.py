"""Keep activation quant state identical on every data-parallel rank (static programs).

Each rank's moving-average quantizers see only that rank's batches, so without this their
scales drift apart and the exported model depends on which rank saved it. At the end of every
training step (after the optimizer ops) the state of every activation quantizer -- scale,
moving-average state and accum -- is averaged over the ranks: one concatenated tensor, one
all-reduce, one scale by 1/N, split back in place.

Why every step: the state is a few floats per quantizer, so one fused all-reduce per step
costs about what a single small gradient does, and averaging each step makes the result equal
to a moving average over the global batch (the average of the ranks' batch maxima), which
is what a single-GPU run with the global batch would learn. Weight quantizers are not synced:
their scales are computed from the weights, which gradient all-reduce already keeps equal.
"""

from __future__ import annotations

STATE_SLOTS = ("OutScale", "OutState", "OutAccum")
OBSERVERS = ("quantize_linear", "moving_average_abs_max_scale")


def activation_quant_state(program) -> list[str]:
    """Names of the persistable state that activation quantizers update, in program order."""
    block = program.global_block()
    names: list[str] = []
    for op in block.ops:
        if op.type not in OBSERVERS:
            continue
        if op.type == "quantize_linear" and op.attr("quant_axis") >= 0:
            continue  # per-channel: a weight quantizer
        for slot in STATE_SLOTS:
            if slot in op.output_names:
                for name in op.output(slot):
                    var = block._find_var_recursive(name)
                    if var is not None and var.persistable and name not in names:
                        names.append(name)
    return names


def insert_scale_sync(program, nranks: int, ring_id: int = 0) -> list[str]:
    """Append the per-step averaging of activation quant state; returns the synced names."""
    from paddle.base import core
    from paddle.distributed import ReduceOp

    if nranks < 2:
        return []
    block = program.global_block()
    names = activation_quant_state(program)
    if not names:
        return []
    role = {"op_role": int(core.op_proto_and_checker_maker.OpRole.Optimize)}
    dtype = block.var(names[0]).dtype
    sizes = []
    for name in names:
        shape = block.var(name).shape
        sizes.append(int(abs(_prod(shape))))
    flat = block.create_var(name="paddle_qat.quant_state_sync", shape=[sum(sizes)],
                            dtype=dtype, persistable=False)
    flats = []
    for name, size in zip(names, sizes):
        out = block.create_var(name=f"{name}.flat_for_sync", shape=[size], dtype=dtype)
        block.append_op(type="reshape2", inputs={"X": [name]},
                        outputs={"Out": [out], "XShape": [block.create_var(
                            name=f"{name}.flat_for_sync.xshape", dtype=dtype)]},
                        attrs={"shape": [size], **role})
        flats.append(out)
    block.append_op(type="concat", inputs={"X": flats}, outputs={"Out": [flat]},
                    attrs={"axis": 0, **role})
    block.append_op(type="all_reduce", inputs={"x": [flat]}, outputs={"out": [flat]},
                    attrs={"ring_id": ring_id, "reduce_type": ReduceOp.SUM, **role})
    block.append_op(type="scale", inputs={"X": [flat]}, outputs={"Out": [flat]},
                    attrs={"scale": 1.0 / nranks, **role})
    block.append_op(type="split", inputs={"X": [flat]}, outputs={"Out": flats},
                    attrs={"sections": sizes, "axis": 0, "num": 0, **role})
    for name, out in zip(names, flats):
        block.append_op(type="reshape2", inputs={"X": [out]},
                        outputs={"Out": [name], "XShape": [block.create_var(
                            name=f"{name}.synced.xshape", dtype=dtype)]},
                        attrs={"shape": list(block.var(name).shape), **role})
    return names


def _prod(shape) -> int:
    result = 1
    for dim in shape:
        result *= dim
    return result
