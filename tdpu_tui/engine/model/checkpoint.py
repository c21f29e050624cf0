"""Read a BitNet b1.58 checkpoint in the Hugging Face layout (docs/spec.md §4).

A checkpoint is a directory with `config.json` and either `model.safetensors` or a sharded
`model.safetensors.index.json` plus its shards. Three ways of storing a projection
`<module>.weight` are accepted, decided per tensor by its dtype:

- packed (the real checkpoint): `uint8 [N/4, K]` in the `hf` order of `kernels.packing`,
  plus `<module>.weight_scale` (shape [1]);
- unpacked ternary (what transformers' `save_pretrained` writes for `autobitlinear`): float
  `[N, K]` whose values are all in {-1, 0, +1}, plus `<module>.weight_scale`;
- unquantized float (the `-bf16` variant): float `[N, K]` without `weight_scale`, ternarized
  here with BitNet's absmean rule (`scale = 1 / mean(|W|)`, `Wq = round(W·scale).clamp(-1, 1)`).

Both `linear_class` conventions are normalised to one, *multiply*: `y = acc / s · scale_mul`
with `scale_mul = weight_scale` for `autobitlinear` and `1 / weight_scale` for `bitlinear`
(transformers divides by the scale there), and `1 / scale` for an absmean-ternarized weight.

The safetensors header is parsed here (never unpickled); tensors are read lazily, one at a
time, when asked for. Structure (every expected tensor present, shapes, dtypes, file sizes)
is checked when the checkpoint is opened; the values of a packed projection when it is read:
a reserved code 3 raises `CheckpointError` naming the tensor, the count and the first byte.
Things that are readable but unusual (an unknown activation, extra tensors, a float
projection that is ternarized) are recorded in `Checkpoint.warnings`.
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kernels import packing
from tdpu_tui.engine.core.config import MAX_POSITIONS
from tdpu_tui.engine.core.errors import CheckpointError
from tdpu_tui.engine.osutil.files import confined

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

LINEAR_CLASSES = ("autobitlinear", "bitlinear")
ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# safetensors dtype name -> numpy dtype of the stored bytes
_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype("<u2"),  # bit pattern; converted to float32 by `_bf16_to_f32`
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),
}
_FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
_MAX_HEADER = 100 * 1024 * 1024
_LAYER_RE = re.compile(r"model\.layers\.(\d{1,9})\.")


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    wide = bits.astype(np.uint32)
    wide <<= 16  # in place: a second temporary would be 1.3 GB for the 2B embedding
    return wide.view(np.float32)


@dataclass(frozen=True)
class BitNetConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str
    linear_class: str
    quantized: bool

    @classmethod
    def from_dict(cls, d: dict[str, Any], file: Path | str = CONFIG_FILE) -> BitNetConfig:
        _absent = object()

        def get(key: str, kind: type, default: Any = _absent) -> Any:
            """d[key] checked against `kind` (an int is accepted as a float); `default` if absent."""
            value = d.get(key, default)
            if value is _absent:
                raise CheckpointError(f"{file}: missing key '{key}'")
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
                raise CheckpointError(f"{file}: key '{key}': expected {kind.__name__}, found {value!r}")
            return value

        hidden = get("hidden_size", int)
        heads = get("num_attention_heads", int)
        kv_heads = get("num_key_value_heads", int, heads)
        if d.get("head_dim") is not None:
            head_dim = get("head_dim", int)
        else:
            head_dim = hidden // heads if heads > 0 else 0
        rope = d.get("rope_parameters")
        if "rope_theta" in d:
            theta = get("rope_theta", float)
        elif isinstance(rope, dict) and isinstance(rope.get("rope_theta"), (int, float)):
            theta = float(rope["rope_theta"])  # transformers 5 writes RoPE settings here
        else:
            raise CheckpointError(f"{file}: no RoPE base: expected 'rope_theta' or 'rope_parameters.rope_theta'")
        qc = d.get("quantization_config")
        if qc is not None and not isinstance(qc, dict):
            raise CheckpointError(f"{file}: key 'quantization_config': expected a table, found {qc!r}")
        qc = qc or {}
        if qc and qc.get("quant_method", "bitnet") != "bitnet":
            raise CheckpointError(
                f"{file}: key 'quantization_config.quant_method': expected 'bitnet', found {qc.get('quant_method')!r}")
        if qc.get("use_rms_norm"):
            raise CheckpointError(
                f"{file}: key 'quantization_config.use_rms_norm' = true (an RMSNorm inside every BitLinear) "
                "is not supported: expected false or absent")
        linear_class = qc.get("linear_class", "bitlinear")  # transformers' default
        if linear_class not in LINEAR_CLASSES:
            raise CheckpointError(
                f"{file}: key 'quantization_config.linear_class': expected one of {LINEAR_CLASSES}, "
                f"found {linear_class!r}")
        cfg = cls(
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", int),
            num_hidden_layers=get("num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=get("vocab_size", int),
            rms_norm_eps=get("rms_norm_eps", float, 1e-6),
            rope_theta=theta,
            max_position_embeddings=get("max_position_embeddings", int, 2048),
            tie_word_embeddings=get("tie_word_embeddings", bool, True),
            hidden_act=get("hidden_act", str, "relu2"),
            linear_class=linear_class,
            quantized=bool(qc),
        )
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"):
            if getattr(cfg, key) <= 0:
                raise CheckpointError(f"{file}: key '{key}': expected a positive integer, found {getattr(cfg, key)}")
        if cfg.max_position_embeddings > MAX_POSITIONS:
            raise CheckpointError(
                f"{file}: key 'max_position_embeddings': expected at most {MAX_POSITIONS} (the reference "
                f"graph holds a [positions, positions] float32 causal mask), found {cfg.max_position_embeddings}")
        if cfg.head_dim % 2:
            raise CheckpointError(f"{file}: key 'head_dim': expected an even number (RoPE rotates halves), "
                                  f"found {cfg.head_dim}")
        for key in ("rms_norm_eps", "rope_theta"):
            value = getattr(cfg, key)
            if not math.isfinite(value) or value <= 0:
                raise CheckpointError(f"{file}: key '{key}': expected a finite positive number, found {value}")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise CheckpointError(
                f"{file}: num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv_heads}")
        return cfg

    def projection_shape(self, name: str) -> tuple[int, int]:
        """(N, K) = (out_features, in_features) of a projection, by module path or suffix."""
        leaf = name.rsplit(".", 1)[-1]
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                  "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        if leaf not in shapes:
            raise KeyError(f"not a projection: {name!r}")
        return shapes[leaf]

    def projection_names(self) -> list[str]:
        names = []
        for layer in range(self.num_hidden_layers):
            names += [f"model.layers.{layer}.self_attn.{p}" for p in ATTN_PROJECTIONS]
            names += [f"model.layers.{layer}.mlp.{p}" for p in MLP_PROJECTIONS]
        return names

    def norm_names(self) -> list[str]:
        """Weights of every RMSNorm, `[hidden]` except `ffn_sub_norm` (`[intermediate]`)."""
        names = []
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}"
            names += [f"{p}.input_layernorm.weight", f"{p}.self_attn.attn_sub_norm.weight",
                      f"{p}.post_attention_layernorm.weight", f"{p}.mlp.ffn_sub_norm.weight"]
        return names + ["model.norm.weight"]


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, _Entry]:
    """Parse one safetensors file's header and check it against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: truncated or not a safetensors file (header of {n} bytes, file of {size})")
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    base = 8 + n
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(v) for v in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{name}': malformed header entry {info!r}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}': unsupported dtype {dtype}")
        expected = math.prod(shape) * _DTYPES[dtype].itemsize
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: tensor '{name}': {dtype} {list(shape)} needs {expected} bytes, "
                f"header gives offsets [{begin}, {end})")
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated file: tensor '{name}' ends at byte {base + end}, the file has {size}")
        entries[name] = _Entry(path, dtype, shape, base + begin, expected)
    return entries


