"""Paddle functions that Paddle 3.3 dropped from the legacy program IR, put back.

Paddle 3.3 moved 56 functions (``paddle.matmul``, ``paddle.sum``, ``paddle.exp``,
``paddle.sigmoid``, ``F.gelu``, ``F.softplus``, the same methods of a static ``Variable``,
...) into C++ bindings that take eager Tensors and PIR Values only. On the legacy IR, which
fleet's static ``minimize`` and the quant passes need, each of them raised a pybind error
such as ``TypeError: (InvalidType) sum(): argument (position 1) must be Value, but got
Variable``: a model using any of them could not be built for static QAT at all.

:func:`install` (run by ``import paddle_qat``) wraps each such function: called with a legacy
``Variable``, it appends the legacy op that Paddle still registers for it (``matmul_v2``,
``reduce_sum``, ``gelu``, ...), which the quant passes and ``append_backward`` know; called
with anything else, it is Paddle's own function, unchanged. The one function with no such op
(``index_put``) raises :class:`~paddle_qat.errors.LegacyIRRequiredError` naming it and what to
use instead. Two Python functions call their binding in every mode and are handled the same
way: ``paddle.median`` and ``paddle.linalg.svdvals``. A Paddle whose functions still build
legacy ops is left as it is.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import LegacyIRRequiredError

_REQUIRED = object()
_VARIABLE: type = type(None)  # paddle.base.framework.Variable, once install() ran
# The module of the Python shims Paddle 3.3 puts in front of the C++ bindings
_PADDLE_SHIMS = "paddle.base.dygraph.generated_tensor_methods_patch"
# Python functions of Paddle 3.3.1 that call their binding in every mode, legacy IR included
_BINDING_CALLERS = frozenset({"paddle.tensor.stat.median", "paddle.tensor.linalg.svdvals"})


def _no_attrs(args: dict) -> dict:
    return {}


@dataclass(frozen=True)
class LegacyOp:
    """How one Paddle function is written as a legacy op.

    ``params``: the function's parameters in order, with defaults (``_REQUIRED`` for none);
    ``inputs``: op input slot -> the parameter holding that tensor; ``attrs``: the op's
    attributes from the bound arguments; ``out_dtype``: ``"same"`` (the first input's),
    ``"bool"``, or the parameter naming it; ``prepare``: rewrites the bound arguments first;
    ``index_slot`` and ``result``: an int64 index output, and what the call returns from the
    bound arguments, the output and the index (by default the output alone).
    """

    op_type: str
    params: dict[str, object]
    inputs: dict[str, str] = field(default_factory=lambda: {"X": "x"})
    attrs: Callable[[dict], dict] = _no_attrs
    out_dtype: str = "same"
    out_slot: str = "Out"
    prepare: Callable[[dict], dict] | None = None
    index_slot: str | None = None  # a second output, int64 indices (median's)
    result: Callable[[dict, object, object], object] | None = None  # (bound, out, index)

    def bind(self, function: str, args: tuple, kwargs: dict) -> dict:
        names = list(self.params)
        if len(args) > len(names):
            raise TypeError(f"{function}() takes {len(names)} arguments, got {len(args)}")
        bound = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in self.params:
                raise TypeError(f"{function}() got an unexpected keyword argument {key!r}")
            if key in bound:
                raise TypeError(f"{function}() got multiple values for argument {key!r}")
            bound[key] = value
        for key, default in self.params.items():
            if key not in bound:
                if default is _REQUIRED:
                    raise TypeError(f"{function}() missing required argument {key!r}")
                bound[key] = default
        return bound

    def append(self, function: str, args: tuple, kwargs: dict):
        from paddle.base.layer_helper import LayerHelper

        bound = self.bind(function, args, kwargs)
        if self.prepare is not None:
            bound = self.prepare(bound)
        inputs = {slot: [_as_variable(bound[param], function, param)]
                  for slot, param in self.inputs.items()}
        first = inputs[next(iter(self.inputs))][0]
        if self.out_dtype == "same":
            dtype = first.dtype
        else:
            dtype = _var_type("bool" if self.out_dtype == "bool" else bound[self.out_dtype])
        helper = LayerHelper(self.op_type, name=bound.get("name"))
        out = helper.create_variable_for_type_inference(dtype=dtype)
        outputs = {self.out_slot: [out]}
        index = None
        if self.index_slot is not None:
            index = helper.create_variable_for_type_inference(dtype=_var_type("int64"))
            index.stop_gradient = True
            outputs[self.index_slot] = [index]
        helper.append_op(type=self.op_type, inputs=inputs, outputs=outputs,
                         attrs=self.attrs(bound))
        return out if self.result is None else self.result(bound, out, index)


def _var_type(dtype):
    from paddle.base.framework import convert_np_dtype_to_dtype_

    return dtype if _is_var_type(dtype) else convert_np_dtype_to_dtype_(dtype)


def _is_var_type(dtype) -> bool:
    from paddle.base import core

    return isinstance(dtype, core.VarDesc.VarType)


def _as_variable(value, function: str, param: str):
    if is_legacy_variable(value):
        return value
    raise LegacyIRRequiredError(
        f"{function}(): {param} is a {type(value).__name__}, but on Paddle's legacy IR "
        f"(static QAT) it must be a static Variable like the other inputs; make it one "
        f"with paddle.static.data or paddle.full")


def _cast(x, dtype):
    """Append a legacy ``cast`` of ``x`` to ``dtype`` (a no-op when it already has it)."""
    from paddle.base.layer_helper import LayerHelper

    target = _var_type(dtype)
    if x.dtype == target:
        return x
    helper = LayerHelper("cast")
    out = helper.create_variable_for_type_inference(dtype=target)
    helper.append_op(type="cast", inputs={"X": [x]}, outputs={"Out": [out]},
                     attrs={"in_dtype": x.dtype, "out_dtype": target})
    return out


def _axes(axis, function: str) -> list[int]:
    if is_legacy_variable(axis):
        raise LegacyIRRequiredError(
            f"{function}(): a Variable axis has no legacy-IR form; pass the axes as ints")
    if axis is None:
        return []
    return [int(axis)] if isinstance(axis, int) else [int(a) for a in axis]


def _reduce_attrs(dim_key: str, keep_key: str):
    def attrs(args: dict) -> dict:
        dims = _axes(args["axis"], "reduction")
        reduce_all = not dims or len(dims) == len(args["x"].shape)
        return {dim_key: dims, keep_key: bool(args["keepdim"]), "reduce_all": reduce_all}

    return attrs


def _sum_dtype(args: dict) -> dict:
    """``paddle.sum``: sums in ``dtype`` when given, and bool or int32 input sums in int64."""
    from paddle.base import core

    x, dtype = args["x"], args["dtype"]
    small = (core.VarDesc.VarType.BOOL, core.VarDesc.VarType.INT32)
    if dtype is not None:
        x = _cast(x, dtype)
    elif x.dtype in small:
        x = _cast(x, "int64")
    return {**args, "x": x}


def _no_out(args: dict) -> dict:
    if args.get("out") is not None:
        raise LegacyIRRequiredError(
            "out= has no legacy-IR form; use the returned Variable instead")
    return args


def _arg_attrs(args: dict) -> dict:
    from paddle.base.framework import convert_np_dtype_to_proto_type

    flatten = args["axis"] is None
    dtype = args["dtype"]
    return {"axis": 0 if flatten else int(args["axis"]), "flatten": flatten,
            "keepdims": bool(args["keepdim"]),
            "dtype": int(dtype if _is_var_type(dtype) else convert_np_dtype_to_proto_type(dtype))}


def _median_prepare(args: dict) -> dict:
    """As ``paddle.median``: the average of the two middle values is taken in float32 (or
    float64); ``mode="min"`` takes the lower one, with its index."""
    from paddle.base import core

    if args["mode"] not in ("avg", "min"):
        raise ValueError(f"paddle.median: mode {args['mode']!r} is not supported; use 'avg' "
                         f"or 'min'")
    x = args["x"]
    if args["mode"] == "avg" and x.dtype != core.VarDesc.VarType.FP64:
        x = _cast(x, "float32")
    return {**_no_out(args), "x": x}


def _median_result(args: dict, out, index):
    return (out, index) if args["mode"] == "min" and args["axis"] is not None else out


def _roll_attrs(args: dict) -> dict:
    shifts = args["shifts"]
    return {"shifts": [int(shifts)] if isinstance(shifts, int) else [int(s) for s in shifts],
            "axis": _axes(args["axis"], "roll")}


def _unary(op_type: str, out_dtype: str = "same") -> LegacyOp:
    return LegacyOp(op_type, {"x": _REQUIRED, "name": None}, out_dtype=out_dtype)


def _binary(op_type: str, out_dtype: str = "same", attrs=_no_attrs) -> LegacyOp:
    return LegacyOp(op_type, {"x": _REQUIRED, "y": _REQUIRED, "name": None},
                    {"X": "x", "Y": "y"}, attrs, out_dtype)


def _logical(op_type: str, unary: bool = False) -> LegacyOp:
    params = {"x": _REQUIRED, **({} if unary else {"y": _REQUIRED}), "out": None, "name": None}
    inputs = {"X": "x"} if unary else {"X": "x", "Y": "y"}
    return LegacyOp(op_type, params, inputs, out_dtype="bool", prepare=_no_out)


def _reduction(op_type: str, out_dtype: str = "same") -> LegacyOp:
    return LegacyOp(op_type, {"x": _REQUIRED, "axis": None, "keepdim": False, "name": None},
                    attrs=_reduce_attrs("dim", "keep_dim"), out_dtype=out_dtype)


def _elementwise(args: dict) -> dict:
    return {"axis": -1}  # a new dict each call: Paddle's Operator writes op_role into it


_UNARY = ("abs", "acos", "acosh", "asin", "atanh", "ceil", "cos", "cosh", "exp", "expm1",
          "floor", "log", "log10", "log1p", "log2", "rsqrt", "sigmoid", "sign", "sin", "sinh",
          "sqrt", "tanh")

# Paddle function name -> its legacy op, or, where it has none, what to use instead
LEGACY_OPS: dict[str, LegacyOp | str] = {
    **{name: _unary(name) for name in _UNARY},
    "isnan": _unary("isnan_v2", "bool"),
    "isinf": _unary("isinf_v2", "bool"),
    "isfinite": _unary("isfinite_v2", "bool"),
    "round": LegacyOp("round", {"x": _REQUIRED, "decimals": 0, "name": None},
                      attrs=lambda a: {"decimals": int(a["decimals"])}),
    "multiply": _binary("elementwise_mul", attrs=_elementwise),
    "maximum": _binary("elementwise_max", attrs=_elementwise),
    "minimum": _binary("elementwise_min", attrs=_elementwise),
    "greater_than": _binary("greater_than", "bool"),
    "dot": _binary("dot"),
    "bmm": _binary("bmm"),
    "matmul": LegacyOp("matmul_v2", {"x": _REQUIRED, "y": _REQUIRED, "transpose_x": False,
                                     "transpose_y": False, "name": None},
                       {"X": "x", "Y": "y"},
                       lambda a: {"trans_x": bool(a["transpose_x"]),
                                  "trans_y": bool(a["transpose_y"])}),
    "logical_and": _logical("logical_and"),
    "logical_or": _logical("logical_or"),
    "logical_xor": _logical("logical_xor"),
    "logical_not": _logical("logical_not", unary=True),
    "sum": LegacyOp("reduce_sum", {"x": _REQUIRED, "axis": None, "dtype": None,
                                   "keepdim": False, "name": None},
                    attrs=_reduce_attrs("dim", "keep_dim"), prepare=_sum_dtype),
    "amax": _reduction("reduce_amax"),
    "amin": _reduction("reduce_amin"),
    "all": _reduction("reduce_all", "bool"),
    "any": _reduction("reduce_any", "bool"),
    "logsumexp": LegacyOp("logsumexp", {"x": _REQUIRED, "axis": None, "keepdim": False,
                                        "name": None},
                          attrs=_reduce_attrs("axis", "keepdim")),
    "argmax": LegacyOp("arg_max", {"x": _REQUIRED, "axis": None, "keepdim": False,
                                   "dtype": "int64", "name": None},
                       attrs=_arg_attrs, out_dtype="dtype"),
    "argmin": LegacyOp("arg_min", {"x": _REQUIRED, "axis": None, "keepdim": False,
                                   "dtype": "int64", "name": None},
                       attrs=_arg_attrs, out_dtype="dtype"),
    "tril": LegacyOp("tril_triu", {"x": _REQUIRED, "diagonal": 0, "name": None},
                     attrs=lambda a: {"diagonal": int(a["diagonal"]), "lower": True}),
    "triu": LegacyOp("tril_triu", {"x": _REQUIRED, "diagonal": 0, "name": None},
                     attrs=lambda a: {"diagonal": int(a["diagonal"]), "lower": False}),
    "diagonal": LegacyOp("diagonal", {"x": _REQUIRED, "offset": 0, "axis1": 0, "axis2": 1,
                                      "name": None}, {"Input": "x"},
                         lambda a: {"offset": int(a["offset"]), "axis1": int(a["axis1"]),
                                    "axis2": int(a["axis2"])}),
    "roll": LegacyOp("roll", {"x": _REQUIRED, "shifts": _REQUIRED, "axis": None, "name": None},
                     attrs=_roll_attrs),
    "expand_as": LegacyOp("expand_as_v2", {"x": _REQUIRED, "y": _REQUIRED, "name": None},
                          {"X": "x", "Y": "y"}, lambda a: {"target_shape": list(a["y"].shape)}),
    "isclose": LegacyOp("isclose", {"x": _REQUIRED, "y": _REQUIRED, "rtol": 1e-05,
                                    "atol": 1e-08, "equal_nan": False, "name": None},
                        {"Input": "x", "Other": "y"},
                        lambda a: {"rtol": str(a["rtol"]), "atol": str(a["atol"]),
                                   "equal_nan": bool(a["equal_nan"])}, "bool"),
    "gelu": LegacyOp("gelu", {"x": _REQUIRED, "approximate": False, "name": None},
                     attrs=lambda a: {"approximate": bool(a["approximate"])}),
    "softplus": LegacyOp("softplus", {"x": _REQUIRED, "beta": 1, "threshold": 20,
                                      "name": None},
                         attrs=lambda a: {"beta": float(a["beta"]),
                                          "threshold": float(a["threshold"])}),
    "grid_sample": LegacyOp("grid_sampler", {"x": _REQUIRED, "grid": _REQUIRED,
                                             "mode": "bilinear", "padding_mode": "zeros",
                                             "align_corners": True, "name": None},
                            {"X": "x", "Grid": "grid"},
                            lambda a: {"mode": a["mode"], "padding_mode": a["padding_mode"],
                                       "align_corners": bool(a["align_corners"])},
                            out_slot="Output"),
    "svdvals": LegacyOp("svdvals", {"x": _REQUIRED, "name": None}, {"x": "x"}, out_slot="s"),
    "median": LegacyOp("median", {"x": _REQUIRED, "axis": None, "keepdim": False, "mode": "avg",
                                  "name": None, "out": None}, {"x": "x"},
                       lambda a: {"axis": _axes(a["axis"], "median"),
                                  "keepdim": bool(a["keepdim"]), "mode": a["mode"]},
                       out_slot="out", prepare=_median_prepare, index_slot="medians",
                       result=_median_result),
    "index_put": "paddle.scatter_nd_add or paddle.scatter",
    "index_put_": "paddle.scatter_nd_add or paddle.scatter",
}


def holds_legacy_variable(args: tuple, kwargs: dict) -> bool:
    # runs on every eager call too, hence a plain loop: the wrapper costs an eager paddle.sum
    # of a 4x4 tensor about 1.5 us (3.7 -> 5.1 us; a generator and an import here made it 12)
    for value in args:
        if issubclass(type(value), _VARIABLE):
            return True
    if kwargs:
        for value in kwargs.values():
            if issubclass(type(value), _VARIABLE):
                return True
    return False


def is_legacy_variable(value) -> bool:
    """A legacy static ``Variable``; ``isinstance`` would also say so of an eager Tensor
    (Paddle's metaclass answers for the current mode), ``issubclass`` does not."""
    return issubclass(type(value), _VARIABLE)


def _legacy_aware(name: str, paddle_function: Callable, op: LegacyOp | str) -> Callable:
    def function(*args, **kwargs):
        if not holds_legacy_variable(args, kwargs):
            return paddle_function(*args, **kwargs)
        if isinstance(op, str):
            import paddle

            raise LegacyIRRequiredError(
                f"paddle.{name} has no legacy-IR form in Paddle {paddle.__version__} (it "
                f"takes eager Tensors and PIR Values only), and static QAT builds legacy "
                f"programs; use {op} in this model instead")
        return op.append(f"paddle.{name}", args, kwargs)

    function.__name__ = function.__qualname__ = name
    function.__doc__ = getattr(paddle_function, "__doc__", None)
    function.__wrapped__ = paddle_function
    function._paddle_qat_legacy_op = op
    return function


def _needs_wrapping(value) -> bool:
    """Paddle 3.3's C++ binding, its Python shim, or a Python function that calls the binding
    in every mode: none takes a legacy Variable (Python's own ``sum`` or ``abs`` is a builtin
    too, but not Paddle's)."""
    if getattr(value, "_paddle_qat_legacy_op", None) is not None:
        return False  # already ours
    module = getattr(value, "__module__", None) or ""
    return (module == _PADDLE_SHIMS
            or f"{module}.{getattr(value, '__name__', '')}" in _BINDING_CALLERS
            or (isinstance(value, types.BuiltinFunctionType) and module.startswith("paddle.")))


def _namespaces() -> dict:
    """Where Paddle's functions are looked up: its public modules, ``Variable`` (methods),
    and every other loaded ``paddle.*`` module, whose own code calls the names it imported
    (``F.cosine_similarity`` calls the ``sum`` of ``paddle.nn.functional.common``). Not the
    bindings themselves (``paddle._C_ops``, ``paddle.base.libpaddle``): Paddle's shims and
    eager internals call them, and a second wrapper there would only cost time."""
    import importlib
    import sys

    from paddle.base.framework import Variable

    # by module name: the attribute paddle.tensor is a function (paddle.tensor(data)), while
    # Paddle's own code (nn.MultiHeadAttention) calls the module's tensor.matmul
    found = {name: importlib.import_module(name)
             for name in ("paddle", "paddle.tensor", "paddle.linalg", "paddle.nn.functional")}
    found["Variable"] = Variable
    for name, module in list(sys.modules.items()):
        private = any(part.startswith("_") for part in name.split("."))
        if (name.startswith("paddle.") and not private and isinstance(module, types.ModuleType)
                and not name.startswith("paddle.base.libpaddle") and name not in found):
            found[name] = module
    return found


def wrap_everywhere(names, wrapper_for: Callable) -> list[str]:
    """Wherever Paddle's code or a user's finds them (see :func:`_namespaces`), replace the
    attributes called one of ``names`` for which ``wrapper_for(name, value)`` returns a
    wrapper (None: leave it); returns the dotted names replaced. One wrapper per Paddle
    function, so names that were the same object still are."""
    wrappers: dict[int, Callable] = {}
    wrapped = []
    for label, namespace in _namespaces().items():
        attributes = vars(namespace)
        for name in names:
            current = attributes.get(name)
            if current is None:
                continue
            wrapper = wrappers.get(id(current)) or wrapper_for(name, current)
            if wrapper is None:
                continue
            wrappers[id(current)] = wrapper
            setattr(namespace, name, wrapper)
            wrapped.append(f"{label}.{name}")
    return wrapped


def install() -> list[str]:
    """Wrap every function of :data:`LEGACY_OPS` that Paddle left without a legacy-IR form
    (see :func:`wrap_everywhere`); returns the dotted names wrapped (none on a repeat call)."""
    from paddle.base.framework import Variable

    global _VARIABLE
    _VARIABLE = Variable
    return wrap_everywhere(LEGACY_OPS, lambda name, value: _legacy_aware(
        name, value, LEGACY_OPS[name]) if _needs_wrapping(value) else None)
