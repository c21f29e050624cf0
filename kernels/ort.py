r"""`ai.tdpu::BitLinear` in ONNX Runtime, its body the numba kernel of `kernels.bitlinear`.

The operator (SPEC section 5): inputs X float32 [..., K], W uint8 [N/4, K] (initializer),
weight_scale float32 [1]; output float32 [..., N]; attributes in_features (K),
out_features (N), layout ("tdpu" | "hf").

It is a Python operator of onnxruntime-extensions. That bridge copies every input into a
fresh NumPy array on every call, so a plain session would copy each packed weight matrix
(4.4 MB for 2560 -> 6912) per call. `create_session` keeps the weights out of that copy:

    model file (self-contained)              in-memory graph given to ONNX Runtime
    --------------------------------         --------------------------------------------------
    X ----------------\                      X -----------------\
    W (uint8 init.) ---> BitLinear    ==>    key (int64 [1]) ----> BitLinearPrepacked ---> Y
    weight_scale -----/                      weight_scale ------/    (+ attribute node_name)

`create_session` loads the model, checks every BitLinear node (dtypes, shapes, attributes,
reserved codes; errors name the node), moves each W initializer into a process-wide
registry of packed weights (keyed by a small integer; identical weights share one entry,
found by a content digest), and rewrites the node into `ai.tdpu::BitLinearPrepacked`,
whose second input is the key. The file on disk is not touched and still carries W.
Registry entries are reference-counted by the sessions that use them and dropped when
the last such session is garbage-collected.

The bridge also returns outputs to ONNX Runtime as a Python list (`tolist()`) by default;
this module installs an invocation hook that hands the NumPy array over instead for its
own operators (other Python operators keep the default path).

An exception leaving a Python operator terminates the process (the bridge rethrows it
across the C API), so the operators never raise: they record the error and return NaNs,
and `BitLinearSession.run` (what `create_session` returns) raises it as BitLinearError
naming the node. Plain sessions only get the NaNs and a log record.

The same goes for `ai.tdpu::LinearBF16` (X float32 [..., K], W bfloat16 [N, K] initializer,
attributes in_features, out_features; Y = X @ W.T in float32, `kernels.bf16`): the tied lm_head
kept at the checkpoint's precision. `create_session` moves its W (0.66 GB at 2B4T shapes)
into the registry and rewrites the node into `ai.tdpu::LinearBF16Prepacked`.

`session_options()` alone also runs BitLinear graphs (W then travels through the
per-call copy). Python operators are registered once per process; importing or
calling this module again does not register them twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import signal
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, numpy_helper

from kernels import packing
from kernels.bf16 import linear_bf16
from kernels.bitlinear import bitlinear, check_packed

DOMAIN = "ai.tdpu"
OP_TYPE = "BitLinear"
PREPACKED_OP_TYPE = "BitLinearPrepacked"
BF16_OP_TYPE = "LinearBF16"
BF16_PREPACKED_OP_TYPE = "LinearBF16Prepacked"
KEY_SUFFIX = "/tdpu_weight_key"


class BitLinearError(ValueError):
    """A BitLinear node does not match the operator's contract; the message names the node."""


# ----------------------------------------------------------------------------- registry

@dataclass
class _Entry:
    packed: np.ndarray
    digest: str
    refs: int = 0


_lock = threading.RLock()
_log = logging.getLogger(__name__)
_pending: dict[int, BitLinearError] = {}       # thread id -> error raised inside an operator
_entries: dict[int, _Entry] = {}
_by_digest: dict[str, int] = {}
_next_key = 1


def _acquire(packed: np.ndarray) -> int:
    global _next_key
    packed = np.ascontiguousarray(packed)
    h = hashlib.blake2b(repr((packed.dtype.str, packed.shape)).encode(), digest_size=16)
    h.update(packed)
    digest = h.hexdigest()
    with _lock:
        key = _by_digest.get(digest)
        if key is None:
            key = _next_key
            _next_key += 1
            _entries[key] = _Entry(packed, digest)
            _by_digest[digest] = key
        _entries[key].refs += 1
        return key


def _release(keys: list[int]) -> None:
    with _lock:
        for key in keys:
            entry = _entries.get(key)
            if entry is None:
                continue
            entry.refs -= 1
            if entry.refs <= 0:
                del _entries[key]
                _by_digest.pop(entry.digest, None)


