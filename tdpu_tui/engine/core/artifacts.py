"""Where every artifact lives (docs/spec.md §1). One place, so the stages and both faces agree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tdpu_tui.engine.core.config import Config


@dataclass(frozen=True)
class Artifacts:
    output: Path
    logs: Path

    @classmethod
    def of(cls, cfg: Config) -> Artifacts:
        return cls(cfg.output_dir, cfg.logs_dir)

    # models/output/
    @property
    def full_onnx(self) -> Path:
        return self.output / "bitnet_b1.58_full.onnx"

    @property
    def full_onnx_data(self) -> Path:
        return self.output / "bitnet_b1.58_full.onnx.data"

    @property
    def full_raw(self) -> Path:
        return self.output / "bitnet_b1.58_full.raw"

    @property
    def full_raw_index(self) -> Path:
        return self.output / "bitnet_b1.58_full.raw.json"

    @property
    def export_meta(self) -> Path:
        """Facts about the last export (profile, shapes, source) that later stages read."""
        return self.output / "bitnet_b1.58_full.meta.json"

    @property
    def bitlinear_onnx(self) -> Path:
        return self.output / "bitnet_b1.58_bitlinear.onnx"

    @property
    def bitlinear_onnx_data(self) -> Path:
        return self.output / "bitnet_b1.58_bitlinear.onnx.data"

    @property
    def replace_selection(self) -> Path:
        return self.output / "replace_selection.json"

    @property
    def replace_report(self) -> Path:
        return self.output / "replace_report.json"

    @property
    def icraft_dir(self) -> Path:
        return self.output / "icraft_output"

    @property
    def icraft_logs(self) -> Path:
        return self.icraft_dir / "logs"

    @property
    def rtl_build(self) -> Path:
        """Verilator builds of the RTL core, one folder per hash of its sources (stage `rtl`)."""
        return self.output / "rtl"

    @property
    def rtl_vectors(self) -> Path:
        """Golden vectors (`$readmemh`) of the tiles the rtl stage checked."""
        return self.output / "rtl_vectors"

    @property
    def rtl_vectors_index(self) -> Path:
        return self.rtl_vectors / "index.json"

    @property
    def synthetic_root(self) -> Path:
        return self.output / "synthetic"

    # phase3_logs/
    @property
    def export_log(self) -> Path:
        return self.logs / "export_log.md"

    @property
    def compile_log(self) -> Path:
        return self.logs / "icraft_compile_log.md"

    @property
    def bugs(self) -> Path:
        return self.logs / "bugs_found.md"

    @property
    def rtl_log(self) -> Path:
        return self.logs / "rtl_log.md"

    @property
    def performance_report(self) -> Path:
        return self.logs / "performance_report.md"

    @property
    def run_logs(self) -> Path:
        """One plain-text log per stage of the last run (what the app's log panel tails)."""
        return self.logs / "runs"

    @property
    def run_status(self) -> Path:
        """Each stage's latest outcome, whichever process ran it (`engine/core/run_status.py`)."""
        return self.run_logs / "status.json"
