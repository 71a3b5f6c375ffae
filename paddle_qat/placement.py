"""TensorRT-friendly Q/DQ placement, enforced in the program: one scale where TensorRT merges.

TensorRT runs Concat, MaxPool and data-movement ops in INT8 only when their inputs and
output carry the same scale (shared/TRT_QDQ_RULES.md, rules 8 and 9); otherwise it adds
reformats, and a QAT engine ends up slower than PTQ. Paddle's passes give every quantizer
its own moving average, so after them :func:`share_scales` joins the quantizers of tensors
linked through such ops into one group that reads one scale: training learns the shared
scale, the eval program reads it, and the exported ONNX satisfies the checker by
construction, not by an after-the-fact patch.

One member of a group, the widest, updates the shared moving average (see
:func:`_one_observer_per_group`); an average pool keeps its own output scale (see
:func:`_requantizes`).
"""

from __future__ import annotations

from collections import Counter

# Ops whose inputs and outputs TensorRT keeps in one INT8 scale (Q/DQ commutes through them).
SCALE_SHARING_OPS: dict[str, tuple[str, ...]] = {
    "cast": ("X",),  # AMP's precision casts: the same tensor to every runtime
    "concat": ("X",),
    "pool2d": ("X",),
    "reshape2": ("X",),
    "transpose2": ("X",),
    "flatten_contiguous_range": ("X",),
    "squeeze2": ("X",),
    "unsqueeze2": ("X",),
    "split": ("X",),  # every output (ShuffleNetV2's channel split)
}
_OUTPUT_SLOT = "Out"
# Each is read and written under one name (OutScale is Scale, ...), so renaming the input
# renames both.
_STATE_SLOTS = ("Scale", "InState", "InAccum")


