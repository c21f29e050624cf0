"""The peer graph: BitLinear lowered to ONNX Runtime's own `com.microsoft::MatMulNBits`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from kernels.packing import unpack
from tdpu_tui.engine.graph.external import placeholder_tensor, save_streamed, tensor_bytes
from tdpu_tui.engine.graph.index import GraphIndex
from tdpu_tui.engine.rewrite.inventory import BITLINEAR_DOMAIN, bitlinear_attrs


NBITS_DOMAIN = "com.microsoft"



NBITS_BLOCK = 128



def nbits_block_size(k: int) -> int:
    return next((b for b in (NBITS_BLOCK, 64, 32, 16) if k % b == 0), 16)



def nbits_pack(w: np.ndarray, block: int) -> np.ndarray:
    """int8 [N, K] ternary -> MatMulNBits B uint8 [N, ceil(K/block), block/4] (code w + 2)."""
    n, k = w.shape
    blocks = -(-k // block)
    codes = np.full((n, blocks * block), 2, np.uint8)     # padding decodes to 0
    codes[:, :k] = (w + 2).astype(np.uint8)
    c = codes.reshape(n, blocks, block // 4, 4)
    return (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).astype(np.uint8)



def lower_to_matmulnbits(src: Path, dst: Path) -> int:
    """Write `dst` (+ .data): `src` with every BitLinear as MatMulNBits. Returns projection bytes."""
    g = GraphIndex.load(src)
    model = onnx.ModelProto()
    model.CopyFrom(g.model)
    lazy: dict[str, Callable[[], np.ndarray]] = {}
    new_inits: list[onnx.TensorProto] = []
    drop: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    total = 0
    for node in g.graph.node:
        if node.op_type != "BitLinear" or node.domain != BITLINEAR_DOMAIN:
            nodes.append(node)
            continue
        x, wname, sname = node.input
        k, n, layout = bitlinear_attrs(node)
        block = nbits_block_size(k)
        blocks = -(-k // block)
        bname, cname = f"{wname}.nbits", f"{wname}.nbits_scales"

        def packed(wname=wname, layout=layout, block=block) -> np.ndarray:
            return nbits_pack(unpack(np.asarray(g.array(wname)), layout), block)

        def scales(sname=sname, count=n * blocks) -> np.ndarray:
            return np.full(count, g.scalar(sname), np.float32)

        lazy[bname], lazy[cname] = packed, scales
        new_inits += [placeholder_tensor(bname, onnx.TensorProto.UINT8, [n, blocks, block // 4]),
                      placeholder_tensor(cname, onnx.TensorProto.FLOAT, [n * blocks])]
        total += n * blocks * block // 4 + 4 * n * blocks
        drop |= {wname, sname}
        nodes.append(helper.make_node("MatMulNBits", [x, bname, cname], list(node.output),
                                      name=node.name.replace("/BitLinear", "/MatMulNBits"),
                                      domain=NBITS_DOMAIN, K=k, N=n, bits=2, block_size=block,
                                      accuracy_level=4))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    keep = [t for t in g.graph.initializer if t.name not in drop] + new_inits
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    # The ai.tdpu import goes with the BitLinear nodes, unless another of its ops stays
    # (LinearBF16: an lm_head held in bf16).
    still_tdpu = any(n.domain == BITLINEAR_DOMAIN for n in nodes)
    ops = [o for o in model.opset_import if o.domain != BITLINEAR_DOMAIN or still_tdpu]
    del model.opset_import[:]
    model.opset_import.extend(ops)
    if not any(o.domain == NBITS_DOMAIN for o in ops):
        model.opset_import.append(helper.make_opsetid(NBITS_DOMAIN, 1))

    def source(t: onnx.TensorProto) -> np.ndarray:
        return lazy[t.name]() if t.name in lazy else tensor_bytes(t, g.base_dir)

    save_streamed(model, source, dst, dst.with_name(dst.name + ".data"))
    return total
