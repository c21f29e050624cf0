"""How every record reads: paths, times, percentages, ratios and verdict lines, in one place.

The records (`phase3_logs/*.md`) and the `--json` summary are read by people over SSH, in
Chinese and English, and pasted into reports; these helpers keep them saying things one way:

- paths relative to the project root (the directory of tdpu.toml), absolute only outside it;
- times as `YYYY-MM-DD HH:MM:SS` local time, the zone (`UTC+08:00`) once in a record's header;
- percentages with two decimals (`99.22%`), the same for measured values and thresholds;
- speed and size ratios in words ("5.0 × slower than float", "0.43 × float (2.3 × faster)");
- verdict lines with at most one level of parentheses.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

# Within this factor of 1 a ratio reads "about the same": timing noise on a shared machine.
SAME_WITHIN = 1.05


# paths ------------------------------------------------------------------------------------

def rel_path(path: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> str:
    """`path` relative to the project `root` (with `/`), or absolute when it lies outside.

    Without a root the path is shown absolute. A relative `path` is taken from the current
    directory, as the process that wrote it would.
    """
    absolute = Path(os.path.abspath(path))
    if root is None:
        return str(absolute)
    base = Path(os.path.abspath(root))
    for a, b in ((absolute, base), (absolute.resolve(), base.resolve())):
        try:
            rel = a.relative_to(b)
        except ValueError:
            continue
        return rel.as_posix() or "."
    return str(absolute)


def code_path(path: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> str:
    """`rel_path` in backticks, for markdown."""
    return f"`{rel_path(path, root)}`"


_FENCE_RE = re.compile(r"^(`{3,}|~{3,})", re.M)


def relative_text(text: str, root: str | os.PathLike[str] | None) -> str:
    """Markdown with the absolute paths under `root` written relative to it.

    Fenced blocks (commands, log lines) are kept verbatim: a command stays copy-pasteable
    from any directory and a log line stays what the tool printed.
    """
    if root is None or not text:
        return text
    bases = {os.path.abspath(root), str(Path(root).resolve())}
    out: list[str] = []
    fence: str | None = None
    for line in text.splitlines(keepends=True):
        m = _FENCE_RE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            out.append(line)
            continue
        if fence is not None:
            if line.strip().startswith(fence) and line.strip().strip(fence[0]) == "":
                fence = None
            out.append(line)
            continue
        for base in sorted(bases, key=len, reverse=True):
            line = _relative_line(line, base)
        out.append(line)
    return "".join(out)


def _relative_line(line: str, base: str) -> str:
    sep = re.escape(os.sep)
    # The root itself, or the root followed by a separator; never a longer name (/p vs /p2).
    pattern = re.compile(r"(?<![\w./\\-])" + re.escape(base.rstrip(os.sep)) + r"(?:" + sep + r"|(?![\w.-]))")

    def sub(m: re.Match[str]) -> str:
        return "" if m.group(0).endswith(os.sep) else "."

    return pattern.sub(sub, line)


# times ------------------------------------------------------------------------------------

def _local(when: float | _dt.datetime | str | None) -> _dt.datetime:
    if when is None:
        return _dt.datetime.now().astimezone()
    if isinstance(when, str):
        when = _dt.datetime.fromisoformat(when)
    if isinstance(when, _dt.datetime):
        return when.astimezone()      # a naive datetime is taken as local time
    return _dt.datetime.fromtimestamp(float(when)).astimezone()


def fmt_time(when: float | _dt.datetime | str | None = None, *, zone: bool = False) -> str:
    """`YYYY-MM-DD HH:MM:SS` in local time (now when `when` is None), `zone` adds `UTC+08:00`.

    `when` is an epoch time, a datetime (naive means local) or an ISO 8601 string.
    """
    t = _local(when)
    text = t.strftime(TIME_FORMAT)
    return f"{text} {zone_name(t)}" if zone else text


def zone_name(when: float | _dt.datetime | str | None = None) -> str:
    """The local zone as an offset, `UTC+08:00` (unambiguous, unlike `CST`)."""
    offset = _local(when).utcoffset() or _dt.timedelta(0)
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    h, m = divmod(abs(minutes), 60)
    return f"UTC{sign}{h:02d}:{m:02d}"


# numbers ----------------------------------------------------------------------------------

def pct(fraction: float | None) -> str:
    """A fraction as a percentage with two decimals: 0.9922 -> `99.22%`."""
    return "n/a" if fraction is None else f"{float(fraction):.2%}"


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{float(value):.2f} s"


def metric_value(key: str, value: object) -> str:
    """A comparison metric the way every record shows it (agreement as a percentage)."""
    if value is None:
        return "n/a"
    if key.endswith("agreement"):
        return pct(float(value))                                # type: ignore[arg-type]
    if key == "cosine":
        return f"{float(value):.6f}"                            # type: ignore[arg-type]
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


METRIC_LABELS = {"max_abs": "max abs diff", "mean_abs": "mean abs diff", "cosine": "cosine",
                 "argmax_agreement": "argmax agreement"}


def metric_rows(metrics: dict, keys=("max_abs", "mean_abs", "cosine", "argmax_agreement")) -> list[str]:
    """Markdown table rows `| label | value |` for the comparison metrics present."""
    rows = []
    for k in keys:
        if k not in metrics:
            continue
        value = metric_value(k, metrics[k])
        if k == "argmax_agreement" and "positions" in metrics:
            value += f" of {int(metrics['positions'])} positions"
        rows.append(f"| {METRIC_LABELS.get(k, k)} | {value} |")
    return rows


def factor(x: float) -> str:
    """A ratio to two significant figures, the way people say them: 16, 5.0, 0.43, 0.063."""
    if x >= 10:
        return f"{x:.0f}"
    if x >= 1:
        return f"{x:.1f}"
    return f"{x:.2g}"


def ratio_words(subject: str, ratio: float | None, base: str, *, kind: str = "time",
                why: str = "") -> str:
    """A ratio `subject / base` in words.

    time: "BitLinear step 5.0 × slower than float", "BitLinear step 0.43 × float (2.3 × faster)";
    size: "… 16 × larger than float", "… 0.063 × float (16 × smaller)". `why` is said in the one
    pair of parentheses.
    """
    if ratio is None or ratio <= 0:
        return f"{subject}: not measured against {base}"
    more, less, same = (("slower", "faster", "as fast as") if kind == "time"
                        else ("larger", "smaller", "the same size as"))
    if 1 / SAME_WITHIN < ratio < SAME_WITHIN:
        text, inside = f"{subject} about {same} {base}", [f"{ratio:.2f} ×"]
    elif ratio >= SAME_WITHIN:
        text, inside = f"{subject} {factor(ratio)} × {more} than {base}", []
    else:
        text, inside = f"{subject} {factor(ratio)} × {base}", [f"{factor(1 / ratio)} × {less}"]
    if why:
        inside.append(why)
    return flat_parens(text + (f" ({'; '.join(inside)})" if inside else ""))


# verdict lines ----------------------------------------------------------------------------

PASSED = "通过 passed"
FAILED = "未通过 failed"


def verdict_line(problems: list[str], tolerance: str = "") -> str:
    """`通过 passed`, `通过 passed within tolerance: …` or `未通过 failed: …; …`.

    A pass that rests on a tolerance (argmax agreement below the bar, accepted as near ties
    within the reference's own rounding floor) says so in the line itself.
    """
    if problems:
        return flat_parens(f"{FAILED}: " + "; ".join(p.rstrip(". ") for p in problems))
    if tolerance:
        return flat_parens(f"{PASSED} within tolerance: {tolerance.rstrip('. ')}")
    return PASSED


def flat_parens(text: str) -> str:
    """`text` with parentheses nested inside others turned into commas: "a (b (c) d)" ->
    "a (b, c, d)". Verdict lines are read at a glance; one level is enough."""
    out: list[str] = []
    depth = 0
    pending_comma = False
    for ch in text:
        if pending_comma and not ch.isspace():
            spaced = bool(out) and out[-1] == " "
            while out and out[-1] == " ":
                out.pop()
            if ch not in ",;:.)":
                out.append(",")
            if spaced or ch not in ",;:.)":
                out.append(" ")
            pending_comma = False
            if ch == " ":
                continue
        if ch == "(":
            depth += 1
            if depth > 1:
                while out and out[-1] == " ":
                    out.pop()
                out.append(", ")
                continue
        elif ch == ")":
            depth = max(depth - 1, 0)
            if depth >= 1:
                pending_comma = True
                continue
        out.append(ch)
    return "".join(out)


def has_nested_parens(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += ch == "("
        if depth > 1:
            return True
        depth -= ch == ")" and depth > 0
    return False
