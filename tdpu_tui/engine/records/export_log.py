"""`phase3_logs/export_log.md`: what the export stage made, checked and measured.

Written whole by each export (atomically); paths relative to the project root, times and
percentages as every record shows them (`records/style.py`).
"""

from __future__ import annotations

from typing import Any

from tdpu_tui.engine.core.artifacts import Artifacts
from tdpu_tui.engine.core.config import Config
from tdpu_tui.engine.model.agreement import Verdict
from tdpu_tui.engine.model.compare import MIN_ARGMAX_AGREEMENT
from tdpu_tui.engine.osutil.files import atomic_write_text, human_bytes
from tdpu_tui.engine.records.style import code_path, fmt_time, metric_rows, pct, verdict_line


def export_verdict(verdict: Verdict) -> str:
    """The export's verdict line; a pass below the bar says it rests on the rounding floor."""
    if not verdict.ok:
        return verdict_line([verdict.why or "the exported graph disagrees with the PyTorch reference"])
    below = verdict.metrics["argmax_agreement"] < MIN_ARGMAX_AGREEMENT
    return verdict_line([], verdict.why if below else "")


def write_export_log(paths: Artifacts, cfg: Config, meta: dict, c: Any, counts: dict[str, int],
                     sizes: dict[str, int], op_hist: dict[str, int], verdict: Verdict,
                     timings: dict[str, float],
                     peak: int, export_rss: int, n_raw: int, linear_class: str) -> None:
    root = cfg.base_dir
    m = verdict.metrics
    profile = meta["profile"]
    if profile == "icraft":
        io_rows = [("输入 input", "inputs_embeds", "float32", f"[1, {cfg.export.seq_len}, {c.hidden_size}]"),
                   ("输出 output", "logits", "float32", f"[1, {cfg.export.seq_len}, {c.vocab_size}]")]
    else:
        io_rows = [("输入 input", "input_ids", "int64", "[batch, seq]"),
                   ("输出 output", "logits", "float32", f"[batch, seq, {c.vocab_size}]")]
    total_params = sum(counts.values())
    lines = [
        "# Phase 3 导出记录 (export log)",
        "",
        f"- **结论 Verdict**: {export_verdict(verdict)}",
        f"- **时间 Time**: {fmt_time(meta.get('exported_at'), zone=True)}",
        f"- **检查点 checkpoint**: {code_path(meta['checkpoint'], root)}",
        f"- **输出 output**: {code_path(paths.full_onnx, root)}",
        f"- **profile**: `{profile}` · opset {cfg.export.opset} · linear_class `{linear_class}`",
        "",
        "## 模型信息 (model)",
        "",
        "| 项 | 值 |", "|---|---|",
        f"| 层数 layers | {c.num_hidden_layers} |",
        f"| hidden / intermediate | {c.hidden_size} / {c.intermediate_size} |",
        f"| heads / KV heads / head_dim | {c.num_attention_heads} / {c.num_key_value_heads} / {c.head_dim} |",
        f"| vocab | {c.vocab_size} |",
        f"| rms_norm_eps / rope_theta | {c.rms_norm_eps} / {c.rope_theta} |",
        "",
        "## 参数量 (parameters)",
        "",
        "| kind | parameters |", "|---|---:|",
        *[f"| {k} | {v:,} |" for k, v in counts.items()],
        f"| **total** | **{total_params:,}** |",
        "",
        "## 文件大小 (sizes)",
        "",
        "| file | bytes | |", "|---|---:|---|",
        *[f"| {k} | {v:,} | {human_bytes(v)} |" for k, v in sizes.items()],
        "",
        f"`{paths.full_raw.name}`: {n_raw} ternary projections packed in `tdpu` order, index in "
        f"`{paths.full_raw_index.name}` (format in the README).",
        "",
        "## 输入输出 (inputs and outputs)",
        "",
        "| | name | dtype | shape |", "|---|---|---|---|",
        *[f"| {a} | `{b}` | {t} | {s} |" for a, b, t, s in io_rows],
        "",
        "## 算子统计 (op types)",
        "",
        f"MatMul/Gemm nodes: **{op_hist.get('MatMul', 0) + op_hist.get('Gemm', 0)}** "
        f"(ternary projections: {7 * c.num_hidden_layers}).",
        "",
        "| op | count |", "|---|---:|",
        *[f"| {k} | {v} |" for k, v in op_hist.items()],
        "",
        "## 验证 (verification)",
        "",
        "`onnx.checker` full check (with strict shape inference): ok.",
        "",
        f"ONNX Runtime logits against the PyTorch reference on seeded inputs "
        f"(activation quantization {'in the graph and in the reference' if profile == 'reference' else 'off in both'}):",
        "",
        "| metric | value |", "|---|---:|",
        *metric_rows(m),
        "",
    ]
    if verdict.floor is not None:
        f = verdict.floor
        lines += [
            f"Below the {pct(MIN_ARGMAX_AGREEMENT)} bar, measured against the reference's own rounding "
            f"floor, its input moved by one ulp: argmax agreement {pct(f['argmax_agreement'])}, "
            f"mean abs diff {f['mean_abs']:.4g}.",
            "",
            f"> {verdict.why}",
            "",
        ]
    if profile == "icraft":
        lines += [
            "> **Activation quantization is not in this graph.** BitNet quantizes every projection's",
            "> input per token to int8 (absmax, round-half-even). Icraft documents neither `Round` nor",
            "> `Div` by a tensor, so the icraft profile exports the float graph and leaves activation",
            "> quantization to Icraft's quantizer; `validate` compares the BitLinear graph with the",
            "> PyTorch reference (which quantizes) instead of with this float graph.",
            "",
        ]
    lines += [
        "## 耗时与内存 (timings and memory)",
        "",
        "| step | seconds |", "|---|---:|",
        *[f"| {k} | {v:.2f} |" for k, v in timings.items()],
        "",
        f"Peak RSS of the process: {human_bytes(export_rss)} after writing the graph, "
        f"{human_bytes(peak)} at the end (verification included). It is the whole process's peak "
        "since it started, so when the app ran the export it includes the app and earlier runs; "
        "`tdpu --batch --stage export` measures the export alone.",
        "",
    ]
    atomic_write_text(paths.export_log, "\n".join(lines))
