r"""`ai.tdpu::BitLinear` in ONNX Runtime, its body the numba kernel of `kernels.bitlinear`.

The operator (docs/spec.md §5): inputs X float32 [..., K], W uint8 [N/4, K] (initializer),
weight_scale float32 [1]; output float32 [..., N]; attributes in_features (K),
out_features (N), layout ("tdpu" | "hf").

It is a Python operator of onnxruntime-extensions. That bridge copies every input into a
fresh NumPy array on every call, so a plain session would copy each packed weight matrix
(4.4 MB for 2560 -> 6912) per call. `create_session` keeps the weights out of that copy:

    model file (self-contained)              in-memory graph given to ONNX Runtime
    --------------------------------         --------------------------------------------------
    X ----------------\                      X -----------------\
    W (uint8 init.) ---> BitLinear    ==>    key (int64 [1]) ----> BitLinearBound ---> Y
    weight_scale -----/                      (W, scale, shape, layout, name under the key)

`create_session` loads the model, checks every BitLinear node (dtypes, shapes, attributes,
reserved codes; errors name the node), moves each W initializer into a process-wide
registry of packed weights (keyed by a small integer; identical weights share one entry,
found by a content digest), and rewrites the node into `ai.tdpu::BitLinearBound(X, key)`,
the key naming the node's weight entry, its constant weight_scale, shape, layout and name
(no attributes, no third input: each costs the bridge work on every call). A node whose
weight_scale is computed at run time becomes `ai.tdpu::BitLinearPrepacked(X, key,
weight_scale)` with its attributes and a `node_name`. Bound nodes that read the same X (a
layer's q, k, v; its gate, up) then become one bound node over their stacked weights and a
Split, each node's scale applied per output column: one bridge crossing per group, bit-identical outputs
(`kernels.ort.prepack`; `create_session(..., fuse=False)` keeps them apart). The file on
disk is not touched and still carries W.
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

The package keeps its seams apart (`kernels.ort.<module>`):

    registry   the process-wide registry of prepacked weights (keys, reference counts)
    ops        the operators' bodies, their checks, their registration with the bridge
    prepack    the graph rewrite: check each node, move its W into the registry, fuse
    session    session_options, create_session, BitLinearSession

`session_options()` alone also runs BitLinear graphs (W then travels through the
per-call copy). Python operators are registered once per process; importing or
calling this module again does not register them twice.
"""

from kernels.ort.ops import (
                             BF16_OP_TYPE,
                             BF16_PREPACKED_OP_TYPE,
                             BOUND_OP_TYPE,
                             DOMAIN,
                             KEY_SUFFIX,
                             OP_TYPE,
                             PREPACKED_OP_TYPE,
                             BitLinearError,
)
from kernels.ort.prepack import _rewrite
from kernels.ort.registry import _acquire, _entries, _release, cache_info
from kernels.ort.session import BitLinearSession, create_session, session_options

__all__ = [
                             "BF16_OP_TYPE",
                             "BF16_PREPACKED_OP_TYPE",
                             "BOUND_OP_TYPE",
                             "DOMAIN",
                             "KEY_SUFFIX",
                             "OP_TYPE",
                             "PREPACKED_OP_TYPE",
                             "BitLinearError",
                             "BitLinearSession",
                             "_acquire",
                             "_entries",
                             "_release",
                             "_rewrite",
                             "cache_info",
                             "create_session",
                             "session_options",
]