def _load_index(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index}: not a safetensors index (expected {{\"weight_map\": {{...}}}}): {exc}") from None
    shards = []
    for name in files:
        shard = confined(directory, name)
        if shard is None:
            tensor = next(t for t, f in weight_map.items() if f == name)
            raise CheckpointError(
                f"{index}: tensor '{tensor}' is mapped to shard {name!r}, which is not inside the checkpoint "
                f"directory {directory}; expected a file name relative to it (no absolute path, drive or '..')")
        shards.append(shard)
    return shards


class Checkpoint:
    """An opened checkpoint. Tensors are read on demand; see the module docstring."""

    def __init__(self, path: Path, config: BitNetConfig, entries: dict[str, _Entry], files: list[Path]):
        self.path = path
        self.config = config
        self.files = files
        self.warnings: list[str] = []
        self._entries = entries
        self._handles: dict[Path, Any] = {}
        self._lock = threading.Lock()
        self._validate()

    # -- structure -------------------------------------------------------------------------
    def _check_config_against_tensors(self) -> None:
        """config.json's sizes against the tensors present, before anything is sized by them
        (a layer count of 10⁹ would otherwise build billions of tensor names first)."""
        cfg, config_file = self.config, self.path / CONFIG_FILE

        def mismatch(key: str, value: int, tensor: str, found: object) -> CheckpointError:
            return CheckpointError(
                f"{config_file}: key '{key}' = {value} does not match the checkpoint: tensor '{tensor}' "
                f"in {self._entry(tensor).file} has {found}")

        emb = self._entry("model.embed_tokens.weight")
        if len(emb.shape) == 2:
            if emb.shape[0] != cfg.vocab_size:
                raise mismatch("vocab_size", cfg.vocab_size, "model.embed_tokens.weight", f"{emb.shape[0]} rows")
            if emb.shape[1] != cfg.hidden_size:
                raise mismatch("hidden_size", cfg.hidden_size, "model.embed_tokens.weight",
                               f"{emb.shape[1]} columns")
        layers = {int(m.group(1)) for name in self._entries if (m := _LAYER_RE.match(name))}
        if cfg.num_hidden_layers > len(layers):
            held = f"layers 0..{max(layers)}" if layers else "no model.layers.* tensors"
            raise CheckpointError(
                f"{config_file}: key 'num_hidden_layers' = {cfg.num_hidden_layers}, but the checkpoint holds "
                f"tensors of {len(layers)} layers ({held}); expected at most {len(layers)}")
        for tensor, key, value in (
                ("model.layers.0.mlp.ffn_sub_norm.weight", "intermediate_size", cfg.intermediate_size),
                ("model.layers.0.self_attn.attn_sub_norm.weight", "num_attention_heads × head_dim",
                 cfg.num_attention_heads * cfg.head_dim)):
            e = self._entries.get(tensor)
            if e is not None and e.shape != (value,):
                raise mismatch(key, value, tensor, f"shape {list(e.shape)}")

    def _validate(self) -> None:
        cfg = self.config
        self._check_config_against_tensors()
        if cfg.hidden_act != "relu2":
            self.warnings.append(f"{self.path / CONFIG_FILE}: hidden_act = {cfg.hidden_act!r}, BitNet b1.58 uses 'relu2'")
        self._expect("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size), float_only=True)
        if not cfg.tie_word_embeddings:
            self._expect("lm_head.weight", (cfg.vocab_size, cfg.hidden_size), float_only=True)
        for name in cfg.norm_names():
            width = cfg.intermediate_size if "ffn_sub_norm" in name else cfg.hidden_size
            self._expect(name, (width,), float_only=True)
        ternarized = 0
        for name in self.projection_names():
            n, k = cfg.projection_shape(name)
            e = self._entry(f"{name}.weight")
            if e.dtype == "U8":
                if n % 4:
                    raise CheckpointError(f"{e.file}: tensor '{name}.weight': out_features {n} is not a multiple of 4")
                self._expect(f"{name}.weight", (n // 4, k))
            elif e.dtype in _FLOAT_DTYPES:
                self._expect(f"{name}.weight", (n, k))
            else:
                raise CheckpointError(
                    f"{e.file}: tensor '{name}.weight': expected uint8 (packed) or a float dtype, found {e.dtype}")
            if f"{name}.weight_scale" in self._entries:
                s = self._entry(f"{name}.weight_scale")
                if math.prod(s.shape) != 1 or s.dtype not in _FLOAT_DTYPES:
                    raise CheckpointError(
                        f"{s.file}: tensor '{name}.weight_scale': expected one float, found {s.dtype} {list(s.shape)}")
            elif e.dtype == "U8":
                raise CheckpointError(f"{e.file}: missing tensor '{name}.weight_scale' (packed '{name}.weight' needs it)")
            else:
                ternarized += 1
        if ternarized:
            self.warnings.append(
                f"{self.path}: {ternarized} float projections without weight_scale are ternarized here (absmean)")
        known = {f"{p}.weight" for p in self.projection_names()} | {f"{p}.weight_scale" for p in self.projection_names()}
        known |= set(cfg.norm_names()) | {"model.embed_tokens.weight", "lm_head.weight"}
        extra = sorted(set(self._entries) - known)
        if extra:
            self.warnings.append(f"{self.path}: {len(extra)} tensors are not used, e.g. '{extra[0]}'")

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            where = self.files[0] if len(self.files) == 1 else self.path / INDEX_FILE
            raise CheckpointError(f"{where}: missing tensor '{name}'") from None

    def _expect(self, name: str, shape: tuple[int, ...], float_only: bool = False) -> None:
        e = self._entry(name)
        if e.shape != shape:
            raise CheckpointError(
                f"{e.file}: tensor '{name}': expected shape {list(shape)}, found {list(e.shape)}")
        if float_only and e.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{e.file}: tensor '{name}': expected a float dtype, found {e.dtype}")

    # -- reading ---------------------------------------------------------------------------
    def _raw(self, name: str) -> np.ndarray:
        e = self._entry(name)
        out = np.empty(e.shape, dtype=_DTYPES[e.dtype])
        with self._lock:
            fh = self._handles.get(e.file)
            if fh is None:
                fh = self._handles[e.file] = open(e.file, "rb")  # noqa: SIM115 (closed by close())
            fh.seek(e.offset)
            got = fh.readinto(memoryview(out.reshape(-1)).cast("B")) if e.nbytes else 0
        if got != e.nbytes:
            raise CheckpointError(f"{e.file}: truncated file while reading tensor '{name}'")
        return out

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return sorted(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype ("BF16", "U8", ...)."""
        return self._entry(name).dtype

    def tensor(self, name: str) -> np.ndarray:
        """A tensor as float32 (bf16 and f16 widened exactly)."""
        raw = self._raw(name)
        return _bf16_to_f32(raw) if self._entry(name).dtype == "BF16" else raw.astype(np.float32, copy=False)

    def read(self, name: str, index: Any) -> np.ndarray:
        """`tensor(name)[index]` as float32, reading only the bytes `index` selects.

        For a few embedding rows, or one block of columns of a large tensor, without holding
        the whole tensor in memory.
        """
        e = self._entry(name)
        try:
            stored = np.memmap(e.file, dtype=_DTYPES[e.dtype], mode="r", offset=e.offset, shape=e.shape)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{e.file}: cannot map tensor '{name}': {exc}") from None
        part = np.asarray(stored[index])
        # np.array copies, so nothing returned keeps the file mapped.
        return _bf16_to_f32(part) if e.dtype == "BF16" else np.array(part, dtype=np.float32)

    def embedding(self) -> np.ndarray:
        return self.tensor("model.embed_tokens.weight")

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """The embedding rows of token ids [...] -> float32 [..., hidden]."""
        return self.read("model.embed_tokens.weight", np.asarray(ids))

    def projection_names(self) -> list[str]:
        return self.config.projection_names()

    def _scale_mul(self, name: str) -> float:
        ws = float(self.tensor(f"{name}.weight_scale").reshape(-1)[0])
        if not math.isfinite(ws) or ws == 0.0:
            e = self._entry(f"{name}.weight_scale")
            raise CheckpointError(f"{e.file}: tensor '{name}.weight_scale': expected a finite non-zero value, found {ws}")
        return ws if self.config.linear_class == "autobitlinear" else 1.0 / ws

    def _check_reserved(self, name: str, p: np.ndarray) -> None:
        hit = packing.find_reserved(p)
        if hit is not None:
            count = packing.count_reserved(p)
            r, c, i = hit
            raise CheckpointError(
                f"{self._entry(name + '.weight').file}: tensor '{name}.weight': reserved 2-bit code 3 in {count} "
                f"places (first at byte [{r}, {c}] bits {2 * i}..{2 * i + 1}); expected codes 0, 1, 2")

    def ternary(self, name: str) -> tuple[np.ndarray, float]:
        """(int8 [N, K] in {-1, 0, 1}, scale_mul) of a projection (module path, no '.weight')."""
        e = self._entry(f"{name}.weight")
        if e.dtype == "U8":
            p = self._raw(f"{name}.weight")
            self._check_reserved(name, p)
            return packing.unpack(p, "hf"), self._scale_mul(name)
        w = self.tensor(f"{name}.weight")
        if f"{name}.weight_scale" in self._entries:
            bad = (w != -1) & (w != 0) & (w != 1)
            if bad.any():
                r, c = (int(v) for v in np.argwhere(bad)[0])
                raise CheckpointError(
                    f"{e.file}: tensor '{name}.weight': has a weight_scale, so its values must be in "
                    f"{{-1, 0, 1}}; {int(bad.sum())} are not, first [{r}, {c}] = {w[r, c]}")
            return w.astype(np.int8), self._scale_mul(name)
        return absmean_ternarize(w)

    def packed(self, name: str, layout: str = "hf") -> tuple[np.ndarray, float]:
        """(uint8 [N/4, K], scale_mul) in `layout`; the stored bytes as they are for a packed hf read."""
        if layout not in packing.LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}: expected one of {packing.LAYOUTS}")
        e = self._entry(f"{name}.weight")
        if e.dtype == "U8" and layout == "hf":
            p = self._raw(f"{name}.weight")
            self._check_reserved(name, p)
            return np.ascontiguousarray(p), self._scale_mul(name)
        w, scale_mul = self.ternary(name)
        return packing.pack(w, layout), scale_mul

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def close(self) -> None:
        with self._lock:
            for fh in self._handles.values():
                fh.close()
            self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.config
        return (f"Checkpoint({str(self.path)!r}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"vocab={c.vocab_size}, linear_class={c.linear_class!r})")


def absmean_ternarize(w: np.ndarray) -> tuple[np.ndarray, float]:
    """BitNet's weight quantizer: (int8 ternary [N, K], scale_mul = mean(|W|) clamped)."""
    w = np.asarray(w, dtype=np.float32)
    mean = np.float32(np.abs(w).mean(dtype=np.float64))
    scale = np.float32(1.0) / max(mean, np.float32(1e-5))
    q = np.clip(np.round(w * scale), -1, 1).astype(np.int8)
    return q, float(np.float32(1.0) / scale)


def read_config(directory: str | Path) -> BitNetConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a checkpoint directory needs config.json)") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return BitNetConfig.from_dict(data, path)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open and structurally check the checkpoint directory `path` (raises `CheckpointError`)."""
    directory = Path(path).expanduser()
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory}: not a directory (expected a directory with {CONFIG_FILE} and {SINGLE_FILE})")
    directory = directory.resolve()
    config = read_config(directory)
    if (directory / SINGLE_FILE).exists():
        files = [directory / SINGLE_FILE]
    elif (directory / INDEX_FILE).exists():
        files = _load_index(directory)
    else:
        raise CheckpointError(f"{directory}: missing {SINGLE_FILE} (or {INDEX_FILE})")
    entries: dict[str, _Entry] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: missing safetensors shard")
        for name, e in _read_header(f).items():
            if name in entries:
                raise CheckpointError(f"{f}: tensor '{name}' is also stored in {entries[name].file}")
            entries[name] = e
    return Checkpoint(directory, config, entries, files)
