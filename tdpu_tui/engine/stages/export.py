"""The `export` stage: checkpoint -> verified ONNX graph, the board's `.raw` weights, export_log.md."""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from tdpu_tui.engine.model.agreement import Verdict, versus_reference
from tdpu_tui.engine.core.artifacts import Artifacts
from tdpu_tui.engine.model.checkpoint import Checkpoint, open_checkpoint
from tdpu_tui.engine.core.config import Config
from tdpu_tui.engine.core.errors import StageFailed, UsageError
from tdpu_tui.engine.osutil.files import (
    atomic_write_text,
    commit_files,
    human_bytes,
    staging_dir,
)
from tdpu_tui.engine.core.stage import Stage, StageContext
from tdpu_tui.engine.osutil.platform import peak_rss_bytes
from tdpu_tui.engine.model.compare import (
    MIN_ARGMAX_AGREEMENT,
    format_comparison,
    graph_bytes,
    onnx_logits,
    ort_session,
    seeded_inputs,
)

RAW_ALIGN = 64
RAW_LAYOUT = "tdpu"


def resolve_checkpoint(cfg: Config, ctx: StageContext | None = None) -> Path:
    """The checkpoint directory of `[model].source`, writing the synthetic one if needed."""
    source = cfg.model_source
    if source == "synthetic":
        from tdpu_tui.engine.model.synthetic import ensure_synthetic

        def progress(done: float, total: float | None = None, note: str = "") -> None:
            if ctx is not None:
                ctx.progress(done, total, f"synthetic checkpoint {note}".strip())

        return ensure_synthetic(cfg, on_progress=progress)
    path = Path(source)
    if not path.is_dir():
        raise UsageError(f"{cfg.file}: [model].source: checkpoint directory not found: {path}")
    return path


def verification_inputs(cfg: Config, ckpt: Checkpoint, profile: str) -> dict[str, np.ndarray]:
    """Seeded inputs for the exported graph: token ids, or their embeddings (icraft profile)."""
    e = cfg.export
    if profile == "icraft":
        return seeded_inputs(ckpt, profile, 1, e.seq_len, e.verify_seed)
    tokens = min(e.verify_tokens, ckpt.config.max_position_embeddings)
    return seeded_inputs(ckpt, profile, e.verify_batch, tokens, e.verify_seed)


def write_raw(ckpt: Checkpoint, raw_path: Path, ctx: StageContext) -> list[dict[str, Any]]:
    """Every ternary projection packed in tdpu order, concatenated (64-byte aligned)."""
    index: list[dict[str, Any]] = []
    offset = 0
    with open(raw_path, "wb") as fh:
        for name in ckpt.projection_names():
            packed, scale = ckpt.packed(name, RAW_LAYOUT)
            pad = (-offset) % RAW_ALIGN
            fh.write(b"\0" * pad)
            offset += pad
            data = np.ascontiguousarray(packed)
            fh.write(memoryview(data.reshape(-1)).cast("B"))
            index.append({
                "name": f"{name}.weight", "offset": offset, "bytes": data.nbytes,
                "N": int(data.shape[0] * 4), "K": int(data.shape[1]), "layout": RAW_LAYOUT,
                "weight_scale": float(scale), "sha256": hashlib.sha256(data).hexdigest(),
            })
            offset += data.nbytes
            ctx.check_cancelled()
    return index


def parameter_counts(ckpt: Checkpoint) -> dict[str, int]:
    c = ckpt.config
    counts: collections.Counter[str] = collections.Counter()
    if c.tie_word_embeddings:
        counts["embedding (tied lm_head)"] = c.vocab_size * c.hidden_size
    else:
        counts["embedding"] = counts["lm_head"] = c.vocab_size * c.hidden_size
    attn = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    per_layer_attn = c.hidden_size * attn + 2 * c.hidden_size * kv + attn * c.hidden_size
    per_layer_mlp = 3 * c.hidden_size * c.intermediate_size
    counts["attention projections (ternary)"] = per_layer_attn * c.num_hidden_layers
    counts["MLP projections (ternary)"] = per_layer_mlp * c.num_hidden_layers
    counts["norms"] = c.num_hidden_layers * (2 * c.hidden_size + attn + c.intermediate_size) + c.hidden_size
    counts["weight scales"] = 7 * c.num_hidden_layers
    return dict(counts)


