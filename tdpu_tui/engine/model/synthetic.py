"""The synthetic checkpoint (`[model] source = "synthetic"`): random ternary weights, real layout.

It is a genuine Hugging Face BitNet directory (`config.json` with the real checkpoint's keys,
`model.safetensors` with packed uint8 projections in hf order, bf16 `weight_scale` [1], bf16
embeddings and norms), read back by `checkpoint.open_checkpoint` like any other: there is no
second code path. transformers' `BitNetForCausalLM.from_pretrained` loads it too.

Values are chosen so a forward pass stays well-conditioned through any number of layers:
- ternary codes drawn ¼ −1, ½ 0, ¼ +1 (two random bits per weight, the middle two mapped to 0);
- `scale_mul = sqrt(2/K) · gain · lognormal(σ = 0.25)`: a projection of a unit-RMS input gives
  a roughly unit-RMS output (half the K weights are non-zero); `gain` is smaller for `o_proj`
  and `down_proj`, which write into the residual stream;
- norm weights `1 + N(0, 0.05)`; embeddings `N(0, (2/sqrt(H))²)`, so tied logits have a standard
  deviation of about 2 and their argmax varies from position to position.

Generation is deterministic: every tensor has its own generator seeded by (seed, crc32(name)).
The file is streamed tensor by tensor in bounded chunks, so writing the 2b4t preset
(1.2 GB) needs a few tens of MB besides the page cache.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tdpu_tui.engine.core.artifacts import Artifacts
from tdpu_tui.engine.model.checkpoint import ATTN_PROJECTIONS, CONFIG_FILE, MLP_PROJECTIONS, SINGLE_FILE
from tdpu_tui.engine.core.config import SYNTHETIC_MAXIMUM, Config, SyntheticConfig
from tdpu_tui.engine.core.errors import ConfigError
from tdpu_tui.engine.osutil.files import STAGING_PREFIX, fsync_dir, owned_prefix

FORMAT_VERSION = 2  # bump whenever the bytes written for a stamp change
STAMP_FILE = "tdpu_synthetic.json"

Progress = Callable[[int, int, str], None]

# Shapes of each preset, in SyntheticConfig's override names.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                 vocab_size=256, max_position_embeddings=256),
    "2b4t": dict(layers=30, hidden_size=2560, intermediate_size=6912, num_heads=20, num_kv_heads=5,
                 vocab_size=128256, max_position_embeddings=4096),
}
OVERRIDES = ("layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "vocab_size")
_SUFFIX = {"layers": "L", "hidden_size": "h", "intermediate_size": "i", "num_heads": "nh",
           "num_kv_heads": "kv", "vocab_size": "v"}

_CHUNK = 1 << 22  # elements generated at a time
_GAIN = {"o_proj": 0.5, "down_proj": 0.5}

# A random byte holds four 2-bit fields; map each field 0, 1, 2, 3 to code 0, 1, 1, 2
# (w = -1, 0, 0, +1) so one byte lookup yields four ternary weights with a ¼ ½ ¼ mix.
_FIELD_TO_CODE = np.array([0, 1, 1, 2], dtype=np.uint8)
_BYTE_TO_PACKED = np.array(
    [sum(int(_FIELD_TO_CODE[(b >> (2 * i)) & 3]) << (2 * i) for i in range(4)) for b in range(256)],
    dtype=np.uint8)


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the 16-bit patterns."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype("<u2")


def _bf16(x: float) -> float:
    bits = _f32_to_bf16_bits(np.array([x], dtype=np.float32))
    return float((bits.astype(np.uint32) << 16).view(np.float32)[0])


# The largest synthetic model, in multiples of the 2b4t preset's parameters.
MAX_PARAMETERS_X_2B4T = 4


def resolve_shapes(preset: str, overrides: dict[str, int | None] | None = None) -> dict[str, int]:
    """The preset's shapes with the overrides applied; raises ConfigError on impossible ones."""
    if preset not in PRESETS:
        raise ConfigError(f"expected one of {', '.join(map(repr, PRESETS))}, found {preset!r}",
                          key="model.synthetic.preset")
    shapes = dict(PRESETS[preset])
    for key, value in (overrides or {}).items():
        if key not in OVERRIDES:
            raise ConfigError(f"unknown override (known: {', '.join(OVERRIDES)})", key=f"model.synthetic.{key}")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"expected a positive integer, found {value!r}", key=f"model.synthetic.{key}")
            if value > SYNTHETIC_MAXIMUM[key]:
                raise ConfigError(f"expected at most {SYNTHETIC_MAXIMUM[key]} (far above any real "
                                  f"model's), found {value}", key=f"model.synthetic.{key}")
            shapes[key] = value
    h, heads, kv = shapes["hidden_size"], shapes["num_heads"], shapes["num_kv_heads"]

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{why} (shapes: {shapes})", key=f"model.synthetic.{key}")

    if h % heads or (h // heads) % 2:
        raise bad("num_heads", f"hidden_size {h} must be num_heads {heads} × an even head_dim")
    if heads % kv:
        raise bad("num_kv_heads", f"num_heads {heads} must be a multiple of num_kv_heads {kv}")
    if h % 4 or (kv * (h // heads)) % 4:
        raise bad("hidden_size", "hidden_size and num_kv_heads × head_dim must be multiples of 4 (2-bit packing)")
    if shapes["intermediate_size"] % 4:
        raise bad("intermediate_size", f"intermediate_size {shapes['intermediate_size']} must be a multiple of 4")
    shapes["head_dim"] = h // heads
    # Each shape may be in bounds and their product still not: checked before anything is
    # allocated or written (the plan of tensors, the file).
    params, most = parameter_count(shapes), MAX_PARAMETERS_X_2B4T * parameter_count(PRESETS["2b4t"])
    if params > most:
        given = [k for k in OVERRIDES if (overrides or {}).get(k) is not None] or ["preset"]
        key = max(given, key=lambda k: shapes.get(k, 0) / PRESETS["2b4t"].get(k, 1))
        raise bad(key, f"the synthetic model would have {params:,} parameters, more than "
                       f"{MAX_PARAMETERS_X_2B4T} × the 2b4t preset's ({most:,})")
    return shapes


def parameter_count(shapes: dict[str, int]) -> int:
    """Weights of a model of `shapes` (tied embeddings; norms left out)."""
    h, i, layers = shapes["hidden_size"], shapes["intermediate_size"], shapes["layers"]
    kv = shapes["num_kv_heads"] * (h // shapes["num_heads"])
    return shapes["vocab_size"] * h + layers * (2 * h * h + 2 * kv * h + 3 * i * h)


def hf_config(shapes: dict[str, int], linear_class: str = "autobitlinear") -> dict[str, Any]:
    """config.json with the keys of microsoft/bitnet-b1.58-2B-4T."""
    vocab = shapes["vocab_size"]
    return {
        "architectures": ["BitNetForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": max(vocab - 2, 0) if vocab < 128256 else 128000,
        "eos_token_id": max(vocab - 1, 0) if vocab < 128256 else 128001,
        "hidden_act": "relu2",
        "hidden_size": shapes["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": shapes["intermediate_size"],
        "max_position_embeddings": shapes["max_position_embeddings"],
        "model_type": "bitnet",
        "num_attention_heads": shapes["num_heads"],
        "num_hidden_layers": shapes["layers"],
        "num_key_value_heads": shapes["num_kv_heads"],
        "quantization_config": {"quant_method": "bitnet", "linear_class": linear_class,
                                "quantization_mode": "offline"},
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab,
    }


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[np.random.Generator], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (1 if self.dtype == "U8" else 2)


def _plan(shapes: dict[str, int], linear_class: str) -> list[_Tensor]:
    h, i, v = shapes["hidden_size"], shapes["intermediate_size"], shapes["vocab_size"]
    q, kv = shapes["num_heads"] * shapes["head_dim"], shapes["num_kv_heads"] * shapes["head_dim"]
    dims = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def packed(n: int, k: int) -> Callable[[np.random.Generator], Iterator[np.ndarray]]:
        def gen(rng: np.random.Generator) -> Iterator[np.ndarray]:
            total = n // 4 * k
            for start in range(0, total, _CHUNK):
                count = min(_CHUNK, total - start)
                yield _BYTE_TO_PACKED[np.frombuffer(rng.bytes(count), dtype=np.uint8)]
        return gen

    def scale(k: int, gain: float) -> Callable[[np.random.Generator], Iterator[np.ndarray]]:
        def gen(rng: np.random.Generator) -> Iterator[np.ndarray]:
            scale_mul = _bf16(math.sqrt(2.0 / k) * gain * math.exp(0.25 * rng.standard_normal()))
            stored = scale_mul if linear_class == "autobitlinear" else 1.0 / scale_mul
            yield _f32_to_bf16_bits(np.array([stored], dtype=np.float32))
        return gen

    def normal(count: int, mean: float, std: float) -> Callable[[np.random.Generator], Iterator[np.ndarray]]:
        def gen(rng: np.random.Generator) -> Iterator[np.ndarray]:
            for start in range(0, count, _CHUNK):
                x = rng.standard_normal(min(_CHUNK, count - start), dtype=np.float32)
                x *= np.float32(std)
                x += np.float32(mean)
                yield _f32_to_bf16_bits(x)
        return gen

    plan = [_Tensor("model.embed_tokens.weight", "BF16", (v, h), normal(v * h, 0.0, 2.0 / math.sqrt(h)))]
    for layer in range(shapes["layers"]):
        p = f"model.layers.{layer}"
        norm = normal(h, 1.0, 0.05)
        plan.append(_Tensor(f"{p}.input_layernorm.weight", "BF16", (h,), norm))
        for part, projections in (("self_attn", ATTN_PROJECTIONS), ("mlp", MLP_PROJECTIONS)):
            if part == "mlp":
                plan.append(_Tensor(f"{p}.post_attention_layernorm.weight", "BF16", (h,), norm))
            for proj in projections:
                n, k = dims[proj]
                plan.append(_Tensor(f"{p}.{part}.{proj}.weight", "U8", (n // 4, k), packed(n, k)))
                plan.append(_Tensor(f"{p}.{part}.{proj}.weight_scale", "BF16", (1,),
                                    scale(k, _GAIN.get(proj, 1.0))))
            sub = ("attn_sub_norm", h) if part == "self_attn" else ("ffn_sub_norm", i)
            plan.append(_Tensor(f"{p}.{part}.{sub[0]}.weight", "BF16", (sub[1],), normal(sub[1], 1.0, 0.05)))
    plan.append(_Tensor("model.norm.weight", "BF16", (h,), normal(h, 1.0, 0.05)))
    return plan


def _write_safetensors(path: Path, plan: list[_Tensor], seed: int, on_progress: Progress | None) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in plan:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    total, done = offset, 0
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for t in plan:
            rng = np.random.default_rng([seed, zlib.crc32(t.name.encode())])
            written = 0
            for chunk in t.chunks(rng):
                fh.write(chunk.tobytes())
                written += chunk.nbytes
            assert written == t.nbytes, (t.name, written, t.nbytes)
            done += t.nbytes
            if on_progress is not None:
                on_progress(done, total, t.name)
        fh.flush()
        os.fsync(fh.fileno())


def _stamp(preset: str, seed: int, overrides: dict[str, int], linear_class: str) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "preset": preset, "seed": seed,
            "overrides": dict(sorted(overrides.items())), "linear_class": linear_class}


def _is_complete(directory: Path, stamp: dict[str, Any]) -> bool:
    try:
        found = json.loads((directory / STAMP_FILE).read_text(encoding="utf-8"))
        sizes = found.pop("files")
        return found == stamp and all((directory / f).stat().st_size == n for f, n in sizes.items())
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return False


def write_synthetic(directory: str | Path, preset: str = "tiny", seed: int = 0,
                    overrides: dict[str, int | None] | None = None, on_progress: Progress | None = None,
                    *, linear_class: str = "autobitlinear") -> Path:
    """Write (or reuse) a synthetic checkpoint in `directory` and return its path.

    The directory appears complete or not at all: it is written beside, under a temporary
    name, and renamed. A directory that already holds a complete checkpoint with the same
    stamp (format version, preset, seed, overrides, linear_class) is reused as it is.
    `on_progress(bytes_done, bytes_total, tensor_name)` is called after every tensor.
    """
    directory = Path(directory).expanduser().resolve()
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    shapes = resolve_shapes(preset, overrides)
    stamp = _stamp(preset, seed, overrides, linear_class)
    if _is_complete(directory, stamp):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Named for this process (`owned_prefix`): a kill -9 meanwhile (1.1 GB at 2b4t) leaves a
    # folder the next run removes (`core.pipeline`, `osutil.files.remove_leftovers`).
    tmp = Path(tempfile.mkdtemp(prefix=f"{owned_prefix(STAGING_PREFIX)}{directory.name}-tmp-",
                                dir=directory.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config(shapes, linear_class), indent=2) + "\n", encoding="utf-8")
        _write_safetensors(tmp / SINGLE_FILE, _plan(shapes, linear_class), seed, on_progress)
        files = {f.name: f.stat().st_size for f in (tmp / CONFIG_FILE, tmp / SINGLE_FILE)}
        (tmp / STAMP_FILE).write_text(json.dumps({**stamp, "files": files}, indent=2) + "\n", encoding="utf-8")
        _swap_in(tmp, directory)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_complete(directory, stamp):  # another process finished the same checkpoint first
            return directory
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _swap_in(tmp: Path, directory: Path) -> None:
    """Rename `tmp` to `directory`, moving a previous `directory` aside and deleting it after."""
    old = None
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{owned_prefix(STAGING_PREFIX)}{directory.name}-old-",
                                    dir=directory.parent))
        os.replace(directory, old / directory.name)
    os.replace(tmp, directory)
    fsync_dir(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def synthetic_dir_name(syn: SyntheticConfig) -> str:
    suffix = "".join(f"-{_SUFFIX[k]}{getattr(syn, k)}" for k in OVERRIDES if getattr(syn, k) is not None)
    return f"{syn.preset}-seed{syn.seed}{suffix}"


def ensure_synthetic(cfg: Config, on_progress: Progress | None = None) -> Path:
    """The synthetic checkpoint `cfg` asks for, under `Artifacts.synthetic_root` (written once)."""
    syn = cfg.model.synthetic
    overrides = {k: getattr(syn, k) for k in OVERRIDES}
    directory = Artifacts.of(cfg).synthetic_root / synthetic_dir_name(syn)
    try:
        return write_synthetic(directory, syn.preset, syn.seed, overrides, on_progress)
    except ConfigError as exc:   # impossible shapes: name the file they are set in too
        if exc.file is not None or cfg.file is None:
            raise
        named = ConfigError(str(exc), file=cfg.file)
        named.key = exc.key
        raise named from None
