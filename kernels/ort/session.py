"""Sessions: `session_options` (the operators registered, spinning off) and `create_session`
(weights prepacked into the registry, errors recorded by operators re-raised from `run`).
"""

from __future__ import annotations

import _signal
import signal
import threading
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto

from kernels.ort.ops import _pending, _register
from kernels.ort.prepack import _rewrite
from kernels.ort.registry import _release


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


def _defer_sigint() -> _Deferred | None:
    """Hold Ctrl-C while ONNX Runtime runs a graph with Python operators; undo with `_restore`.

    Python runs its SIGINT handler at the next bytecode, which during `run` is inside an
    operator called from C++: the KeyboardInterrupt crossing that boundary terminates the
    process (pybind11::error_already_set, exit 134). In the main thread the signal is noted
    instead and delivered (to the previous handler, by default as KeyboardInterrupt) when
    `run` returns; a second Ctrl-C goes to the previous handler at once. Other threads cannot
    take signals and run as they are (None).

    Through `_signal`, the C module under `signal`: the latter's enum conversions cost ~7.5 us
    of every run (getsignal 1.9, each signal 2.8; the C functions 0.03 and 0.2), and both take
    and return the same values.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = _signal.getsignal(_SIGINT)
    if previous is None:                # installed outside Python: leave it alone
        return None
    deferred = _Deferred(previous)
    try:
        _signal.signal(_SIGINT, deferred.handle)
    except (ValueError, TypeError):     # no signals here (embedded interpreter)
        return None
    return deferred


def _restore(deferred: _Deferred | None) -> None:
    if deferred is not None:
        _signal.signal(_SIGINT, deferred.previous)


_SIGINT = int(signal.SIGINT)


class BitLinearSession(onnxruntime.InferenceSession):
    """An InferenceSession whose `run` raises the BitLinearError an operator recorded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tdpu_plan_direct()

    def _checked(self, call, *args, **kwargs):
        me = threading.get_ident()
        _pending.pop(me, None)
        interrupted = _defer_sigint()
        try:
            result = call(*args, **kwargs)
        except Exception as exc:
            failure: BaseException | None = exc
        else:
            failure = None
        finally:
            _restore(interrupted)
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

    def _tdpu_plan_direct(self) -> None:
        """Whether `run` may call the C++ session itself: on the CPU provider alone (no EP
        fallback to take), with the outputs and required inputs known. `InferenceSession.run`
        first validates in Python what the C++ side checks again (graph capture, OrtValue
        ownership, input names): 28 us of a 2560 -> 6912 decode call's 70 us bridge cost,
        its code cold after every weight stream."""
        sess = getattr(self, "_sess", None)
        self._tdpu_direct = (callable(getattr(sess, "run", None))
                             and list(self.get_providers()) == ["CPUExecutionProvider"])
        self._tdpu_outputs = [o.name for o in self.get_outputs()]
        self._tdpu_required = frozenset(i.name for i in self.get_inputs()
                                        if not i.type.startswith("optional"))

    def set_providers(self, *args, **kwargs):
        self._tdpu_direct = False
        super().set_providers(*args, **kwargs)
        self._tdpu_plan_direct()

    def run(self, output_names, input_feed, run_options=None):
        if (self._tdpu_direct and type(input_feed) is dict and run_options is None
                and self._tdpu_required.issubset(input_feed)
                and all(type(v) is np.ndarray for v in input_feed.values())):
            # numpy arrays, all required names present: what the Python checks pass
            return self._checked(self._sess.run, output_names or self._tdpu_outputs, input_feed,
                                 None)
        return self._checked(super().run, output_names, input_feed, run_options)

    def run_with_ort_values(self, output_names, input_dict_ort_values, run_options=None):
        return self._checked(super().run_with_ort_values, output_names, input_dict_ort_values, run_options)


def create_session(model_or_path, providers=None, threads: int | None = None, fuse: bool = True
                   ) -> BitLinearSession:
    """InferenceSession for a graph that may contain `ai.tdpu::BitLinear` (see module doc).

    `model_or_path`: a path (only the BitLinear weights are read; other external data stays
    on disk and ONNX Runtime reads it from the model's directory), serialized bytes, or an
    onnx.ModelProto (copied, not modified; it must serialize below protobuf's 2 GB once the
    BitLinear weights are out, so pass large models by path). `threads`: ONNX Runtime
    intra-op threads. `fuse`: BitLinear nodes that read the same X (a layer's q, k, v; its
    gate, up) run as one kernel call each group, bit-identical (`kernels.ort.prepack`).
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
    keys = _rewrite(model, base_dir, shared, fuse)
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
