"""The operators' bodies, their run-time checks and their registration with the bridge.

Operators never raise (an exception escaping a Python operator terminates the process):
they record the error for `BitLinearSession.run` and return NaNs.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from kernels import packing
from kernels.bf16 import linear_bf16
from kernels.bitlinear import Prepared, bitlinear
from kernels.ort.registry import _bound, _entries

DOMAIN = "ai.tdpu"
OP_TYPE = "BitLinear"
PREPACKED_OP_TYPE = "BitLinearPrepacked"
BOUND_OP_TYPE = "BitLinearBound"
BF16_OP_TYPE = "LinearBF16"
BF16_PREPACKED_OP_TYPE = "LinearBF16Prepacked"
KEY_SUFFIX = "/tdpu_weight_key"


class BitLinearError(ValueError):
    """A BitLinear node does not match the operator's contract; the message names the node."""



_lock = threading.RLock()
_log = logging.getLogger("kernels.ort")
_pending: dict[int, BitLinearError] = {}       # thread id -> error raised inside an operator


def _check_x(where: str, x: np.ndarray, k: int) -> None:
    if x.ndim == 0 or x.shape[-1] != k:
        raise BitLinearError(f"{where}: X has shape {list(x.shape)}, its last dimension must equal "
                             f"in_features = {k}")