class _Groups:
    """Union-find over tensor names."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def join(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def activation_quantizers(block) -> list:
    """The quantize_linear ops of ``block`` whose input is data, not a persistable weight
    (nor, under AMP O2, an fp32 cast of one)."""
    casts = {op.output("Out")[0]: op.input("X")[0] for op in block.ops if op.type == "cast"}
    found = []
    for op in block.ops:
        if op.type != "quantize_linear":
            continue
        name = op.input("X")[0]
        var = block._find_var_recursive(casts.get(name, name))
        if var is not None and not var.persistable:
            found.append(op)
    return found


def _dequantizers_by_input(block) -> dict[str, list]:
    """The dequantize_linear ops of ``block`` by the quantized tensor they read. Paddle's
    passes can write two identical Q/DQ pairs under one name (a tensor read by a conv and,
    for ONNX Runtime's placement, by an add: ResNet18's stem pool), so a name maps to all its
    dequantizers; changing only the last one left the other dequantizing with the old scale
    and range (measured: ResNet18 trained for ONNX Runtime dequantized its stem pool's output
    with the initial scale, thousands of times too small)."""
    found: dict[str, list] = {}
    for op in block.ops:
        if op.type == "dequantize_linear":
            found.setdefault(op.input("X")[0], []).append(op)
    return found


def _rename(op, old: str, new: str) -> None:
    if old in op.input_arg_names:
        op._rename_input(old, new)
    if old in op.output_arg_names:
        op._rename_output(old, new)


def _requantizes(op) -> bool:
    """An average pool: its INT8 kernel (TensorRT's quantized AveragePool, ONNX Runtime's
    QLinear(Global)AveragePool) writes its own output scale, and an average's range is
    narrower than its input's (a global pool's about 4x here), so sharing would waste levels."""
    return op.type == "pool2d" and op.attr("pooling_type") == "avg"


def _sharing_links(block):
    """(op, input, output) for each input/output pair a forward scale-sharing op joins (their
    grads and optimizer ops are not data; an average pool requantizes)."""
    for op in block.ops:
        slots = SCALE_SHARING_OPS.get(op.type)
        if slots is None or int(op.attr("op_role")) not in (0, 256) or \
                _OUTPUT_SLOT not in op.output_names or _requantizes(op):
            continue
        for slot in slots:
            for name in op.input(slot):
                for output in op.output(_OUTPUT_SLOT):
                    yield op, name, output


def share_scales(program) -> list[tuple[str, ...]]:
    """Make the activation quantizers of tensors joined by Concat, pooling and data-movement
    ops use one scale variable (and one state / accum) per group; returns the groups' scale
    names, the kept one first. Deterministic, so a training program and its eval program
    end up with the same names."""
    block = program.global_block()
    groups = _Groups()
    for _, name, output in _sharing_links(block):
        groups.join(name, output)
    # A quantizer's input is itself an op output, e.g. the concat's own input tensors;
    # after the pass, concat reads the dequantized copies: follow them back to the source.
    made_by = {name: op for op in block.ops for name in op.output_arg_names}
    for op in block.ops:
        if op.type in SCALE_SHARING_OPS:
            for name in op.input_arg_names:
                dq = made_by.get(name)
                if dq is not None and dq.type == "dequantize_linear":
                    q = made_by.get(dq.input("X")[0])
                    if q is not None and q.type == "quantize_linear":
                        groups.join(q.input("X")[0], name)
    members: dict[str, list] = {}
    for q in activation_quantizers(block):
        members.setdefault(groups.find(q.input("X")[0]), []).append(q)

    dequantizers = _dequantizers_by_input(block)
    merged = []
    for quantizers in members.values():
        if len(quantizers) < 2:
            continue
        quantizers.sort(key=lambda q: (len(q.input("Scale")[0]), q.input("Scale")[0]))
        keep = quantizers[0]
        merged.append(tuple(dict.fromkeys(q.input("Scale")[0] for q in quantizers)))
        for q in quantizers[1:]:
            for slot in _STATE_SLOTS:
                if slot not in q.input_names or not q.input(slot):
                    continue
                old, new = q.input(slot)[0], keep.input(slot)[0]
                _rename(q, old, new)
                for dq in dequantizers.get(q.output("Y")[0], []):
                    _rename(dq, old, new)
                if not any(old in op.input_arg_names + op.output_arg_names for op in block.ops):
                    block._remove_var(old, sync=False)
    _drop_repeated_quantizers(block)
    _one_observer_per_group(block)
    program._sync_with_cpp()
    return merged


# How a scale-sharing op relates the abs-max of its input and output: a concat's output is the
# widest of its inputs, a max pool's or split's input the widest of its outputs; data movement
# and casts keep it.
_WIDER_INPUT = ("pool2d", "split")
_WIDER_OUTPUT = ("concat",)


def _at_least_as_wide(block) -> dict[str, set[str]]:
    """``wider[a]``: the tensors whose abs-max cannot exceed ``a``'s, one scale-sharing op (or
    Q/DQ pair) away."""
    wider: dict[str, set[str]] = {}

    def link(big: str, small: str) -> None:
        wider.setdefault(big, set()).add(small)

    for op in block.ops:
        if op.type in ("quantize_linear", "dequantize_linear") and \
                int(op.attr("op_role")) in (0, 256):  # the same values
            link(op.output("Y")[0], op.input("X")[0])
            link(op.input("X")[0], op.output("Y")[0])
    for op, source, output in _sharing_links(block):
        if op.type not in _WIDER_OUTPUT:
            link(source, output)
        if op.type not in _WIDER_INPUT:
            link(output, source)
    return wider


def _one_observer_per_group(block) -> None:
    """Let one quantizer of each scale group update the shared moving average: the one whose
    tensor is at least as wide as every other member's (a concat's output, a max pool's
    input); the others quantize with the scale it keeps, as the eval program does.

    Updated by every member, the average follows the mean of the members' batch maxima, not
    the widest one's, so the group's widest tensor is clipped in training and at export while
    PTQ calibrates the group to its widest member (measured on the demo, before average pools
    kept their own scale: QAT pulled a residual block's shared scale from 0.106 to 0.059,
    dragged down by the global pool's output). Where no member is at least as wide as all
    the others (ShuffleNetV2's channel splits, whose concat outputs no quantizer reads), an
    observer-only quantizer on the members' stacked abs-maxima updates it instead."""
    observers: dict[str, list] = {}
    for q in activation_quantizers(block):
        if "InState" in q.input_names and q.input("InState"):
            observers.setdefault(q.input("Scale")[0], []).append(q)
    wider = _at_least_as_wide(block)
    for members in observers.values():
        if len(members) < 2:
            continue
        tensors = {q.input("X")[0] for q in members}
        leader = next((q for q in members
                       if tensors <= _reachable(q.input("X")[0], wider)), None)
        if leader is None:  # no member bounds them all: observe the maximum of them all
            leader = _add_observer(block, members)
        for q in members:
            if q is not leader:
                _stop_observing(q)


def _add_observer(block, members: list):
    """Insert, after the last of ``members``' tensors is computed, ops that take each one's
    abs-max and an observer-only quantizer (``only_observer``: it quantizes nothing) on the
    stacked maxima, so the group's moving average follows the widest member of each batch,
    as PTQ's calibration does; returns the observer. Training only: the eval program's
    quantizers read the scale."""
    tensors = [q.input("X")[0] for q in members]
    index = 1 + max((i for i, op in enumerate(block.ops)
                     if int(op.attr("op_role")) in (0, 256)
                     and set(op.output_arg_names) & set(tensors)), default=-1)  # -1: feeds
    scale = members[0].input("Scale")[0]
    dtype = block._find_var_recursive(tensors[0]).dtype  # fp32: AMP casts quantizer inputs

    def add(op_type, inputs, shape, attrs=None, out_slot="Out"):
        nonlocal index
        out = block.create_var(name=f"{scale}.observed.{index}", dtype=dtype, shape=shape)
        block._insert_op(index, type=op_type, inputs={"X": inputs}, outputs={out_slot: [out.name]},
                         attrs={"op_role": 0, **(attrs or {})})
        index += 1
        return out.name

    maxima = [add("reduce_max", [add("abs", [t], block._find_var_recursive(t).shape)], [],
                  {"dim": [], "keep_dim": False, "reduce_all": True})
              for t in tensors]
    stacked = add("stack", maxima, [len(maxima)], {"axis": 0}, out_slot="Y")
    member = members[0]
    inputs = {slot: member.input(slot) for slot in member.input_names}
    inputs["X"] = [stacked]
    outputs = {slot: member.output(slot) for slot in member.output_names}
    outputs["Y"] = [block.create_var(name=f"{stacked}.y", dtype=dtype,
                                     shape=[len(maxima)]).name]
    attrs = {name: member.attr(name) for name in member.attr_names
             if name not in ("op_callstack", "op_namescope")}
    attrs.update(only_observer=True, is_test=False)
    return block._insert_op(index, type="quantize_linear", inputs=inputs, outputs=outputs,
                            attrs=attrs)


def _reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for name in edges.get(todo.pop(), ()):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def _stop_observing(q) -> None:
    """Turn a training quantizer into one that reads its scale (an eval program's kind)."""
    for slot in ("InState", "InAccum"):
        q.desc.set_input(slot, [])
    for slot in ("OutScale", "OutState", "OutAccum"):
        q.desc.set_output(slot, [])
    q._set_attr("is_test", True)


def _drop_repeated_quantizers(block) -> None:
    """Two quantizers of one tensor with one scale compute the same thing (Paddle's residual
    pass adds a second one for the identity branch): the later one's readers read the first
    one's output, and the later pair goes. Gradients are unaffected (the backward ops read the
    unquantized tensor); the moving average is updated once per step instead of twice."""
    activation = {id(q) for q in activation_quantizers(block)}
    dequantizer_of = {op.input("X")[0]: index for index, op in enumerate(block.ops)
                      if op.type == "dequantize_linear"}
    first: dict[tuple, str] = {}
    renames: dict[str, str] = {}
    doomed: list[int] = []
    for index, q in enumerate(block.ops):
        if q.type != "quantize_linear" or id(q) not in activation:
            continue
        dq_index = dequantizer_of.get(q.output("Y")[0])
        if dq_index is None:
            continue
        key = (q.input("X")[0], q.input("Scale")[0], q.attr("bit_length"))
        output = block.ops[dq_index].output("Y")[0]
        if key in first:
            renames[output] = first[key]
            doomed += [index, dq_index]
        else:
            first[key] = output
    if not doomed:
        return
    for op in block.ops:
        for old in set(op.input_arg_names) & set(renames):
            op._rename_input(old, renames[old])
    names = {n for i in doomed for n in block.ops[i].input_arg_names
             + block.ops[i].output_arg_names}
    for index in sorted(doomed, reverse=True):
        block._remove_op(index, sync=False)  # share_scales syncs once
    used = {n for op in block.ops for n in op.input_arg_names + op.output_arg_names}
    for name in names - used:
        if block.has_var(name):
            block._remove_var(name, sync=False)


# Ops whose output cannot be negative, whatever their input.
NON_NEGATIVE_OPS = frozenset({"relu", "relu6", "sigmoid", "softmax", "hard_sigmoid"})
# Ops whose output cannot be negative when none of these input slots can be.
SIGN_PRESERVING_OPS: dict[str, tuple[str, ...]] = {
    **SCALE_SHARING_OPS,
    "cast": ("X",),
    "quantize_linear": ("X",),
    "dequantize_linear": ("X",),
    "elementwise_add": ("X", "Y"),
}


def non_negative_tensors(block) -> set[str]:
    """Names of the forward tensors of ``block`` that cannot hold a negative value."""
    found: set[str] = set()
    for op in block.ops:
        if int(op.attr("op_role")) not in (0, 256):
            continue  # backward and optimizer ops carry gradients, not data
        slots = SIGN_PRESERVING_OPS.get(op.type)
        if op.type in NON_NEGATIVE_OPS:
            found.update(op.output_arg_names)
        elif slots is not None:
            inputs = [name for slot in slots if slot in op.input_names for name in op.input(slot)]
            if inputs and all(name in found for name in inputs):
                found.update(op.output("Out" if "Out" in op.output_names else "Y"))
    return found


def use_unsigned_ranges(program) -> list[str]:
    """Quantize tensors that cannot be negative to the unsigned range ``[0, 2**bits - 1]``.

    A ReLU output quantized to signed INT8 uses half the levels, and ONNX Runtime cannot fold
    ``Relu -> QuantizeLinear`` unless the zero point is the range's minimum, so the conv before
    it runs in float. Unsigned 8-bit is simulated exactly by Paddle's kernels with
    ``bit_length = 9`` (step ``scale / 255``) and ``qmin = 0``; the export writes it as uint8
    with zero point 0. A scale shared by several quantizers (see :func:`share_scales`) goes
    unsigned only when every one of them reads a non-negative tensor. Returns the scale names
    made unsigned.
    """
    block = program.global_block()
    non_negative = non_negative_tensors(block)
    by_scale: dict[str, list] = {}
    for q in activation_quantizers(block):
        by_scale.setdefault(q.input("Scale")[0], []).append(q)
    dequantizers = _dequantizers_by_input(block)
    unsigned = []
    for scale, quantizers in by_scale.items():
        if not all(q.input("X")[0] in non_negative for q in quantizers):
            continue
        if all(q.attr("qmin") == 0 for q in quantizers):
            continue  # already unsigned
        for q in quantizers:
            bits = int(q.attr("bit_length"))
            for op in (q, *dequantizers.get(q.output("Y")[0], [])):
                op._set_attr("bit_length", bits + 1)
                op._set_attr("qmin", 0)
                op._set_attr("qmax", 2 ** bits - 1)
        unsigned.append(scale)
    program._sync_with_cpp()
    return unsigned


def _quantized_source(name: str, made_by: dict):
    """(tensor, ops) when ``name`` is a Q/DQ copy of ``tensor`` -- ``name`` = DQ(Q(tensor)),
    or under AMP cast(DQ(Q(cast(tensor)))) -- with the ops between them; else None."""
    chain = []
    op = made_by.get(name)
    cast_back = op is not None and op.type == "cast"
    if cast_back:
        chain.append(op)
        op = made_by.get(op.input("X")[0])
    if op is None or op.type != "dequantize_linear":
        return None
    q = made_by.get(op.input("X")[0])
    if q is None or q.type != "quantize_linear":
        return None
    chain += [op, q]
    source = q.input("X")[0]
    cast = made_by.get(source)
    if cast_back and cast is not None and cast.type == "cast":
        chain.append(cast)
        source = cast.input("X")[0]
    return source, chain


# Elementwise ops (and their grads) that are not joins of two tensors when one operand is a
# parameter: a bias add, a per-channel scale, AMP's loss scaling.
_PARAMETER_OPS = ("elementwise_add", "elementwise_add_grad", "elementwise_mul",
                  "elementwise_mul_grad")
# What a parameter may be read through and still be one: Paddle 3's nn.Conv2D adds its bias
# as reshape2(bias) to [1, C, 1, 1]; under AMP a cast comes first
_PARAMETER_VIEWS = ("cast", "reshape2", "reshape", "unsqueeze2", "unsqueeze", "squeeze2",
                    "squeeze")


def parameter_behind(name: str, block, made_by: dict) -> str | None:
    """The persistable variable that tensor ``name`` is, read through casts (AMP), reshapes
    (Paddle 3's ``nn.Conv2D`` bias) or a Q/DQ a pass put there; None for data."""
    found = _quantized_source(name, made_by)
    if found is not None:
        name = found[0]
    seen = set()
    op = made_by.get(name)
    while op is not None and op.type in _PARAMETER_VIEWS and name not in seen:
        seen.add(name)
        name = op.input("X")[0]
        op = made_by.get(name)
    var = block._find_var_recursive(name)
    return name if var is not None and var.persistable else None


def unquantize_parameter_ops(program) -> list[str]:
    """Remove the Q/DQ that Paddle's passes put on an input of an ``elementwise_add`` /
    ``elementwise_mul`` whose other input is a parameter (a bias after ``mul`` or ``conv2d``,
    a scale, AMP's loss scaling): the activation pass quantizes its data input, and for
    TensorRT's placement the residual pass takes a reshaped conv bias (Paddle 3's
    ``nn.Conv2D``) for the identity branch. Such an op belongs to the op before it and is no
    join of two tensors: quantizing there adds a rounding no runtime needs, keeps TensorRT and
    ONNX Runtime from fusing the bias, and under AMP would quantize the loss. Returns the
    tensors given back their float reads."""
    block = program.global_block()
    made_by = {name: op for op in block.ops for name in op.output_arg_names}

    restored, chains = [], []
    for op in block.ops:
        if op.type not in _PARAMETER_OPS:
            continue
        if not any(parameter_behind(n, block, made_by) for n in op.input("X") + op.input("Y")):
            continue
        for name in op.input("X") + op.input("Y"):
            found = _quantized_source(name, made_by)
            if found is not None:
                op._rename_input(name, found[0])
                restored.append(found[0])
                chains.append(found[1])
    reads = Counter(n for o in block.ops for n in o.input_arg_names)
    uses = Counter(n for o in block.ops for n in o.input_arg_names + o.output_arg_names)
    removed: set[int] = set()
    for chain in chains:  # consumer side first: each op goes once nothing reads its output
        for op in chain:
            if id(op) in removed:  # the forward op and its grad op share a chain
                continue
            data = [n for n in op.output_arg_names
                    if not block._find_var_recursive(n).persistable]
            if any(reads[n] > 0 for n in data):
                break
            index = next(i for i, o in enumerate(block.ops) if o is op)
            removed.add(id(op))
            reads.subtract(op.input_arg_names)
            uses.subtract(op.input_arg_names + op.output_arg_names)
            names = set(op.input_arg_names + op.output_arg_names)
            block._remove_op(index, sync=False)  # one sync below, not one per edit
            for name in names:
                if uses[name] <= 0 and block.has_var(name):
                    block._remove_var(name, sync=False)
    program._sync_with_cpp()
    return sorted(set(restored))
