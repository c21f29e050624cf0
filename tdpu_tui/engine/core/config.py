"""`tdpu.toml`: loading and validation (docs/spec.md §3).

Unknown keys and wrong types are errors naming the key and the file. Relative paths are
relative to the configuration file.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from tdpu_tui.engine.core.errors import ConfigError

PRESETS = ("tiny", "2b4t")
PROFILES = ("reference", "icraft")
LAYOUTS = ("tdpu", "hf")
# How the replaced graph holds the (tied) lm_head, which is never ternary: "float" keeps the
# exported float32 MatMul/Gemm; "bf16" stores the weights at the checkpoint's bf16 precision
# (exact, half the bytes) behind ai.tdpu::LinearBF16.
LM_HEAD_MODES = ("float", "bf16")
# The BitLinear integer core's paths (`kernels.select.PATHS`; "auto": measured once per machine).
KERNEL_PATHS = ("auto", "numba-int16", "numba-avx2", "numba-avxvnni", "numba-avx512vnni", "numba-amx")


@dataclass
class SyntheticConfig:
    preset: str = "tiny"
    seed: int = 0
    # Overrides of the preset's shapes; None keeps the preset's value.
    layers: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    vocab_size: int | None = None


@dataclass
class ModelConfig:
    source: str = "synthetic"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ExportConfig:
    profile: str = "reference"
    opset: int = 17
    seq_len: int = 128
    # Verification inputs: `verify_batch` sequences of `verify_tokens` tokens.
    verify_batch: int = 2
    verify_tokens: int = 32
    verify_seed: int = 1234


@dataclass
class IcraftConfig:
    bin: str = "icraft"
    net_name: str = "bitnet_b158"
    target: str = "buyi"
    timeout_s: float = 3600
    pass_on: list[str] = field(default_factory=lambda: ["tdpu.ReplaceMatMulWithBitLinear"])
    # A user's own op-support table (CSV of reference/icraft/onnx_op_support.csv format).
    op_table: str | None = None


@dataclass
class ReplaceConfig:
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=lambda: ["*lm_head*"])
    layout: str = "tdpu"
    lm_head: str = "float"


@dataclass
class ValidateConfig:
    seed: int = 7
    batch: int = 1
    # Timed repetitions of each latency measurement (the median is reported).
    repeats: int = 5
    # Replaced nodes whose integer core is checked one by one.
    sample_nodes: int = 8


@dataclass
class RtlPortsConfig:
    """Port names of the BitLinear core (docs/spec.md §8); the defaults are the team's core."""
    clk: str = "clk"
    rst_n: str = "rst_n"
    data_valid: str = "i_data_valid"
    load_weight: str = "i_load_weight"
    data: str = "i_data"
    weight: str = "i_weight"
    ready: str = "o_data_ready"
    result: str = "o_result"


@dataclass
class RtlCodesConfig:
    """The 2-bit weight code of each ternary value on the core's `i_weight` lanes."""
    neg: int = 0
    zero: int = 1
    pos: int = 2


@dataclass
class RtlConfig:
    # .sv/.v files, relative to tdpu.toml; empty: the rtl stage is skipped.
    sources: list[str] = field(default_factory=list)
    top: str = "vec_multi_core"
    # Default: the directories of the sources.
    include_dirs: list[str] = field(default_factory=list)
    lanes: int = 32
    nodes: int = 4
    max_tiles: int = 250000
    timeout_s: float = 600
    ports: RtlPortsConfig = field(default_factory=RtlPortsConfig)
    codes: RtlCodesConfig = field(default_factory=RtlCodesConfig)


@dataclass
class TdpuConfig:
    """The board the cost model of docs/spec.md §9 describes."""
    cores: int = 1
    clock_mhz: float = 200
    ddr_gb_s: float = 4.0


@dataclass
class KernelsConfig:
    # Which integer core BitLinear runs on: "auto" picks by measurement (cached per machine).
    path: str = "auto"


