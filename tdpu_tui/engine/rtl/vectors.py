"""Golden vectors for the team's own testbench: `$readmemh` files and their JSON index.

One word per tile, most significant hex digit first: `{expected[31:0], i_weight[2·LEN-1:0],
i_data[8·LEN-1:0]}` — the stimulus words in docs/spec.md §8's lane order (lane i of `i_data` at bits
8i+7:8i, of `i_weight` at 2i+1:2i, with the core's `[rtl.codes]`) and the expected `o_result`.
Tiles in stream order: tokens, then rows, then K-tiles.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from tdpu_tui.engine.osutil.files import atomic_write_bytes


def file_name(node: str) -> str:
    """A node name as a file name: `/model/layers.0/self_attn/q_proj/MatMul` -> `model_layers.0_self_attn_q_proj_MatMul`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", node).strip("_") or "node"


def word_layout(lanes: int) -> dict:
    """Bit ranges [low, high] of each field; the weight field is whole bytes (LEN < 4 pads it)."""
    wbits = 8 * -(-2 * lanes // 8)
    return {"data": [0, 8 * lanes - 1], "weight": [8 * lanes, 8 * lanes + 2 * lanes - 1],
            "expected": [8 * lanes + wbits, 8 * lanes + wbits + 31], "bits": 8 * lanes + wbits + 32}


def hex_words(data: np.ndarray, codes: np.ndarray, expected: np.ndarray) -> bytes:
    """The `$readmemh` text: one line per tile."""
    count, lanes = data.shape
    c = codes.astype(np.uint8) & 3
    pad = (-lanes) % 4
    if pad:
        c = np.concatenate([c, np.zeros((count, pad), np.uint8)], axis=1)
    c = c.reshape(count, -1, 4)
    wbytes = (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).astype(np.uint8)
    wbytes = wbytes[:, : -(-2 * lanes // 8)]
    exp = expected.astype("<i4").view(np.uint8).reshape(count, 4)
    little = np.concatenate([data.view(np.uint8), wbytes, exp], axis=1)   # least significant byte first
    big = np.ascontiguousarray(little[:, ::-1])
    digits = big.tobytes().hex().encode()
    width = 2 * big.shape[1]
    lines = np.frombuffer(digits, np.uint8).reshape(count, width)
    lines = np.concatenate([lines, np.full((count, 1), ord("\n"), np.uint8)], axis=1)
    return lines.tobytes()


def write_vectors(path: Path, data: np.ndarray, codes: np.ndarray, expected: np.ndarray) -> str:
    """Write the file; its sha256."""
    text = hex_words(data, codes, expected)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text)
    return hashlib.sha256(text).hexdigest()
