"""Faults and hostile inputs (issue #13, points 5, 6, 8, 9, 10, 11): each reproduced, each held."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest

from conftest import write_config
from tdpu_tui.engine.core.config import load_config
from tdpu_tui.engine.core.errors import CheckpointError
from tdpu_tui.engine.core.events import Status
from tdpu_tui.engine.core.pipeline import Pipeline
from tdpu_tui.engine.core.stage import Stage
from tdpu_tui.engine.model.checkpoint import open_checkpoint
from tdpu_tui.engine.model.synthetic import write_synthetic
from tdpu_tui.engine.osutil.platform import peak_rss_bytes
from tdpu_tui.engine.stages import all_stages

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "icraft"))
import helpers  # noqa: E402

LEFTOVERS = (".staging-", ".validate-")


def batch_argv(cfg: Path, *stages: str, json_path: Path | None = None) -> list[str]:
    argv = [sys.executable, "-m", "tdpu_tui", "--batch", "--config", str(cfg), "--no-bug-drafts"]
    for s in stages:
        argv += ["--stage", s]
    if json_path is not None:
        argv += ["--json", str(json_path)]
    return argv


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(LEFTOVERS))


def wait_for(predicate, seconds: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(0.01)
    return predicate()


def status_rows(logs: Path) -> dict[str, dict]:
    return json.loads((logs / "runs" / "status.json").read_text(encoding="utf-8"))["stages"]


# -- #13.5: config.json checked against the tensors before anything is sized by it ----------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=1)


def with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text(encoding="utf-8"))
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return dst


def test_a_billion_layers_is_refused_before_anything_is_allocated(tiny_ckpt, tmp_path):
    bad = with_config(tiny_ckpt, tmp_path / "bad", num_hidden_layers=10**9)
    before = peak_rss_bytes()
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(bad)
    assert time.monotonic() - start < 5
    assert peak_rss_bytes() - before < 100 << 20
    msg = str(info.value)
    assert str(bad / "config.json") in msg and "'num_hidden_layers' = 1000000000" in msg
    assert "holds tensors of 2 layers" in msg


@pytest.mark.parametrize("key, value, expected", [
    ("max_position_embeddings", 0, "key 'max_position_embeddings': expected a positive integer, found 0"),
    ("max_position_embeddings", -7, "key 'max_position_embeddings': expected a positive integer, found -7"),
    ("max_position_embeddings", 10**7, "key 'max_position_embeddings': expected at most 16384"),
    ("vocab_size", 10**12, "key 'vocab_size' = 1000000000000 does not match the checkpoint: "
                           "tensor 'model.embed_tokens.weight'"),
    ("hidden_size", 4096, "key 'hidden_size' = 4096 does not match the checkpoint"),
    ("intermediate_size", 10**9, "key 'intermediate_size' = 1000000000 does not match the checkpoint: "
                                 "tensor 'model.layers.0.mlp.ffn_sub_norm.weight'"),
    ("head_dim", 15, "key 'head_dim': expected an even number (RoPE rotates halves), found 15"),
    ("rms_norm_eps", -1.0, "key 'rms_norm_eps': expected a finite positive number, found -1.0"),
    ("rope_theta", 0, "key 'rope_theta': expected a finite positive number, found 0.0"),
    ("num_hidden_layers", 1e9, "key 'num_hidden_layers': expected int, found 1000000000.0"),
])
def test_bad_config_values_name_the_file_and_the_key(tiny_ckpt, tmp_path, key, value, expected):
    bad = with_config(tiny_ckpt, tmp_path / "bad", **{key: value})
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(bad)
    assert str(bad / "config.json") in str(info.value)
    assert expected in str(info.value)


def test_non_finite_and_oversized_json_numbers_are_checkpoint_errors(tiny_ckpt, tmp_path):
    bad = shutil.copytree(tiny_ckpt, tmp_path / "nan")
    text = (bad / "config.json").read_text(encoding="utf-8")
    (bad / "config.json").write_text(text.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN'),
                                     encoding="utf-8")
    with pytest.raises(CheckpointError, match="'rms_norm_eps': expected a finite positive number, found nan"):
        open_checkpoint(bad)
    (bad / "config.json").write_text(text.replace('"vocab_size": 256', '"vocab_size": ' + "9" * 5000),
                                     encoding="utf-8")
    with pytest.raises(CheckpointError, match="config.json: cannot read"):
        open_checkpoint(bad)


def test_export_of_a_bad_checkpoint_fails_with_the_message_not_a_traceback(tiny_ckpt, tmp_path):
    bad = with_config(tiny_ckpt, tmp_path / "bad", num_hidden_layers=10**9)
    cfg = load_config(write_config(tmp_path))
    cfg.model.source = str(bad)
    result = Pipeline(cfg, [s for s in all_stages() if s.name == "export"]).run().results[0]
    assert result.status is Status.FAILED
    assert "num_hidden_layers" in result.message and "Traceback" not in "\n".join(result.log_tail)


# -- #13.8: nothing read from outside the checkpoint or the graph's directory ---------------------

def sharded(src: Path, dst: Path, shard_name: str) -> Path:
    shutil.copytree(src, dst)
    (dst / "model.safetensors").rename(dst / "model-00001-of-00001.safetensors")
    from safetensors import safe_open
    with safe_open(str(dst / "model-00001-of-00001.safetensors"), "np") as f:
        names = list(f.keys())
    weight_map = {n: "model-00001-of-00001.safetensors" for n in names}
    weight_map[names[0]] = shard_name
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}),
                                                      encoding="utf-8")
    return dst


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "C:\\x.safetensors",
                                   "sub/../../outside.safetensors"])
def test_a_shard_index_pointing_outside_the_checkpoint_is_refused(tiny_ckpt, tmp_path, shard):
    (tmp_path / "outside.safetensors").write_bytes(b"\0" * 64)
    ckpt = sharded(tiny_ckpt, tmp_path / "ckpt", shard)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(ckpt)
    msg = str(info.value)
    assert str(ckpt / "model.safetensors.index.json") in msg and repr(shard) in msg
    assert "not inside the checkpoint directory" in msg


def test_a_shard_index_inside_the_checkpoint_still_reads(tiny_ckpt, tmp_path):
    ckpt = sharded(tiny_ckpt, tmp_path / "ckpt", "model-00001-of-00001.safetensors")
    with open_checkpoint(ckpt) as c:
        assert c.config.num_hidden_layers == 2


@pytest.fixture
def exported_copy(exported_tiny, tmp_path):
    """A project of its own holding a copy of the shared tiny export."""
    (tmp_path / "project").mkdir()
    cfg_path = write_config(tmp_path / "project")
    shutil.copytree(exported_tiny.output_dir, tmp_path / "project" / "out")
    return load_config(cfg_path)


@pytest.mark.parametrize("where", ["../outside.bin", "ABSOLUTE"])
def test_external_data_outside_the_graph_directory_is_refused(exported_copy, tmp_path, where):
    graph_path = exported_copy.output_dir / "bitnet_b1.58_full.onnx"
    outside = graph_path.parent.parent / "outside.bin"         # where "../outside.bin" leads
    outside.write_bytes(b"SECRET-BYTES-" * 4096)
    location = str(outside) if where == "ABSOLUTE" else where
    model = onnx.load(str(graph_path), load_external_data=False)
    target = next(t for t in model.graph.initializer
                  if t.data_location == onnx.TensorProto.EXTERNAL and "q_proj" in t.name)
    for entry in target.external_data:
        if entry.key == "location":
            entry.value = location
        elif entry.key == "offset":
            entry.value = "0"
    onnx.save(model, str(graph_path))
    result = Pipeline(exported_copy, [s for s in all_stages() if s.name == "replace"]).run().results[0]
    assert result.status is Status.FAILED
    assert repr(target.name) in result.message and repr(location) in result.message
    assert "not inside the graph's directory" in result.message
    for produced in exported_copy.output_dir.glob("bitnet_b1.58_bitlinear.onnx*"):
        assert b"SECRET-BYTES-" not in produced.read_bytes()
    # The check every other stage makes before reading the graph refuses it too.
    from tdpu_tui.engine.core.errors import StageFailed
    from tdpu_tui.engine.model.compare import require_graph
    with pytest.raises(StageFailed, match="not inside the graph's directory") as info:
        require_graph(graph_path, "export")
    assert repr(target.name) in str(info.value)


# -- #13.6: --error-file read up to a cap -----------------------------------------------------------

MEASURED_BUGS = textwrap.dedent("""\
    import sys
    from tdpu_tui.bugs_cli import main
    code = main(sys.argv[1:])
    from tdpu_tui.engine.osutil.platform import peak_rss_bytes
    print(f"peak_rss={peak_rss_bytes()}", file=sys.stderr)
    raise SystemExit(code)
    """)


def bugs(tmp_path: Path, *args: str, stdin=subprocess.DEVNULL, timeout: float = 60):
    write_config(tmp_path)
    return subprocess.run([sys.executable, "-c", MEASURED_BUGS, *args], cwd=tmp_path, stdin=stdin,
                          capture_output=True, timeout=timeout)


def peak_of(proc: subprocess.CompletedProcess) -> int:
    line = [ln for ln in proc.stderr.decode().splitlines() if ln.startswith("peak_rss=")][0]
    return int(line.split("=")[1])


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero on this system")
def test_error_file_dev_zero_neither_hangs_nor_eats_memory(tmp_path):
    proc = bugs(tmp_path, "add", "--title", "zero", "--stage", "导出", "--error-file", "/dev/zero")
    assert proc.returncode == 0, proc.stderr.decode()
    assert peak_of(proc) < 400 << 20
    assert "/dev/zero holds more than 64 KiB" in proc.stderr.decode()


def test_a_large_error_file_is_cut_and_says_so(tmp_path):
    big = tmp_path / "icraft.log"
    with open(big, "wb") as fh:
        for i in range(200_000):                       # ~ 9 MB of log lines
            fh.write(f"[12/02/26 07:00:00.000] [I] line {i} of a very long Icraft log\n".encode())
    proc = bugs(tmp_path, "add", "--title", "big", "--stage", "编译", "--error-file", str(big))
    assert proc.returncode == 0, proc.stderr.decode()
    assert peak_of(proc) < 400 << 20
    book = (tmp_path / "logs" / "bugs_found.md").read_text(encoding="utf-8")
    assert f"[cut: {big} holds more than 64 KiB; the first" in book
    assert "line 0 of" in book and "line 199999 of" not in book
    assert len(book.encode()) < 80 * 1024


def test_error_from_stdin_is_cut_too(tmp_path):
    data = b"x" * (1 << 20)
    write_config(tmp_path)
    proc = subprocess.run([sys.executable, "-c", MEASURED_BUGS, "add", "--title", "stdin", "--stage",
                           "导出", "--error-file", "-"], cwd=tmp_path, input=data, capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "[cut: stdin holds more than 64 KiB; the first 65536 bytes are kept]" in \
        (tmp_path / "logs" / "bugs_found.md").read_text(encoding="utf-8")


def test_a_small_error_file_is_kept_whole(tmp_path):
    f = tmp_path / "err.txt"
    f.write_text("[E] 26001 missing file\n", encoding="utf-8")
    proc = bugs(tmp_path, "add", "--title", "small", "--stage", "编译", "--error-file", str(f))
    assert proc.returncode == 0, proc.stderr.decode()
    book = (tmp_path / "logs" / "bugs_found.md").read_text(encoding="utf-8")
    assert "[E] 26001 missing file" in book and "[cut:" not in book


# -- #13.11: an unusable [paths].logs, a full disk ----------------------------------------------------

def test_logs_path_that_is_a_file_gives_a_summary_and_json_not_a_traceback(tmp_path):
    cfg = write_config(tmp_path)
    (tmp_path / "logs").write_text("not a directory", encoding="utf-8")
    summary = tmp_path / "summary.json"
    proc = subprocess.run(batch_argv(cfg, json_path=summary), capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "export    failed" in proc.stdout
    stages = {s["name"]: s for s in json.loads(summary.read_text(encoding="utf-8"))["stages"]}
    msg = stages["export"]["message"]
    assert stages["export"]["status"] == "failed"
    # --json says the project's paths relative to it (the stderr line keeps them whole)
    assert "logs/runs" in msg and str(tmp_path) not in msg
    assert "a file stands where a directory is expected" in msg
    assert stages["precheck"]["status"] == "skipped" and stages["precheck"]["message"] == "not run: export failed"
    assert (tmp_path / "logs").read_text(encoding="utf-8") == "not a directory"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="permissions do not bind root (this case is also covered in-process below)")
def test_read_only_logs_gives_a_summary_and_json_not_a_traceback(tmp_path):
    cfg = write_config(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o555)
    try:
        summary = tmp_path / "summary.json"
        proc = subprocess.run(batch_argv(cfg, "export", json_path=summary), capture_output=True,
                              text=True, timeout=300, stdin=subprocess.DEVNULL)
    finally:
        logs.chmod(0o755)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    msg = json.loads(summary.read_text(encoding="utf-8"))["stages"][0]["message"]
    assert "logs/runs" in msg and str(tmp_path) not in msg and "check its permissions" in msg


def test_a_stage_log_that_cannot_be_opened_fails_the_stage_naming_it(tmp_config, monkeypatch):
    from tdpu_tui.engine.core import pipeline as pipeline_module

    def refuse(*args, **kwargs):    # as open() of the log would, but the pipeline names the file
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(pipeline_module, "StageContext", refuse)
    cfg = load_config(tmp_config)
    result = Pipeline(cfg, [s for s in all_stages() if s.name == "export"]).run().results[0]
    assert result.status is Status.FAILED
    assert result.message.startswith(f"cannot write the stage log: {cfg.logs_dir / 'runs' / 'export.log'}: "
                                     "Permission denied — check its permissions")


class _FullDisk(Stage):
    name = "full"

    def run(self, ctx):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_without_a_file_names_where_the_stage_writes(tmp_config):
    cfg = load_config(tmp_config)
    result = Pipeline(cfg, [_FullDisk()]).run().results[0]
    assert result.status is Status.FAILED
    assert "No space left on device — the disk is full" in result.message
    assert str(cfg.output_dir) in result.message and str(cfg.logs_dir) in result.message


def test_a_full_disk_while_writing_external_data_names_the_data_file(tmp_path):
    import numpy as np

    from tdpu_tui.engine.graph.external import ExternalData

    data = ExternalData(tmp_path / "x.onnx.data", "x.onnx.data")

    class Full:
        def write(self, _b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass
    data._fh.close()
    data._fh = Full()
    # the writer thread meets the error; the next write or the close raises it, naming the file
    with pytest.raises(OSError) as info:
        data.write([np.zeros(10, np.float32)])
        data.close()
    assert info.value.filename == str(tmp_path / "x.onnx.data") and info.value.errno == errno.ENOSPC


def test_external_data_written_from_its_thread_holds_every_piece_at_its_offset(tmp_path):
    import numpy as np

    from tdpu_tui.engine.graph.external import ALIGN, ExternalData

    rng = np.random.default_rng(5)
    data = ExternalData(tmp_path / "x.onnx.data", "x.onnx.data")
    tensors = [[rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(0, 5000, 3)]
               for _ in range(40)]
    spans = [data.write(pieces) for pieces in tensors]
    data.close()
    raw = (tmp_path / "x.onnx.data").read_bytes()
    for (offset, length), pieces in zip(spans, tensors, strict=True):
        assert offset % ALIGN == 0
        assert raw[offset:offset + length] == b"".join(p.tobytes() for p in pieces)


def test_a_full_disk_under_the_stage_log_keeps_the_stage_going(tmp_config, monkeypatch):
    cfg = load_config(tmp_config)

    class Logs(Stage):
        name = "logs"

        def run(self, ctx):
            class Full:
                def write(self, _t):
                    raise OSError(errno.ENOSPC, "No space left on device")

                def close(self):
                    raise OSError(errno.ENOSPC, "No space left on device")
            ctx._log_fh.close()
            ctx._log_fh = Full()
            ctx.log("one line")
            ctx.log("another")
            return "finished"
    result = Pipeline(cfg, [Logs()]).run().results[0]
    assert result.status is Status.OK and result.message == "finished"


# -- #13.9 and #13.10: signals and kills during a run ----------------------------------------------

def project(root: Path, profile: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "tdpu.toml"
    cfg.write_text("\n".join([
        "[model]", 'source = "synthetic"', "[model.synthetic]", 'preset = "tiny"', "seed = 0",
        "[export]", f'profile = "{profile}"', "seq_len = 16", "verify_batch = 1", "verify_tokens = 8",
        "[icraft]", 'net_name = "tiny_net"', "timeout_s = 120",
        "[paths]", 'output = "models/output"', 'logs = "phase3_logs"', ""]), encoding="utf-8")
    return cfg


def no_icraft_env() -> dict[str, str]:
    env = helpers.fake_env()
    env["PATH"] = str(Path(sys.executable).parent)
    return env


@pytest.fixture(scope="module")
def icraft_export(tmp_path_factory):
    cfg = project(tmp_path_factory.mktemp("icraft_export"), "icraft")
    proc = subprocess.run(batch_argv(cfg, "export"), env=no_icraft_env(), capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return cfg


@pytest.fixture(scope="module")
def replaced(tmp_path_factory):
    cfg = project(tmp_path_factory.mktemp("replaced"), "reference")
    proc = subprocess.run(batch_argv(cfg, "export", "replace"), env=no_icraft_env(),
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return cfg


def _stop_parse_with(cfg: Path, tmp_path: Path, sig: int, preexec=None):
    pidfile = tmp_path / "component.pid"
    summary = tmp_path / "summary.json"
    proc = subprocess.Popen(batch_argv(cfg, "parse", json_path=summary),
                            env=helpers.fake_env("hang", FAKE_ICRAFT_PIDFILE=str(pidfile)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=preexec)
    try:
        assert wait_for(pidfile.exists, 120, proc), proc.communicate(timeout=30)
        component = int(pidfile.read_text())
        proc.send_signal(sig)
        return proc, component, summary
    except BaseException:
        proc.kill()
        raise


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="sends POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)],
                         ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_ends_the_icraft_child_closes_statuses_and_exits_130(icraft_export, tmp_path, sig):
    proc, component, summary = _stop_parse_with(icraft_export, tmp_path, sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and "tdpu: interrupted" in err
    assert wait_for(lambda: helpers.process_gone(component), 10)
    rows = status_rows(icraft_export.parent / "phase3_logs")
    assert rows["parse"]["status"] == "cancelled" and rows["parse"]["message"] == "interrupted (Ctrl-C)"
    doc = json.loads(summary.read_text(encoding="utf-8"))
    assert doc["stages"][0]["status"] == "cancelled" and doc["stages"][0]["cancelled"] is True
    assert "parse  cancelled" in out
    assert "## parse — cancelled" in (icraft_export.parent / "phase3_logs" / "icraft_compile_log.md"
                                      ).read_text(encoding="utf-8")
    out_dir = icraft_export.parent / "models" / "output"
    assert not [p for p in out_dir.rglob("*.tmp")]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here")
def test_a_hangup_ignored_at_start_stays_ignored_as_under_nohup(icraft_export, tmp_path):
    proc, component, _summary = _stop_parse_with(
        icraft_export, tmp_path, signal.SIGHUP, preexec=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        time.sleep(1.5)
        assert proc.poll() is None and not helpers.process_gone(component)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, out + err
        assert wait_for(lambda: helpers.process_gone(component), 10)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="sends POSIX signals")
def test_sigterm_during_validate_exits_130_and_leaves_no_temp_copies(replaced, tmp_path):
    cfg = replaced
    out_dir = cfg.parent / "models" / "output"
    report = cfg.parent / "phase3_logs" / "performance_report.md"
    before = report.read_bytes() if report.exists() else None
    proc = subprocess.Popen(batch_argv(cfg, "validate"), env=no_icraft_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: bool(leftovers(out_dir)), 300, proc), proc.communicate(timeout=30)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert leftovers(out_dir) == []
    assert status_rows(cfg.parent / "phase3_logs")["validate"]["status"] == "cancelled"
    assert (report.read_bytes() if report.exists() else None) == before


def _kill9_when_leftover_appears(cfg: Path, stages: tuple[str, ...]) -> list[str]:
    out_dir = cfg.parent / "models" / "output"
    proc = subprocess.Popen(batch_argv(cfg, *stages), env=no_icraft_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: out_dir.is_dir() and bool(leftovers(out_dir)), 300, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return leftovers(out_dir)


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="kill -9")
def test_kill_9_during_export_leaves_staging_that_the_next_run_removes(tmp_path):
    cfg = project(tmp_path / "p", "reference")
    left = _kill9_when_leftover_appears(cfg, ("export",))
    assert left and all(n.startswith(".staging-") for n in left)
    proc = subprocess.run(batch_argv(cfg, "precheck"), env=no_icraft_env(), capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert leftovers(cfg.parent / "models" / "output") == []
    log = (cfg.parent / "phase3_logs" / "runs" / "precheck.log").read_text(encoding="utf-8")
    assert f"removed {len(left)} leftover(s) of an interrupted run" in log and left[0] in log
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="kill -9")
def test_kill_9_during_validate_leaves_temp_graphs_that_the_next_run_removes(replaced, tmp_path):
    cfg = project(tmp_path / "p", "reference")
    shutil.copytree(replaced.parent / "models", cfg.parent / "models")
    left = _kill9_when_leftover_appears(cfg, ("validate",))
    assert left and all(n.startswith(".validate-") for n in left)
    subprocess.run(batch_argv(cfg, "precheck"), env=no_icraft_env(), capture_output=True,
                   timeout=300, stdin=subprocess.DEVNULL)
    assert leftovers(cfg.parent / "models" / "output") == []


def test_a_terminal_that_went_away_does_not_stop_the_run(tmp_config):
    from tdpu_tui.batch import ProgressPrinter

    class Gone:
        def isatty(self):
            return False

        def write(self, _text):
            raise OSError(errno.EIO, "Input/output error")

        def flush(self):
            raise OSError(errno.EIO, "Input/output error")

    printer = ProgressPrinter(Gone())
    cfg = load_config(tmp_config)

    class Talks(Stage):
        name = "talks"

        def run(self, ctx):
            for i in range(3):
                ctx.log(f"line {i}")
            return "finished"
    result = Pipeline(cfg, [Talks()], on_event=printer).run().results[0]
    assert result.status is Status.OK and result.message == "finished" and printer.gone
