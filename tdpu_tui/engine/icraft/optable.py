"""Icraft's ONNX operator support table (docs/spec.md §6).

The table ships as package data (`tdpu_tui/data/onnx_op_support.csv`, from the Icraft v3.7.1
op-support page, see `tdpu_tui/data/README.md`). `[icraft].op_table` points at a user's own
copy for another Icraft version; it has the same columns and `#` comment lines.

An operator that is absent from the table is *undocumented*: not the same as unsupported,
but nothing promises that Icraft parses it.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tdpu_tui.engine.core.config import Config
from tdpu_tui.engine.core.errors import ConfigError

COLUMNS = ("onnx_op", "supported", "targets", "constraints", "source")
SUPPORT_VALUES = ("yes", "partial", "no")
PACKAGED = "onnx_op_support.csv"


@dataclass(frozen=True)
class OpSupport:
    op: str
    supported: str          # yes | partial | no
    targets: str
    constraints: str
    source: str


@dataclass(frozen=True)
class OpTable:
    ops: dict[str, OpSupport]
    origin: str             # where the table was read from (a path, or the package data)

    def get(self, op_type: str) -> OpSupport | None:
        return self.ops.get(op_type)

    def __len__(self) -> int:
        return len(self.ops)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(SUPPORT_VALUES, 0)
        for row in self.ops.values():
            out[row.supported] += 1
        return out


def parse_op_table(text: str, origin: str) -> OpTable:
    """Parse the CSV; every problem names the file and the line."""
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"{origin}: no header line (expected {','.join(COLUMNS)})")
    reader = csv.reader(io.StringIO("\n".join(line for _, line in lines)))
    header = [h.strip() for h in next(reader)]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{origin}:{lines[0][0]}: header lacks column(s) {', '.join(missing)} "
                         f"(expected {','.join(COLUMNS)}, found {','.join(header)})")
    col = {c: header.index(c) for c in COLUMNS}
    ops: dict[str, OpSupport] = {}
    for (lineno, _), row in zip(lines[1:], reader, strict=True):
        if len(row) < len(header):
            raise ValueError(f"{origin}:{lineno}: expected {len(header)} fields, found {len(row)}")
        rec = OpSupport(*(row[col[c]].strip() for c in COLUMNS))
        if rec.supported not in SUPPORT_VALUES:
            raise ValueError(f"{origin}:{lineno}: '{rec.op}': supported must be one of "
                             f"{'/'.join(SUPPORT_VALUES)}, found {rec.supported!r}")
        if rec.op in ops:
            raise ValueError(f"{origin}:{lineno}: operator '{rec.op}' listed twice")
        ops[rec.op] = rec
    return OpTable(ops, origin)


def _packaged():
    return resources.files("tdpu_tui").joinpath("data", PACKAGED)


def load_op_table(path: str | Path | None = None) -> OpTable:
    """The table at `path`, or the packaged one."""
    if path is None:
        text = _packaged().read_text(encoding="utf-8")
        return parse_op_table(text, f"package data tdpu_tui/data/{PACKAGED}")
    path = Path(path)
    return parse_op_table(path.read_text(encoding="utf-8-sig"), str(path))


def table_for(cfg: Config) -> OpTable:
    """The table `[icraft].op_table` names (relative to the config file), else the packaged one."""
    if not cfg.icraft.op_table:
        return load_op_table()
    path = cfg.resolve(cfg.icraft.op_table)
    try:
        return load_op_table(path)
    except FileNotFoundError:
        raise ConfigError(f"op-support table not found: {path}", file=cfg.file,
                          key="icraft.op_table") from None
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise ConfigError(f"cannot read the op-support table: {exc}", file=cfg.file,
                          key="icraft.op_table") from None