@dataclass
class PathsConfig:
    output: str = "models/output"
    logs: str = "phase3_logs"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    icraft: IcraftConfig = field(default_factory=IcraftConfig)
    replace: ReplaceConfig = field(default_factory=ReplaceConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    rtl: RtlConfig = field(default_factory=RtlConfig)
    tdpu: TdpuConfig = field(default_factory=TdpuConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # Where the file was read from; relative paths resolve against its directory.
    file: Path | None = None

    @property
    def base_dir(self) -> Path:
        return self.file.parent if self.file is not None else Path.cwd()

    def resolve(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.paths.output)

    @property
    def logs_dir(self) -> Path:
        return self.resolve(self.paths.logs)

    @property
    def model_source(self) -> str | Path:
        """"synthetic" or the absolute path of a checkpoint directory."""
        if self.model.source == "synthetic":
            return "synthetic"
        return self.resolve(self.model.source)


_CHOICES = {
    "model.synthetic.preset": PRESETS,
    "export.profile": PROFILES,
    "replace.layout": LAYOUTS,
    "replace.lm_head": LM_HEAD_MODES,
    "kernels.path": KERNEL_PATHS,
}
_POSITIVE = {
    "export.opset", "export.seq_len", "export.verify_batch", "export.verify_tokens",
    "icraft.timeout_s", "validate.batch", "validate.repeats",
    "model.synthetic.layers", "model.synthetic.hidden_size", "model.synthetic.intermediate_size",
    "model.synthetic.num_heads", "model.synthetic.num_kv_heads", "model.synthetic.vocab_size",
    "rtl.lanes", "rtl.max_tiles", "rtl.timeout_s", "tdpu.cores", "tdpu.clock_mhz", "tdpu.ddr_gb_s",
}


# Seeds (NumPy's generators reject negative ones) and counts that may be zero.
_NON_NEGATIVE = {"model.synthetic.seed", "export.verify_seed", "validate.seed",
                 "validate.sample_nodes", "rtl.nodes", "rtl.codes.neg", "rtl.codes.zero",
                 "rtl.codes.pos"}


# Sequence positions a checkpoint may have (`model.checkpoint` checks config.json with it): 2B4T
# has 4096; the reference graph's causal mask is positions² float32 (1 GiB at this limit).
MAX_POSITIONS = 16384

# Upper bounds of the synthetic model's shapes, each well above any real model's (2B4T: 30
# layers, hidden 2560, intermediate 6912, 20/5 heads, vocab 128256): a larger one is a typo,
# and would have been allocated and written before anything else was checked.
SYNTHETIC_MAXIMUM = {"layers": 256, "hidden_size": 65536, "intermediate_size": 262144,
                     "num_heads": 1024, "num_kv_heads": 1024, "vocab_size": 1 << 20}

# Upper bounds where a larger value would switch a safeguard off, or ask for more memory or
# time than any run can have (each sizes an allocation or a loop before anything else fails).
_MAXIMUM = {"icraft.timeout_s": (7 * 24 * 3600.0, "one week"),
            "rtl.timeout_s": (7 * 24 * 3600.0, "one week"),
            "export.seq_len": (MAX_POSITIONS, "the most positions a checkpoint may have"),
            "export.verify_tokens": (MAX_POSITIONS, "the most positions a checkpoint may have"),
            "export.verify_batch": (64, "sequences held at once by the reference and the graph"),
            "validate.batch": (64, "sequences held at once by the reference and the graph"),
            "validate.repeats": (1000, "timed repetitions"),
            "rtl.lanes": (4096, "lanes of one core"),
            **{f"model.synthetic.{k}": (v, "far above any real model's")
               for k, v in SYNTHETIC_MAXIMUM.items()}}


_WINDOWS_DEVICE_RE = re.compile(r"^(?:CON|PRN|AUX|NUL|COM[0-9¹²³]|LPT[0-9¹²³])(?:\..*)?$", re.IGNORECASE)


def check_net_name(name: str, file: Path | None) -> None:
    """`[icraft].net_name` names files inside the Icraft output folder, nothing else."""
    bad = None
    if not name or name.strip() != name:
        bad = "an empty name or one with leading/trailing spaces"
    elif "/" in name or "\\" in name:
        bad = "a path separator"
    elif name in (".", "..") or ".." in name:
        bad = "'..'"
    elif ":" in name or PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor:
        bad = "a drive or absolute path"
    elif any(ord(c) < 32 for c in name) or any(c in '<>"|?*' for c in name):
        bad = "a character Windows does not allow in file names"
    elif name.endswith("."):
        bad = "a trailing '.' (Windows drops it: the files would get another name)"
    elif _WINDOWS_DEVICE_RE.match(name):
        bad = "a Windows device name (CON, PRN, AUX, NUL, COM1-9, LPT1-9: no file can have it)"
    if bad is not None:
        raise ConfigError(f"expected a plain file name (letters, digits, '_', '-', '.'), found "
                          f"{name!r} with {bad}", file=file, key="icraft.net_name")


def _check_opset(opset: int, file: Path | None) -> None:
    import onnx.defs

    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ConfigError(f"expected 17..{newest} (the newest opset the installed onnx "
                          f"{onnx.__version__} supports), found {opset}",
                          file=file, key="export.opset")


def _type_name(t: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(t, str(t))


def _check_value(value: Any, annotation: str, key: str, file: Path | None) -> Any:
    optional = annotation.endswith("| None")
    base = annotation.removesuffix(" | None").strip()
    if base == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"expected a list of strings, found {value!r}", file=file, key=key)
        return list(value)
    expected = {"int": int, "float": float, "str": str, "bool": bool}[base]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and expected is not bool or not isinstance(value, expected):
        hint = " (or leave it out)" if optional else ""
        raise ConfigError(
            f"expected {_type_name(expected)}{hint}, found {type(value).__name__} {value!r}",
            file=file, key=key,
        )
    return value


def _build(cls: type, table: dict, prefix: str, file: Path | None) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "file"}
    kwargs: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key (known here: {known})", file=file, key=key)
        f = fields[name]
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        sub = _SECTIONS.get(ann)
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"expected a table [{key}], found {value!r}", file=file, key=key)
            kwargs[name] = _build(sub, value, f"{key}.", file)
            continue
        value = _check_value(value, ann, key, file)
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(
                f"expected one of {', '.join(map(repr, _CHOICES[key]))}, found {value!r}",
                file=file, key=key,
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"expected a finite number, found {value!r}", file=file, key=key)
        if key in _MAXIMUM and value is not None and value > _MAXIMUM[key][0]:
            top, why = _MAXIMUM[key]
            raise ConfigError(f"expected at most {top:g} ({why}), found {value!r}"
                              if isinstance(top, float) else
                              f"expected at most {top} ({why}), found {value!r}", file=file, key=key)
        if key in _POSITIVE and value is not None and value <= 0:
            raise ConfigError(f"expected a positive value, found {value!r}", file=file, key=key)
        if key in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"expected 0 or more, found {value!r}", file=file, key=key)
        kwargs[name] = value
    return cls(**kwargs)


