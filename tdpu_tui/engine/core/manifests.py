"""The JSON facts one stage leaves for the next: the export's meta file and the replace report.

Each is a typed record with `load(path)` and `dump(path)`, and one error policy for every
stage that reads them:

- the file is missing: a usage error (`UsageError`) that names the file and the stage that
  writes it — the user ran a stage before the one it needs;
- the file cannot be read, is not JSON, or a key is missing or of the wrong type: the stage
  fails (`StageFailed`) naming the file and the key, and says which stage to run again.

Keys a newer tdpu wrote and this one does not know are kept (`extra`) and written back.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tdpu_tui.engine.core.errors import StageFailed, UsageError

T = TypeVar("T")


def read_json_object(path: Path, writer: str) -> dict[str, Any]:
    """The JSON object in `path`, under the policy above (`writer`: the stage that writes it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: not found; run the {writer} stage first") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StageFailed(f"{path}: unreadable ({exc}); run the {writer} stage again") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise StageFailed(f"{path}: not JSON ({exc}); run the {writer} stage again") from None
    if not isinstance(doc, dict):
        raise StageFailed(f"{path}: expected a JSON object, found {type(doc).__name__}; "
                          f"run the {writer} stage again")
    return doc


def _take(cls: type[T], doc: dict[str, Any], path: Path, writer: str) -> T:
    """`cls` from `doc`, each field checked against its declared type."""
    kwargs: dict[str, Any] = {}
    known = set()
    for f in dataclasses.fields(cls):    # type: ignore[arg-type]
        if f.name == "extra":
            continue
        known.add(f.name)
        has_default = (f.default is not dataclasses.MISSING
                       or f.default_factory is not dataclasses.MISSING)
        if f.name not in doc:
            if not has_default:
                raise StageFailed(f"{path}: key '{f.name}' missing; run the {writer} stage again")
            continue
        value = doc[f.name]
        kinds = _KINDS.get(str(f.type))
        if kinds is not None and not (value is None and "None" in str(f.type)) \
                and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
            raise StageFailed(f"{path}: key '{f.name}': expected {str(f.type)}, found "
                              f"{json.dumps(value)[:60]}; run the {writer} stage again")
        kwargs[f.name] = value
    if any(f.name == "extra" for f in dataclasses.fields(cls)):   # type: ignore[arg-type]
        kwargs["extra"] = {k: v for k, v in doc.items() if k not in known}
    return cls(**kwargs)


# The declared field types this module uses, as the JSON values that satisfy them.
_KINDS: dict[str, tuple[type, ...]] = {
    "str": (str,), "str | None": (str,), "int": (int,), "int | None": (int,),
    "bool": (bool,), "float | None": (int, float), "list[str]": (list,),
    "dict[str, Any]": (dict,), "dict[str, bool]": (dict,), "list[dict[str, Any]]": (list,),
}


def export_identity(graph: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What identifies an export: its meta's time and origin, and the sizes of the graph and its
    data. Copying the project (new mtimes) keeps it; exporting again changes it. The hand-off
    bundle records it whole; the replace report the time and the sizes (`source_stamp`)."""
    ident = {k: meta[k] for k in ("exported_at", "checkpoint", "profile", "seq_len", "opset")
             if k in meta}
    if meta.get("export_id"):
        ident["export_id"] = meta["export_id"]
    for f in (graph, graph.with_name(f"{graph.name}.data")):
        if f.exists():
            ident[f"{f.name} bytes"] = f.stat().st_size
    return ident


def _dump(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


@dataclass
class ExportMeta:
    """`bitnet_b1.58_full.meta.json`: what the export stage made and from what."""

    profile: str                          # "reference" | "icraft" ([export].profile)
    checkpoint: str                       # the checkpoint directory the graph was exported from
    seq_len: int
    input_name: str = "input_ids"         # "inputs_embeds" for the icraft profile
    hidden_size: int | None = None
    vocab_size: int | None = None
    num_layers: int | None = None
    linear_class: str | None = None
    opset: int | None = None
    max_position_embeddings: int | None = None
    exported_at: str | None = None        # ISO time, local: identifies the export
    extra: dict[str, Any] = field(default_factory=dict)

    WRITER = "export"

    @classmethod
    def load(cls, path: str | Path) -> ExportMeta:
        path = Path(path)
        return _take(cls, read_json_object(path, cls.WRITER), path, cls.WRITER)

    def as_json(self) -> dict[str, Any]:
        doc = asdict(self)
        return {**doc.pop("extra"), **doc}

    def dump(self, path: str | Path) -> None:
        _dump(Path(path), self.as_json())


@dataclass
class ReplaceReport:
    """`replace_report.json`: every MatMul the replace stage looked at and what it did.

    `nodes` holds one decision per node (`rewrite.bitlinear.Decision` as a dict): name,
    op_type, action ("replaced" | "kept" | "bf16"), reason, layer, projection, k, n, ...
    """

    source: str
    output: str
    layout: str
    nodes: list[dict[str, Any]]
    source_stamp: dict[str, Any] = field(default_factory=dict)  # what identifies the export
    lm_head: str = "float"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, bool] = field(default_factory=dict)    # the app's selection file
    replaced: int = 0                     # counts, as the nodes say
    kept: int = 0
    bf16: int = 0
    weight_bytes_before: int = 0          # projection weight bytes of the replaced nodes
    weight_bytes_after: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    WRITER = "replace"

    @classmethod
    def load(cls, path: str | Path) -> ReplaceReport:
        path = Path(path)
        report = _take(cls, read_json_object(path, cls.WRITER), path, cls.WRITER)
        for i, node in enumerate(report.nodes):
            if not isinstance(node, dict) or not isinstance(node.get("name"), str) \
                    or node.get("action") not in ("replaced", "kept", "bf16"):
                raise StageFailed(f"{path}: nodes[{i}]: expected an object with a name and an "
                                  f"action (replaced, kept or bf16); run the {cls.WRITER} stage again")
        return report

    def with_action(self, action: str) -> list[dict[str, Any]]:
        return [d for d in self.nodes if d["action"] == action]

    def as_json(self) -> dict[str, Any]:
        doc = asdict(self)
        nodes = doc.pop("nodes")
        return {**doc.pop("extra"), **doc, "nodes": nodes}

    def dump(self, path: str | Path) -> None:
        _dump(Path(path), self.as_json())