def cache_info() -> dict:
    """Prepacked weights held for live sessions: {"entries", "bytes"}."""
    with _lock:
        return {"entries": len(_entries),
                "bytes": int(sum(e.packed.nbytes for e in _entries.values()))}


# ----------------------------------------------------------------------------- operators

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
    _log.error("%s", err)
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
        from onnxruntime_extensions import PyCustomOpDef, onnx_op
        from onnxruntime_extensions import _ocos

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

        def invoke(k_id, feed, attributes):
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


def session_options(threads: int | None = None) -> onnxruntime.SessionOptions:
    """SessionOptions on which `ai.tdpu::BitLinear` runs (W copied on every call)."""
    from onnxruntime_extensions import get_library_path

    _register()
    so = onnxruntime.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    # While the Python operator runs, numba's threads need the cores; ORT's idle workers
    # would otherwise busy-wait on them after each ORT op.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    return so


# ----------------------------------------------------------------------------- graph rewrite

_DTYPE_NAMES = {v: k for k, v in TensorProto.DataType.items()}


def attr(node: onnx.NodeProto, name: str, kind: str, where: str):
    for a in node.attribute:
        if a.name == name:
            if kind == "int" and a.type == onnx.AttributeProto.INT:
                return int(a.i)
            if kind == "string" and a.type == onnx.AttributeProto.STRING:
                return a.s.decode()
            raise BitLinearError(f"{where}: attribute {name!r} must be {kind}, found "
                                 f"{onnx.AttributeProto.AttributeType.Name(a.type)}")
    raise BitLinearError(f"{where}: missing attribute {name!r} ({kind})")


def _static_last_dims(graph: onnx.GraphProto) -> dict[str, int]:
    dims: dict[str, int] = {}
    for vi in list(graph.input) + list(graph.value_info):
        if vi.type.HasField("tensor_type"):
            shape = vi.type.tensor_type.shape.dim
            if shape and shape[-1].HasField("dim_value"):
                dims[vi.name] = int(shape[-1].dim_value)
    return dims


def _rewrite_bf16(node: onnx.NodeProto, index: int, inits: dict, last_dims: dict,
                  base_dir: str | None, keys: list[int], graph: onnx.GraphProto) -> str:
    """Check one LinearBF16 node and move its W into the registry; return W's name if moved."""
    where = f"LinearBF16 node {node.name or f'#{index}'!r}"
    k = attr(node, "in_features", "int", where)
    n = attr(node, "out_features", "int", where)
    if len(node.input) != 2:
        raise BitLinearError(f"{where}: expected 2 inputs (X, W), found {len(node.input)}")
    x_name, w_name = node.input
    last = last_dims.get(x_name)
    if last is not None and last != k:
        raise BitLinearError(f"{where}: X {x_name!r} has last dimension {last}, in_features is {k}")
    w_init = inits.get(w_name)
    if w_init is None:
        raise BitLinearError(f"{where}: W {w_name!r} must be an initializer (a bfloat16 weight "
                             "cannot be passed through the Python operator bridge)")
    if w_init.data_type != TensorProto.BFLOAT16:
        raise BitLinearError(f"{where}: W {w_name!r} is {_DTYPE_NAMES.get(w_init.data_type)}, "
                             "expected BFLOAT16")
    if tuple(w_init.dims) != (n, k):
        raise BitLinearError(f"{where}: W {w_name!r} has shape {list(w_init.dims)}, expected "
                             f"[out_features, in_features] = [{n}, {k}]")
    w = np.ascontiguousarray(numpy_helper.to_array(w_init, base_dir or "")).view(np.uint16)
    key = _acquire(w)
    keys.append(key)
    _use_key(graph, node, index, w_name, key, BF16_PREPACKED_OP_TYPE)
    return w_name


def _use_key(graph: onnx.GraphProto, node: onnx.NodeProto, index: int, w_name: str, key: int,
             op_type: str) -> None:
    """Point `node` at registry entry `key` instead of initializer `w_name`."""
    key_name = f"{w_name}{KEY_SUFFIX}/{index}"
    graph.initializer.append(numpy_helper.from_array(np.array([key], np.int64), key_name))
    node.op_type = op_type
    node.input[1] = key_name
    node.attribute.append(onnx.helper.make_attribute("node_name", node.name or f"#{index}"))


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names the subgraphs of `node` (If/Loop/Scan bodies) read from the outer scope."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for inner in sub.node:
                names.update(i for i in inner.input if i)
                names |= _subgraph_reads(inner)
    return names