_SECTIONS: dict[str, type] = {
    "SyntheticConfig": SyntheticConfig,
    "ModelConfig": ModelConfig,
    "ExportConfig": ExportConfig,
    "IcraftConfig": IcraftConfig,
    "ReplaceConfig": ReplaceConfig,
    "ValidateConfig": ValidateConfig,
    "RtlConfig": RtlConfig,
    "RtlPortsConfig": RtlPortsConfig,
    "RtlCodesConfig": RtlCodesConfig,
    "TdpuConfig": TdpuConfig,
    "KernelsConfig": KernelsConfig,
    "PathsConfig": PathsConfig,
}


def parse_config(text: str, file: Path | None = None) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=file) from None
    cfg = _build(Config, data, "", file)
    cfg.file = file
    lanes = cfg.rtl.lanes
    if lanes & (lanes - 1):
        raise ConfigError(f"expected a power of two, found {lanes}", file=file, key="rtl.lanes")
    codes = (cfg.rtl.codes.neg, cfg.rtl.codes.zero, cfg.rtl.codes.pos)
    if len(set(codes)) != 3 or max(codes) > 3:
        raise ConfigError(f"expected three different 2-bit codes (0..3), found neg, zero, pos = "
                          f"{codes}", file=file, key="rtl.codes")
    if cfg.export.opset < 17:
        raise ConfigError(f"expected 17 or later (Icraft's PyTorch route), found {cfg.export.opset}",
                          file=file, key="export.opset")
    _check_opset(cfg.export.opset, file)
    check_net_name(cfg.icraft.net_name, file)
    return cfg


def load_config(path: str | Path) -> Config:
    path = Path(path).expanduser().resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("configuration file not found", file=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the configuration: {exc}", file=path) from None
    return parse_config(text, path)
