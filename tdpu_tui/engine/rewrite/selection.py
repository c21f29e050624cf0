"""Which MatMuls are replaced: `[replace].include/exclude` globs, then the app's per-node file."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from pathlib import Path


from tdpu_tui.engine.core.errors import GraphError
from tdpu_tui.engine.osutil.files import atomic_write_text
from tdpu_tui.engine.rewrite.inventory import ALREADY, MatMulNode


def load_selection(path: str | Path) -> dict[str, bool]:
    """The app's per-node overrides (node name -> selected); {} when the file does not exist."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GraphError(f"{path}: not a readable selection file: {exc}") from None
    if isinstance(data, dict) and "nodes" in data and isinstance(data["nodes"], dict):
        data = data["nodes"]
    if not isinstance(data, dict) or not all(isinstance(v, bool) for v in data.values()):
        raise GraphError(f"{path}: expected a JSON object of node name -> true/false")
    return {str(k): v for k, v in data.items()}



def save_selection(path: str | Path, mapping: Mapping[str, bool]) -> None:
    clean = {str(k): bool(v) for k, v in mapping.items()}
    atomic_write_text(path, json.dumps(clean, indent=2, ensure_ascii=False, sort_keys=True) + "\n")



def glob_reason(name: str, include: list[str], exclude: list[str]) -> tuple[bool, str]:
    hit = next((p for p in include if fnmatch.fnmatchcase(name, p)), None)
    if hit is None:
        return False, f"not selected: matches no [replace].include glob {include}"
    ex = next((p for p in exclude if fnmatch.fnmatchcase(name, p)), None)
    if ex is not None:
        return False, f"not selected: excluded by [replace].exclude {ex!r}"
    return True, f"selected by [replace].include {hit!r}"



def resolve_selection(nodes: list[MatMulNode], cfg, overrides: Mapping[str, bool] | None = None
                      ) -> dict[str, bool]:
    """Node name -> replace it? Globs from `[replace]`, then the per-node overrides.

    A non-ternary node picked by a glob is simply kept (its reason is reported); picking one
    explicitly in the overrides is an error naming the node and why it cannot be replaced.
    """
    rc = cfg.replace if hasattr(cfg, "replace") else cfg
    overrides = dict(overrides or {})
    out: dict[str, bool] = {}
    for node in nodes:
        if node.status == ALREADY:
            out[node.name] = False
            continue
        if node.name in overrides:
            want = overrides[node.name]
            if want and not node.ternary:
                raise GraphError(
                    f"node {node.name!r} is selected for replacement but is not ternary: {node.status}")
            out[node.name] = want
            continue
        selected, _ = glob_reason(node.name, rc.include, rc.exclude)
        out[node.name] = selected and node.ternary
    return out



def selection_reason(node: MatMulNode, cfg, overrides: Mapping[str, bool] | None) -> str:
    """Why `resolve_selection` decided as it did for one node (for the per-node report)."""
    rc = cfg.replace if hasattr(cfg, "replace") else cfg
    if node.status == ALREADY:
        return ALREADY
    if overrides and node.name in overrides:
        return "selected in the selection file" if overrides[node.name] else "deselected in the selection file"
    selected, why = glob_reason(node.name, rc.include, rc.exclude)
    if selected and not node.ternary:
        return node.status
    return why