def _rewrite(model: onnx.ModelProto, base_dir: str | None,
             shared: dict[str, np.ndarray] | None = None) -> list[int]:
    """Check every BitLinear node, prepack W, rewrite in place; return the registry keys taken.

    `shared` (when given) receives the external-data weights that other nodes still read (a
    tied bf16 table: LinearBF16 and the embedding Gather): the caller hands ONNX Runtime the
    registry's array for them instead of a second copy read from disk.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
        for name in _subgraph_reads(node):     # an If/Loop body reading W keeps it alive
            uses[name] = uses.get(name, 0) + 1
    for out in graph.output:
        uses[out.name] = uses.get(out.name, 0) + 1
    last_dims = _static_last_dims(graph)
    keys: list[int] = []
    drop: set[str] = set()
    try:
        for index, node in enumerate(graph.node):
            if node.domain == DOMAIN and node.op_type == BF16_OP_TYPE:
                w_name = _rewrite_bf16(node, index, inits, last_dims, base_dir, keys, graph)
                uses[w_name] -= 1
                if uses[w_name] == 0:
                    drop.add(w_name)
                elif shared is not None and inits[w_name].data_location == TensorProto.EXTERNAL:
                    shared[w_name] = _entries[keys[-1]].packed
                continue
            if node.domain != DOMAIN or node.op_type != OP_TYPE:
                continue
            where = f"BitLinear node {node.name or f'#{index}'!r}"
            k = attr(node, "in_features", "int", where)
            n = attr(node, "out_features", "int", where)
            layout = attr(node, "layout", "string", where)
            if layout not in packing.LAYOUTS:
                raise BitLinearError(f"{where}: unknown layout {layout!r}, expected one of {packing.LAYOUTS}")
            if len(node.input) != 3:
                raise BitLinearError(f"{where}: expected 3 inputs (X, W, weight_scale), found {len(node.input)}")
            x_name, w_name, s_name = node.input
            last = last_dims.get(x_name)
            if last is not None and last != k:
                raise BitLinearError(f"{where}: X {x_name!r} has last dimension {last}, "
                                     f"in_features is {k}")
            if s_name in inits:
                st = inits[s_name]
                if st.data_type != TensorProto.FLOAT:
                    raise BitLinearError(f"{where}: weight_scale {s_name!r} is "
                                         f"{_DTYPE_NAMES.get(st.data_type)}, expected FLOAT")
            w_init = inits.get(w_name)
            if w_init is None:
                continue  # W computed or fed at run time: the plain operator checks it per call
            if w_init.data_type != TensorProto.UINT8:
                raise BitLinearError(f"{where}: W {w_name!r} is {_DTYPE_NAMES.get(w_init.data_type)}, "
                                     "expected UINT8 packed ternary codes")
            dims = tuple(w_init.dims)
            if n % 4 or dims != (n // 4, k):
                raise BitLinearError(f"{where}: W {w_name!r} has shape {list(dims)}, expected "
                                     f"[out_features/4, in_features] = [{n / 4:g}, {k}]")
            w = numpy_helper.to_array(w_init, base_dir or "")
            try:
                check_packed(w, layout, f"{where}: W {w_name!r}")
            except packing.PackingError as exc:
                raise BitLinearError(str(exc)) from exc
            key = _acquire(w)
            keys.append(key)
            _use_key(graph, node, index, w_name, key, PREPACKED_OP_TYPE)
            uses[w_name] -= 1
            if uses[w_name] == 0:
                drop.add(w_name)
    except BaseException:
        _release(keys)
        raise
    if drop:
        kept = [t for t in graph.initializer if t.name not in drop]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        # An initializer may also be listed as a graph input (keep_initializers_as_inputs).
        inputs = [v for v in graph.input if v.name not in drop]
        del graph.input[:]
        graph.input.extend(inputs)
    if shared:
        for name in [n for n in shared if n in drop]:
            del shared[name]
    return keys


class _Deferred:
    """A SIGINT that arrived during `run`, delivered once ONNX Runtime has returned."""

    def __init__(self, previous):
        self.previous = previous
        self.frame = None
        self.hit = False

    def __bool__(self) -> bool:
        return self.hit

    def handle(self, signum, frame) -> None:
        if self.hit:
            # A second Ctrl-C: the user insists. Hand it to the previous handler now (what
            # happens inside an operator is then ONNX Runtime's business).
            signal.signal(signal.SIGINT, self.previous)
            self.deliver_to_previous(frame)
            return
        self.hit, self.frame = True, frame

    def deliver(self) -> None:
        self.deliver_to_previous(self.frame)

    def deliver_to_previous(self, frame) -> None:
        if callable(self.previous):
            self.previous(signal.SIGINT, frame)
        elif self.previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)       # the default action, with the default restored
        elif self.previous != signal.SIG_IGN:
            raise KeyboardInterrupt


@contextlib.contextmanager
def _sigint_deferred():
    """Hold Ctrl-C while ONNX Runtime runs a graph with Python operators.

    Python runs its SIGINT handler at the next bytecode, which during `run` is inside an
    operator called from C++: the KeyboardInterrupt crossing that boundary terminates the
    process (pybind11::error_already_set, exit 134). In the main thread the signal is noted
    instead and delivered (to the previous handler, by default as KeyboardInterrupt) when
    `run` returns; a second Ctrl-C goes to the previous handler at once. Other threads cannot
    take signals and run as they are.
    """
    if threading.current_thread() is not threading.main_thread():
        yield _Deferred(None)
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:                # installed outside Python: leave it alone
        yield _Deferred(None)
        return
    deferred = _Deferred(previous)
    try:
        signal.signal(signal.SIGINT, deferred.handle)
    except (ValueError, TypeError):     # no signals here (embedded interpreter)
        yield _Deferred(None)
        return
    try:
        yield deferred
    finally:
        signal.signal(signal.SIGINT, previous)


class BitLinearSession(onnxruntime.InferenceSession):
    """An InferenceSession whose `run` raises the BitLinearError an operator recorded."""

    def _checked(self, call, *args, **kwargs):
        me = threading.get_ident()
        _pending.pop(me, None)
        with _sigint_deferred() as interrupted:
            try:
                result = call(*args, **kwargs)
            except Exception as exc:
                failure: BaseException | None = exc
            else:
                failure = None
        err = _pending.pop(me, None)
        if interrupted:                 # Ctrl-C during the run wins over what it caused
            interrupted.deliver()
        if failure is not None:
            if err is not None:
                raise err from failure
            raise failure
        if err is not None:
            raise err
        return result

    def run(self, output_names, input_feed, run_options=None):
        return self._checked(super().run, output_names, input_feed, run_options)

    def run_with_ort_values(self, output_names, input_dict_ort_values, run_options=None):
        return self._checked(super().run_with_ort_values, output_names, input_dict_ort_values, run_options)


def create_session(model_or_path, providers=None, threads: int | None = None
                   ) -> BitLinearSession:
    """InferenceSession for a graph that may contain `ai.tdpu::BitLinear` (see module doc).

    `model_or_path`: a path (only the BitLinear weights are read; other external data stays
    on disk and ONNX Runtime reads it from the model's directory), serialized bytes, or an
    onnx.ModelProto (copied, not modified; it must serialize below protobuf's 2 GB once the
    BitLinear weights are out, so pass large models by path). `threads`: ONNX Runtime
    intra-op threads.
    """
    base_dir = None
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
    elif isinstance(model_or_path, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(model_or_path))
    else:
        path = Path(model_or_path)
        model = onnx.load(str(path), load_external_data=False)
        base_dir = str(path.resolve().parent)
    shared: dict[str, np.ndarray] = {}
    keys = _rewrite(model, base_dir, shared)
    so = session_options(threads)
    # A tied bf16 table read by LinearBF16 and by a Gather: ONNX Runtime uses the registry's
    # array for the Gather instead of loading a second copy (0.66 GB at 2B4T shapes).
    values = [onnxruntime.OrtValue.ortvalue_from_numpy_with_onnx_type(a, TensorProto.BFLOAT16)
              for a in shared.values()]
    for name, value in zip(shared, values, strict=True):
        so.add_initializer(name, value)   # used in place (add_external_initializers copies)
    if base_dir:
        # Initializers still stored as external data are read from the model's directory.
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", base_dir)
    try:
        session = BitLinearSession(model.SerializeToString(), so,
                                   providers=providers or ["CPUExecutionProvider"])
    except BaseException:
        _release(keys)
        raise
    session._tdpu_shared = values   # ONNX Runtime does not own that memory: keep it alive
    weakref.finalize(session, _release, keys)
    return session
