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

from tdpu_tui.engine.core.cache import free_memory
from tdpu_tui.engine.core.config import Config
from tdpu_tui.engine.core.errors import StageFailed, UsageError
from tdpu_tui.engine.core.manifests import ExportMeta
from tdpu_tui.engine.core.stage import Stage, StageContext
from tdpu_tui.engine.model.agreement import versus_reference
from tdpu_tui.engine.model.checkpoint import Checkpoint, open_checkpoint
from tdpu_tui.engine.model.compare import (
    format_comparison,
    graph_bytes,
    graph_session,
    onnx_logits,
    ort_session,
    seeded_inputs,
)
from tdpu_tui.engine.osutil.files import (
    commit_files,
    human_bytes,
    staging_dir,
)
from tdpu_tui.engine.osutil.platform import peak_rss_bytes
from tdpu_tui.engine.records.export_log import write_export_log
from tdpu_tui.engine.records.style import pct

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

        from tdpu_tui.engine.graph.external import ExternalData
        from tdpu_tui.engine.model.onnx_graph import BitNetOnnx

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
                # the user's setting against this model: a usage mistake, reported, not drafted
                raise UsageError(f"{cfg.file}: [export].seq_len = {cfg.export.seq_len} exceeds the "
                                 f"model's max_position_embeddings {c.max_position_embeddings}; "
                                 f"set [export].seq_len to at most {c.max_position_embeddings}")
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
            # A graph too large for one session runs in segments (model.segmented), one loaded
            # at a time. A whole session outlives the staging folder: simulate (and the app's
            # next stages) run the same graph, so it is handed to the run cache under the
            # graph's final name (a segmented one reads its data from the staging folder: not).
            session = graph_session(onnx_tmp, make_room=ctx.cache.make_room)
            got = onnx_logits(onnx_tmp, inputs, session)
            segments = getattr(session, "segments", None)
            if segments is None:
                st = onnx_tmp.stat()     # a rename keeps size and mtime: the key of the final file
                ctx.cache.put("ort-session", (str(paths.full_onnx.resolve()), st.st_size, st.st_mtime_ns,
                                              ort_session.__name__), session, graph_bytes(onnx_tmp))
            else:
                ctx.log(f"ONNX Runtime ran the graph in {len(segments)} segments of at most "
                        f"{human_bytes(max(g.nbytes for g in segments))} of weights each, one loaded at "
                        f"a time ({human_bytes(session.nbytes)} in all)")
            del session              # not held (too large for the cache): freed before the reference
            free_memory()
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
            meta = ExportMeta(
                profile=profile, checkpoint=str(ckpt_dir), seq_len=cfg.export.seq_len,
                input_name=input_name, hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                num_layers=c.num_hidden_layers, linear_class=c.linear_class,
                opset=cfg.export.opset, max_position_embeddings=c.max_position_embeddings,
                exported_at=dt.datetime.now().isoformat(timespec="seconds"))
            meta_tmp = stage_dir / paths.export_meta.name
            meta.dump(meta_tmp)
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
        write_export_log(paths, cfg, meta.as_json(), c, counts, sizes, op_hist, verdict, timings, peak, export_rss,
                         len(index), linear_class)
        return (f"{profile} profile, {sum(op_hist.values())} nodes, argmax agreement "
                f"{pct(m['argmax_agreement'])}" + (" within tolerance" if verdict.why else "")
                + f", max |Δ| {m['max_abs']:.2g}")