def _check_call(where: str, x: np.ndarray, k: int, n: int, w_shape, layout: str) -> None:
    if layout not in packing.LAYOUTS:
        raise BitLinearError(f"{where}: unknown layout {layout!r}, expected one of {packing.LAYOUTS}")
    _check_x(where, x, k)
    if tuple(w_shape) != (n // 4, k) or n % 4:
        raise BitLinearError(f"{where}: W has shape {list(w_shape)}, expected [out_features/4, "
                             f"in_features] = [{n / 4:g}, {k}]")


def _failed(where: str, exc: Exception, x: np.ndarray, n: int) -> np.ndarray:
    """Record a failure for the calling `run` and return a NaN output.

    An exception escaping a Python operator terminates the process (onnxruntime-extensions
    rethrows it across the C API), so the operator never raises: sessions made by
    `create_session` re-raise the recorded error from `run`; plain sessions get NaNs and
    a log record.
    """
    err = exc if isinstance(exc, BitLinearError) else BitLinearError(f"{where}: {exc}")
    _pending[threading.get_ident()] = err
    _log.error("%s", str(err))   # the text: a handler keeping records keeps no session alive
    shape = (x.shape[:-1] if x.ndim else ()) + (max(int(n), 0),)
    return np.full(shape, np.nan, np.float32)


def _bitlinear_op(x, w, weight_scale, in_features, out_features, layout):
    where = (f"BitLinear node (in_features={in_features}, out_features={out_features}, "
             f"layout={layout!r})")
    try:
        _check_call(where, x, in_features, out_features, w.shape, layout)
        return bitlinear(x, w, weight_scale, layout)
    except Exception as exc:
        return _failed(where, exc, x, out_features)


def _registered_weight(key: np.ndarray, where: str, op_type: str) -> np.ndarray:
    """The registry's array under the one-element `key` input of a prepacked node."""
    entry = _entries.get(int(key.reshape(-1)[0])) if key.size == 1 else None
    if entry is None:
        raise BitLinearError(f"{where}: no prepacked weight under key {key.tolist()}; graphs holding "
                             f"{op_type} must run in a session made by kernels.ort.create_session in "
                             "this process")
    return entry.packed


def _prepacked_op(x, key, weight_scale, in_features, out_features, layout, node_name):
    where = f"BitLinear node {node_name!r}"
    try:
        packed = _registered_weight(key, where, PREPACKED_OP_TYPE)
        _check_call(where, x, in_features, out_features, packed.shape, layout)
        return bitlinear(x, packed, weight_scale, layout)
    except Exception as exc:
        return _failed(where, exc, x, out_features)


def _bound_op(x, key):
    node = _bound.get(int(key.item())) if key.size == 1 else None
    try:
        if node is None:
            raise BitLinearError(f"no bound BitLinear node under key {key.tolist()}; graphs holding "
                                 f"{BOUND_OP_TYPE} must run in a session made by "
                                 "kernels.ort.create_session in this process")
        if x.ndim == 0 or x.shape[-1] != node.in_features:
            _check_x(f"BitLinear node {node.name!r}", x, node.in_features)
        call = node.call
        if call is None:        # its errors, as the product's, name the node (except below)
            call = node.call = Prepared(node.packed, node.scale, node.layout)
        y = call(x)
        if node.columns is not None:        # fused nodes' own scales: float32, as the kernel's
            np.multiply(y, node.columns, out=y)
        return y
    except Exception as exc:
        where = f"BitLinear node {node.name!r}" if node is not None else "BitLinear node"
        return _failed(where, exc, x, node.out_features if node is not None else 0)


def _prepacked_bf16_op(x, key, in_features, out_features, node_name):
    where = f"LinearBF16 node {node_name!r}"
    try:
        w = _registered_weight(key, where, BF16_PREPACKED_OP_TYPE)
        _check_x(where, x, in_features)
        if tuple(w.shape) != (out_features, in_features):
            raise BitLinearError(f"{where}: W has shape {list(w.shape)}, expected [out_features, "
                                 f"in_features] = [{out_features}, {in_features}]")
        return linear_bf16(x, w)
    except Exception as exc:
        return _failed(where, exc, x, out_features)


_registered = False


def _register() -> None:
    """Register both operators and the array-returning hook, once per process."""
    global _registered
    with _lock:
        if _registered:
            return
        from onnxruntime_extensions import PyCustomOpDef, _ocos, onnx_op

        known = {od.op_type for od in _ocos.Opdef._odlist.values()}
        dt = PyCustomOpDef
        attrs = {"in_features": dt.dt_int64, "out_features": dt.dt_int64, "layout": dt.dt_string}
        if f"{DOMAIN}::{OP_TYPE}" not in known:
            onnx_op(op_type=f"{DOMAIN}::{OP_TYPE}",
                    inputs=[dt.dt_float, dt.dt_uint8, dt.dt_float], outputs=[dt.dt_float],
                    attrs=attrs)(_bitlinear_op)
        if f"{DOMAIN}::{PREPACKED_OP_TYPE}" not in known:
            onnx_op(op_type=f"{DOMAIN}::{PREPACKED_OP_TYPE}",
                    inputs=[dt.dt_float, dt.dt_int64, dt.dt_float], outputs=[dt.dt_float],
                    attrs={**attrs, "node_name": dt.dt_string})(_prepacked_op)
        if f"{DOMAIN}::{BOUND_OP_TYPE}" not in known:
            onnx_op(op_type=f"{DOMAIN}::{BOUND_OP_TYPE}",
                    inputs=[dt.dt_float, dt.dt_int64], outputs=[dt.dt_float])(_bound_op)
        bf16_attrs = {"in_features": dt.dt_int64, "out_features": dt.dt_int64}
        # LinearBF16 itself is not registered: the bridge aborts the process on a bfloat16
        # input. It runs only as LinearBF16Prepacked, its W moved out by create_session.
        if f"{DOMAIN}::{BF16_PREPACKED_OP_TYPE}" not in known:
            onnx_op(op_type=f"{DOMAIN}::{BF16_PREPACKED_OP_TYPE}",
                    inputs=[dt.dt_float, dt.dt_int64], outputs=[dt.dt_float],
                    attrs={**bf16_attrs, "node_name": dt.dt_string})(_prepacked_bf16_op)
        ours = {k: od for k, od in _ocos.Opdef._odlist.items() if od.op_type.startswith(f"{DOMAIN}::")}
        default = _ocos._on_pyop_invocation
        # The bridge passes attributes as strings on every call; casting them took 4 us of a
        # 30 us call, so each node's cast attributes are kept (a few hundred nodes at most).
        cast: dict[tuple, dict] = {}

        bound = next((k for k, od in ours.items() if od.op_type == f"{DOMAIN}::{BOUND_OP_TYPE}"), None)

        def invoke(k_id, feed, attributes):
            if k_id == bound:       # a decode step's ~200 crossings: no attributes to cast
                y = _bound_op(*feed)
                return (k_id, y.shape, y.reshape(-1))   # float32, C-contiguous
            op = ours.get(k_id)
            if op is None:
                return default(k_id, feed, attributes)
            key = (k_id, *attributes.values())
            attrs = cast.get(key)
            if attrs is None:
                if len(cast) > 4096:
                    cast.clear()
                # ONNX Runtime has checked the attribute types when it built the session.
                attrs = cast[key] = op.cast_attributes(attributes)
            y = op.body(*feed, **attrs)
            return (k_id, y.shape, np.ascontiguousarray(y, dtype=np.float32).reshape(-1))

        PyCustomOpDef.install_hooker(invoke)
        _registered = True
