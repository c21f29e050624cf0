"""What a bug record is and which values it accepts (the template in `docs/` and the README).

Stage values (发现阶段) are the template's; a pipeline stage name maps to one through the
mapping the faces pass in (the stage registry's `bug_stages()`), so this package never needs
to know the stages. Status values (状态) also take English aliases on the command line.

Messages are in both languages: the team writes Chinese and English.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tdpu_tui.engine.core.errors import TdpuError

STAGE_VALUES = ("导出", "编译", "仿真", "替换")
STATUS_VALUES = ("未解决", "已解决", "待验证")
# English aliases of the status values, as `--stage` takes the pipeline's stage names.
STATUS_ALIASES = {"unresolved": "未解决", "resolved": "已解决", "to-verify": "待验证"}
TITLE_LINE = "# Phase 3 Bug记录"
TEMPLATE_HEADER = TITLE_LINE + "\n\n"
TIME_FORMAT = "%Y-%m-%d %H:%M"
CONFLICT_KEY = "冲突"
# A record number longer than this is a typo, not a record (and Python refuses to read
# integers of more than 4300 digits).
MAX_NUMBER_DIGITS = 18

# Record attribute -> bullet key, in template order.
FIELD_KEYS = {
    "time": "发现时间",
    "stage": "发现阶段",
    "error": "错误信息",
    "cause": "根本原因",
    "fix": "解决方案",
    "status": "状态",
}
KEY_FIELDS = {v: k for k, v in FIELD_KEYS.items()}
ORDER = list(FIELD_KEYS)
EDITABLE = ("title", *ORDER, "extra")
# Fields whose value is one line: lines nested under their bullet are notes, not the value.
ONE_LINE_FIELDS = frozenset({"time", "stage", "status"})
# How the form and the messages name a field: both languages.
FIELD_LABELS = {"title": "标题 title", "time": "发现时间 time", "stage": "发现阶段 stage",
                "error": "错误信息 error", "cause": "根本原因 cause", "fix": "解决方案 fix",
                "status": "状态 status", "extra": "其他条目 extra", "number": "编号 number"}


class BugValidationError(TdpuError):
    """A value the bug book does not accept; `.field` names the record attribute, `.reason`
    says what is wrong in both languages (`.reason_en`, `.reason_zh` each alone)."""

    def __init__(self, field: str, message: str, zh: str = ""):
        self.field = field
        self.reason_en = message
        self.reason_zh = zh
        self.reason = f"{zh} · {message}" if zh else message
        label = FIELD_KEYS.get(field)
        super().__init__(f"{label} ({field}): {self.reason}" if label else f"{field}: {self.reason}")


class BugBookError(TdpuError):
    """The bug file cannot be read as a bug book (names the file and the line)."""


@dataclass
class BugRecord:
    number: int
    title: str
    time: str = ""
    stage: str = ""
    error: str = ""
    cause: str = ""
    fix: str = ""
    status: str = ""
    extra: list[tuple[str, str]] = field(default_factory=list)
    # Failure signature of a draft (see drafts.failure_signature); "" for records written by hand.
    signature: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extra"] = [list(kv) for kv in self.extra]
        return d


def content(r: BugRecord) -> tuple:
    """What a person edits in a record (not its number, not the draft signature)."""
    return (r.title, r.time, r.stage, r.error, r.cause, r.fix, r.status,
            tuple(tuple(kv) for kv in r.extra))


# -- stage and status values ---------------------------------------------------------------------

def _aliases(bug_stages: Mapping[str, str]) -> str:
    by_label: dict[str, list[str]] = {}
    for name, label in bug_stages.items():
        by_label.setdefault(label, []).append(name)
    return ", ".join(f"{'/'.join(names)} → {label}" for label, names in by_label.items())


def stage_label(stage_name: str, bug_stages: Mapping[str, str]) -> str:
    """发现阶段 of a pipeline stage (`export` -> 导出 through `bug_stages`, the registry's
    stage name -> 发现阶段 mapping); a template value is returned as is."""
    if stage_name in STAGE_VALUES:
        return stage_name
    label = bug_stages.get(stage_name)
    if label in STAGE_VALUES:
        return label
    known = ", ".join([*bug_stages, *STAGE_VALUES])
    raise BugValidationError("stage", f"expected a stage name ({known}), found {stage_name!r}",
                             f"应为阶段名（{known}），实为 {stage_name!r}")


def parse_stage(value: Any, bug_stages: Mapping[str, str]) -> str:
    """发现阶段 of a value typed on the command line: a template value (导出 …) or a pipeline
    stage name in any case (`export` -> 导出 through `bug_stages`). The records hold the template
    value only; an unknown value raises BugValidationError listing both forms."""
    if isinstance(value, str):
        v = value.strip()
        if v in STAGE_VALUES:
            return v
        names = {k.lower(): k for k in bug_stages}
        if v.lower() in names and bug_stages[names[v.lower()]] in STAGE_VALUES:
            return bug_stages[names[v.lower()]]
    values = ", ".join(STAGE_VALUES)
    raise BugValidationError(
        "stage", f"expected one of {values}, or a pipeline stage name ({_aliases(bug_stages)}); "
                 f"found {value!r}",
        f"应为 {values} 之一，或流水线阶段名，实为 {value!r}")


def parse_status(value: Any) -> str:
    """状态 of a typed value: a template value or its English alias (`resolved` -> 已解决)."""
    if isinstance(value, str):
        v = value.strip()
        if v in STATUS_VALUES:
            return v
        alias = STATUS_ALIASES.get(v.lower().replace("_", "-"))
        if alias is not None:
            return alias
    values = ", ".join(STATUS_VALUES)
    aliases = ", ".join(f"{en} → {zh}" for en, zh in STATUS_ALIASES.items())
    raise BugValidationError("status", f"expected one of {values} (or {aliases}); found {value!r}",
                             f"应为 {values} 之一（或英文 {', '.join(STATUS_ALIASES)}），实为 {value!r}")


# -- field values ----------------------------------------------------------------------------------

def text_value(field_name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise BugValidationError(field_name, f"expected text, found {type(value).__name__} {value!r}",
                                 f"应为文本，实为 {type(value).__name__} {value!r}")
    return value.replace("\r\n", "\n").replace("\r", "\n")


def title_value(value: Any) -> str:
    value = text_value("title", value)
    if "\n" in value:
        raise BugValidationError("title", f"expected one line, found {value!r}",
                                 f"标题只能有一行，实为 {value!r}")
    value = value.strip()
    if not value:
        raise BugValidationError("title", "expected a title, found an empty one", "标题不能为空")
    return value


def time_value(value: Any) -> str:
    if value is None:
        return _dt.datetime.now().strftime(TIME_FORMAT)
    if isinstance(value, _dt.datetime):
        return value.strftime(TIME_FORMAT)
    if isinstance(value, str):
        v = value.strip()
        with contextlib.suppress(ValueError):
            if _dt.datetime.strptime(v, TIME_FORMAT).strftime(TIME_FORMAT) == v:
                return v
    raise BugValidationError("time", f"expected YYYY-MM-DD HH:MM, found {value!r}",
                             f"时间格式应为 YYYY-MM-DD HH:MM，实为 {value!r}")


def _choice(field_name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.strip() not in allowed:
        values = ", ".join(allowed)
        raise BugValidationError(field_name, f"expected one of {values}; found {value!r}",
                                 f"应为 {values} 之一，实为 {value!r}")
    return value.strip()


def extra_value(value: Any) -> list[tuple[str, str]]:
    if value is None:
        return []
    out = []
    for item in value:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise BugValidationError("extra", f"expected (key, value) pairs, found {item!r}",
                                     f"应为（键, 值）对，实为 {item!r}")
        key, val = item
        if (not isinstance(key, str) or not key.strip() or key != key.strip()
                or re.search(r"[\n\r:：*`]", key) or key[0] in "_#[" or key[-1] == "_"):
            raise BugValidationError(
                "extra", f"expected a one-line key without ':', '*', '`' or edge '_', found {key!r}",
                f"键应为一行，不含 ':'、'*'、'`'，首尾不为 '_'，实为 {key!r}")
        if key in KEY_FIELDS:
            raise BugValidationError("extra", f"{key!r} is a field of its own, not an extra bullet",
                                     f"{key!r} 是模板字段，不能作为其他条目")
        out.append((key, text_value("extra", val)))
    return out


def validate(field_name: str, value: Any) -> Any:
    """The value as stored; BugValidationError when it is not accepted."""
    if field_name == "title":
        return title_value(value)
    if field_name == "time":
        return time_value(value)
    if field_name == "stage":
        return _choice("stage", value, STAGE_VALUES)
    if field_name == "status":
        if isinstance(value, str) and value.strip() not in STATUS_VALUES:
            return parse_status(value)
        return _choice("status", value, STATUS_VALUES)
    if field_name == "extra":
        return extra_value(value)
    return text_value(field_name, value)


def changed_value(base: BugRecord, field_name: str, value: Any) -> Any:
    """The validated new value; a value equal to the current one passes as is, so a form that
    sends every field back does not trip over a hand-written 发现时间 or a template placeholder."""
    current = getattr(base, field_name)
    if field_name == "extra":
        if value is not None and [tuple(kv) for kv in value] == current:
            return current
    elif isinstance(value, str):
        text = value.replace("\r\n", "\n").replace("\r", "\n")
        if text == current or (field_name in ("title", "time", "stage", "status")
                               and text.strip() == current):
            return current
    return validate(field_name, value)


def field_problems(values: dict[str, Any], base: BugRecord | None = None) -> dict[str, str]:
    """Field -> what is wrong with its value (both languages), by the rules `add` (no `base`)
    and `update` (`base`: the record edited; a value it already holds passes) apply."""
    problems = {}
    for name, value in values.items():
        try:
            if base is None:
                validate(name, value)
            else:
                changed_value(base, name, value)
        except BugValidationError as exc:
            problems[name] = exc.reason
    return problems