class ExportStage(Stage):
    name = "export"
    title = "Export ONNX"
    needs = ()
    bug_stage = "导出"

    def run(self, ctx: StageContext) -> str:
        import onnx

        from tdpu_tui.engine.model.onnx_graph import BitNetOnnx
        from tdpu_tui.engine.graph.external import ExternalData

        cfg, paths = ctx.config, ctx.paths
        profile = cfg.export.profile
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        ckpt_dir = resolve_checkpoint(cfg, ctx)
        timings["checkpoint"] = time.perf_counter() - t0
        ctx.log(f"checkpoint: {ckpt_dir}")
        with open_checkpoint(ckpt_dir) as ckpt, staging_dir(paths.output) as stage_dir:
            c = ckpt.config
            for w in ckpt.warnings:
                ctx.log(w, "warning")
            ctx.log(f"model: {c.num_hidden_layers} layers, hidden {c.hidden_size}, intermediate "
                    f"{c.intermediate_size}, heads {c.num_attention_heads}/{c.num_key_value_heads}, "
                    f"vocab {c.vocab_size}, linear_class {c.linear_class}")
            if profile == "icraft" and cfg.export.seq_len > c.max_position_embeddings:
                raise StageFailed(f"{cfg.file}: [export].seq_len = {cfg.export.seq_len} exceeds the "
                                  f"model's max_position_embeddings {c.max_position_embeddings}")
            onnx_tmp = stage_dir / paths.full_onnx.name
            data_tmp = stage_dir / paths.full_onnx_data.name
            raw_tmp = stage_dir / paths.full_raw.name

            t = time.perf_counter()
            data = ExternalData(data_tmp, paths.full_onnx_data.name)
            try:
                builder = BitNetOnnx(ckpt, profile, cfg.export.seq_len, cfg.export.opset, data,
                                     on_layer=lambda i, n: ctx.progress(i, n, f"layer {i}/{n}"))
                model = builder.build()
            finally:
                data.close()
            onnx.save(model, onnx_tmp)
            op_hist = dict(sorted(builder.g.op_counts.items(), key=lambda kv: (-kv[1], kv[0])))
            del model
            timings["build ONNX"] = time.perf_counter() - t
            export_rss = peak_rss_bytes()
            ctx.log(f"graph written: {sum(op_hist.values())} nodes, {human_bytes(data_tmp.stat().st_size)} "
                    f"external data, peak RSS so far {human_bytes(export_rss)}")

            t = time.perf_counter()
            ctx.progress(0, None, "onnx.checker (full check)")
            try:
                onnx.checker.check_model(str(onnx_tmp), full_check=True)
            except onnx.checker.ValidationError as exc:
                raise StageFailed(f"onnx.checker rejected the exported graph: {exc}") from None
            timings["onnx.checker + shape inference"] = time.perf_counter() - t
            ctx.log("onnx.checker: ok (full check with shape inference)")

            t = time.perf_counter()
            ctx.progress(0, None, "verifying against the PyTorch reference")
            inputs = verification_inputs(cfg, ckpt, profile)
            # The session outlives the staging folder: simulate (and the app's next stages) run
            # the same graph, so it is handed to the run cache under the graph's final name.
            session = ort_session(onnx_tmp)
            got = onnx_logits(onnx_tmp, inputs, session)
            st = onnx_tmp.stat()     # a rename keeps size and mtime: the key of the final file
            ctx.cache.put("ort-session", (str(paths.full_onnx.resolve()), st.st_size, st.st_mtime_ns,
                                          ort_session.__name__), session, graph_bytes(onnx_tmp))
            del session              # not held (too large for the cache): freed before the reference
            verdict = versus_reference(ckpt, inputs, got, quantize=profile == "reference",
                                       cache=ctx.cache)
            m = verdict.metrics
            timings["verification"] = time.perf_counter() - t
            ctx.log(f"ONNX Runtime vs PyTorch reference: {format_comparison(m)}")
            for k, v in m.items():
                ctx.metric(k, v)
            if verdict.floor is not None:
                ctx.metric("reference_floor", verdict.floor)
            if not verdict.ok:
                raise StageFailed(f"exported graph disagrees with the PyTorch reference: {verdict.why}")
            if verdict.why:
                ctx.log(verdict.why, "warning")

            t = time.perf_counter()
            ctx.progress(0, None, "writing .raw weights (tdpu packing)")
            index = write_raw(ckpt, raw_tmp, ctx)
            timings["raw weights"] = time.perf_counter() - t

            raw_index = {
                "format": "tdpu-raw/1", "layout": RAW_LAYOUT, "alignment": RAW_ALIGN,
                "file": paths.full_raw.name, "source": str(ckpt_dir),
                "tensors": index,
            }
            index_tmp = stage_dir / paths.full_raw_index.name
            index_tmp.write_text(json.dumps(raw_index, indent=1) + "\n", encoding="utf-8")
            input_name = "inputs_embeds" if profile == "icraft" else "input_ids"
            meta = {
                "profile": profile, "checkpoint": str(ckpt_dir), "seq_len": cfg.export.seq_len,
                "input_name": input_name, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
                "num_layers": c.num_hidden_layers, "linear_class": c.linear_class,
                "opset": cfg.export.opset, "max_position_embeddings": c.max_position_embeddings,
                "exported_at": dt.datetime.now().isoformat(timespec="seconds"),
            }
            meta_tmp = stage_dir / paths.export_meta.name
            meta_tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
            sizes = {
                "checkpoint (safetensors)": ckpt.nbytes,
                paths.full_onnx.name: onnx_tmp.stat().st_size,
                paths.full_onnx_data.name: data_tmp.stat().st_size,
                paths.full_raw.name: raw_tmp.stat().st_size,
            }
            # The graph last: an interrupted commit never leaves a graph pointing at old data.
            commit_files([(data_tmp, paths.full_onnx_data), (raw_tmp, paths.full_raw),
                          (index_tmp, paths.full_raw_index), (meta_tmp, paths.export_meta),
                          (onnx_tmp, paths.full_onnx)])
            counts = parameter_counts(ckpt)
            linear_class = c.linear_class

        for name, p in (("onnx", paths.full_onnx), ("onnx_data", paths.full_onnx_data),
                        ("raw", paths.full_raw), ("raw_index", paths.full_raw_index),
                        ("export_meta", paths.export_meta), ("export_log", paths.export_log)):
            ctx.artifact(name, p)
        timings["total"] = time.perf_counter() - t0
        peak = peak_rss_bytes()
        ctx.metric("peak_rss_bytes", peak)
        ctx.metric("export_peak_rss_bytes", export_rss)
        ctx.metric("nodes", sum(op_hist.values()))
        ctx.metric("matmul_nodes", op_hist.get("MatMul", 0) + op_hist.get("Gemm", 0))
        ctx.metric("seconds_by_step", {k: round(v, 3) for k, v in timings.items()})
        write_export_log(paths, cfg, meta, c, counts, sizes, op_hist, verdict, timings, peak, export_rss,
                         len(index), linear_class)
        return (f"{profile} profile, {sum(op_hist.values())} nodes, argmax agreement "
                f"{m['argmax_agreement']:.2%}, max |Δ| {m['max_abs']:.2g}")


def write_export_log(paths: Artifacts, cfg: Config, meta: dict, c: Any, counts: dict[str, int],
                     sizes: dict[str, int], op_hist: dict[str, int], verdict: Verdict,
                     timings: dict[str, float],
                     peak: int, export_rss: int, n_raw: int, linear_class: str) -> None:
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
        f"- **时间**: {meta['exported_at']}",
        f"- **检查点 checkpoint**: `{meta['checkpoint']}`",
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
        f"| max abs diff | {m['max_abs']:.4g} |",
        f"| mean abs diff | {m['mean_abs']:.4g} |",
        f"| cosine | {m['cosine']:.6f} |",
        f"| argmax agreement | {m['argmax_agreement']:.2%} ({m['positions']} positions) |",
        "",
    ]
    if verdict.floor is not None:
        f = verdict.floor
        lines += [
            f"Below the {MIN_ARGMAX_AGREEMENT:.0%} bar, measured against the reference's own rounding floor "
            f"(its input moved by one ulp): argmax agreement {f['argmax_agreement']:.2%}, "
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
