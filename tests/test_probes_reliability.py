"""Independent probes of issue #13 (items 4-11, 14, 16-20), driven the way a user would:
`tdpu --batch` / `tdpu bugs …` subprocesses on fresh projects, hand-edited configs and files.

Written from the issue text and SPEC, not from the other tests. Each probe can fail: it checks
the observable outcome (exit status, message, files on disk, memory of the child), not the
absence of an exception alone. Bounded in time (subprocess timeouts) and memory (children's
VmHWM from /proc, polled and capped).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

# PROBE_TDPU_ROOT: run the probes against another checkout of tdpu (to see them fail on one
# from before the fixes); default this worktree.
REPO = Path(os.environ.get("PROBE_TDPU_ROOT") or Path(__file__).resolve().parents[1])
BOOK_TITLE = "# Phase 3 Bug记录"
FRESH_TOML = '[model]\nsource = "synthetic"\n[model.synthetic]\npreset = "tiny"\n'

# A wrapper that records the child's own peak RSS (VmHWM, not ru_maxrss which inherits the
# parent's peak) when it exits, then runs tdpu's __main__.
_HWM_WRAPPER = textwrap.dedent("""
    import atexit, os, runpy, sys
    def _dump():
        out = os.environ.get("PROBE_HWM_FILE")
        if not out:
            return
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        with open(out, "w") as g:
                            g.write(line.split()[1])
        except OSError:
            pass
    atexit.register(_dump)
    sys.argv = ["tdpu"] + sys.argv[1:]
    runpy.run_module("tdpu_tui", run_name="__main__", alter_sys=True)
""")

linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTEST_CURRENT_TEST", None)
    env.setdefault("PYTHONIOENCODING", "utf-8")
    env.update(extra)
    return env


def tdpu(args: list[str], cwd: Path, *, timeout: float = 120, env: dict | None = None,
         input: bytes | None = None) -> subprocess.CompletedProcess:
    """`tdpu ARGS` in `cwd` with the worktree's code; stdout/stderr as text (utf-8, replace)."""
    proc = subprocess.run([sys.executable, "-m", "tdpu_tui", *args], cwd=cwd, env=env or _env(),
                          capture_output=True, timeout=timeout, input=input)
    proc.stdout_bytes = proc.stdout  # type: ignore[attr-defined]
    proc.stdout = proc.stdout.decode("utf-8", "replace")
    proc.stderr = proc.stderr.decode("utf-8", "replace")
    return proc


def tdpu_bounded(args: list[str], cwd: Path, tmp: Path, *, cap_mb: int, timeout: float = 120
                 ) -> tuple[subprocess.CompletedProcess, int]:
    """Run tdpu with its memory watched: killed when its VmHWM passes `cap_mb`. Returns the
    process (returncode -9 when killed for memory) and the peak in MB (the larger of the
    polled VmHWM and the one the child recorded at exit)."""
    hwm_file = tmp / f"hwm-{time.monotonic_ns()}"
    env = _env(PROBE_HWM_FILE=str(hwm_file))
    proc = subprocess.Popen([sys.executable, "-c", _HWM_WRAPPER, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: dict[str, bytes] = {}

    def drain(name, stream):
        out[name] = stream.read()
    threads = [threading.Thread(target=drain, args=(n, s), daemon=True)
               for n, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in threads:
        t.start()
    peak_kb = 0
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            m = re.search(r"VmHWM:\s+(\d+)", status)
            if m:
                peak_kb = max(peak_kb, int(m.group(1)))
        except OSError:
            pass
        if peak_kb > cap_mb * 1024 or time.monotonic() > deadline:
            proc.kill()
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    for t in threads:
        t.join(timeout=30)
    if hwm_file.exists() and hwm_file.read_text().strip():
        peak_kb = max(peak_kb, int(hwm_file.read_text().strip()))
    cp = subprocess.CompletedProcess(proc.args, proc.returncode,
                                     out.get("stdout", b"").decode("utf-8", "replace"),
                                     out.get("stderr", b"").decode("utf-8", "replace"))
    return cp, peak_kb // 1024


def no_traceback(cp: subprocess.CompletedProcess) -> None:
    assert "Traceback (most recent call last)" not in cp.stderr + cp.stdout, cp.stderr[-3000:]


def fresh_project(root: Path, extra: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "tdpu.toml").write_text(FRESH_TOML + extra, encoding="utf-8")
    return root


def set_toml(project: Path, section: str, key: str, value: str) -> None:
    """Hand-edit one `key = value` line of `[section]` (added when absent)."""
    path = project / "tdpu.toml"
    lines = path.read_text(encoding="utf-8").splitlines()
    out, in_section, done = [], False, False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("["):
            if in_section and not done:
                out.append(f"{key} = {value}")
                done = True
            in_section = stripped == f"[{section}]"
        elif in_section and re.match(rf"{re.escape(key)}\s*=", stripped):
            line, done = f"{key} = {value}", True
        out.append(line)
    if in_section and not done:
        out.append(f"{key} = {value}")
        done = True
    if not done:
        out += [f"[{section}]", f"{key} = {value}"]
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


def all_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# A project exported once per module (export + replace), copied for each probe that needs it.
@pytest.fixture(scope="module")
def exported_template(tmp_path_factory) -> Path:
    root = fresh_project(tmp_path_factory.mktemp("exported") / "proj")
    cp = tdpu(["--batch", "--stage", "export", "--stage", "replace"], root, timeout=300)
    assert cp.returncode == 0, cp.stderr[-3000:]
    return root


@pytest.fixture
def exported(exported_template, tmp_path) -> Path:
    dst = tmp_path / "proj"
    shutil.copytree(exported_template, dst, symlinks=True)
    return dst


# ---------------------------------------------------------------------------------------------
# 4. Non-finite / out-of-range numbers and an unsupported opset are config errors naming the key.

@pytest.mark.parametrize("section,key,value", [
    ("icraft", "timeout_s", "nan"),
    ("icraft", "timeout_s", "inf"),
    ("icraft", "timeout_s", "1e300"),
    ("icraft", "timeout_s", "-1"),
    ("export", "opset", "999"),
    # counts that size an allocation or a loop before anything else is checked
    ("model.synthetic", "layers", "1000000000"),
    ("model.synthetic", "hidden_size", "1000000000"),
    ("model.synthetic", "vocab_size", "4000000000"),
    ("export", "verify_batch", "1000000000"),
    ("export", "seq_len", "1000000000"),
    ("validate", "repeats", "1000000000"),
])
def test_item4_bad_numbers_are_config_errors(tmp_path, section, key, value):
    proj = fresh_project(tmp_path / "p")
    set_toml(proj, section, key, value)
    cp = tdpu(["--batch", "--stage", "export", "--json", "s.json"], proj)
    assert cp.returncode == 2, (cp.returncode, cp.stderr[-2000:])
    no_traceback(cp)
    assert key in cp.stderr and "tdpu.toml" in cp.stderr, cp.stderr[-2000:]
    # nothing ran: no export happened
    assert not (proj / "models" / "output" / "bitnet_b1.58_full.onnx").exists()
    if key == "opset":      # checked against what the installed onnx supports, and says so
        import onnx.defs
        assert str(onnx.defs.onnx_opset_version()) in cp.stderr, cp.stderr[-2000:]


@linux_only
def test_item4_synthetic_shapes_in_bounds_whose_product_is_not(tmp_path):
    """Each shape under its bound, the model they make far above 2B4T: refused before the
    checkpoint is planned or written, naming the key and the file, not drafted."""
    proj = fresh_project(tmp_path / "p")
    set_toml(proj, "model.synthetic", "preset", '"2b4t"')
    set_toml(proj, "model.synthetic", "layers", "256")
    cp, peak = tdpu_bounded(["--batch", "--stage", "export"], proj, tmp_path, cap_mb=600, timeout=60)
    assert cp.returncode in (1, 2), (cp.returncode, peak, cp.stderr[-2000:])
    no_traceback(cp)
    assert "model.synthetic.layers" in cp.stderr and "tdpu.toml" in cp.stderr, cp.stderr[-2000:]
    assert peak < 600
    syn = proj / "models" / "output" / "synthetic"
    assert not syn.exists() or list(syn.iterdir()) == []
    assert _records(proj) == []


# ---------------------------------------------------------------------------------------------
# 5. A corrupt checkpoint config.json is checked against the tensors before allocating.

def _checkpoint_copy(exported: Path, dst: Path, **overrides) -> Path:
    src = exported / "models" / "output" / "synthetic" / "tiny-seed0"
    ck = dst / "ckpt"
    ck.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(src / name, ck / name)
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(overrides)
    (ck / "config.json").write_text(json.dumps(cfg))
    return ck


@linux_only
@pytest.mark.parametrize("key,value", [
    ("num_hidden_layers", 1e9),
    ("max_position_embeddings", 0),
    ("max_position_embeddings", -1),
    ("max_position_embeddings", "x"),
])
def test_item5_corrupt_checkpoint_config(exported, tmp_path, key, value):
    ck = _checkpoint_copy(exported, tmp_path, **{key: value})
    cp, peak = tdpu_bounded(["--batch", "--stage", "export", "--model", str(ck)], exported,
                            tmp_path, cap_mb=1500, timeout=120)
    assert cp.returncode in (1, 2), (cp.returncode, peak, cp.stderr[-2000:])
    no_traceback(cp)
    assert key in cp.stderr + cp.stdout, cp.stderr[-2000:]
    assert peak < 1500


# ---------------------------------------------------------------------------------------------
# 6. --error-file is read up to a fixed cap, saying it was cut.

def _book(proj: Path) -> Path:
    return proj / "phase3_logs" / "bugs_found.md"


@linux_only
def test_item6_error_file_dev_zero(tmp_path):
    proj = fresh_project(tmp_path / "p")
    cp, peak = tdpu_bounded(["bugs", "add", "--title", "zero", "--stage", "编译",
                             "--error-file", "/dev/zero"], proj, tmp_path, cap_mb=600, timeout=60)
    assert cp.returncode == 0, (cp.returncode, peak, cp.stderr[-2000:])
    no_traceback(cp)
    assert peak < 600
    book = _book(proj)
    assert book.stat().st_size < 8 * 1024 * 1024
    text = book.read_text("utf-8", "replace")
    assert re.search(r"cut|truncat|截断|first \d", text + cp.stderr, re.I), text[-500:]


def test_item6_binary_error_text_keeps_the_book_text(tmp_path):
    """NUL bytes (a /dev/zero or a binary file) and escape sequences do not turn the user's
    markdown into a binary file: they are shown, not written raw."""
    proj = fresh_project(tmp_path / "p")
    err = tmp_path / "e.log"
    err.write_bytes(b"[E] 21002 \x1b[31mred\x1b[0m\nx\x00\x00y\n" + b"\x00" * 5000 + b"\n")
    cp = tdpu(["bugs", "add", "--title", "bin", "--stage", "编译", "--error-file", str(err)], proj)
    assert cp.returncode == 0, cp.stderr
    raw = _book(proj).read_bytes()
    assert not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", raw), raw[:400]
    assert b"21002" in raw and b"red" in raw
    assert len(raw) < 20_000


@linux_only
@pytest.mark.slow
def test_item6_error_file_400mb(tmp_path):
    proj = fresh_project(tmp_path / "p")
    big = tmp_path / "big.log"
    line = b"[E] 21002 something failed at layer 7 of the graph\n"
    chunk = line * (4 * 1024 * 1024 // len(line))
    with open(big, "wb") as f:
        for _ in range(100):
            f.write(chunk)
    assert big.stat().st_size > 390 * 1024 * 1024
    try:
        cp, peak = tdpu_bounded(["bugs", "add", "--title", "big", "--stage", "编译",
                                 "--error-file", str(big)], proj, tmp_path, cap_mb=600, timeout=60)
    finally:
        big.unlink()
    assert cp.returncode == 0, (cp.returncode, peak, cp.stderr[-2000:])
    assert peak < 600, peak
    assert _book(proj).stat().st_size < 8 * 1024 * 1024
    text = _book(proj).read_text("utf-8")
    assert "21002" in text
    assert re.search(r"cut|truncat|截断", text + cp.stderr, re.I)


# ---------------------------------------------------------------------------------------------
# 7. net_name with a path separator, '..', a drive or an absolute form is a config error.

@pytest.mark.parametrize("name", [
    "../../../outside/victim", "/tmp/victim_abs", "C:victim", "a\\b", "NUL",
])
def test_item7_net_name_outside(exported, tmp_path, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim_optimized.json"
    victim.write_text("keep me")
    before = all_files(tmp_path)
    set_toml(exported, "icraft", "net_name", json.dumps(name))
    cp = tdpu(["--batch", "--stage", "parse"], exported)
    assert cp.returncode == 2, (cp.returncode, cp.stderr[-2000:])
    no_traceback(cp)
    assert "net_name" in cp.stderr
    assert victim.read_text() == "keep me"
    assert all_files(tmp_path) - before == set(), all_files(tmp_path) - before
    assert not Path("/tmp/victim_abs.toml").exists()


# ---------------------------------------------------------------------------------------------
# 8. External-data locations and shard indexes are confined to their directory.

SECRET = b"SECRET-OUTSIDE-" * 200


def _point_outside(graph: Path, location: str) -> str:
    """Make the first external initializer of `graph` read from `location`; its name."""
    import onnx
    m = onnx.load(str(graph), load_external_data=False)
    for init in m.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for entry in init.external_data:
                if entry.key == "location":
                    entry.value = location
                elif entry.key == "offset":
                    entry.value = "0"
            onnx.save(m, str(graph))
            return init.name
    raise AssertionError("no external initializer")


@pytest.mark.parametrize("form", ["absolute", "dotdot", "sub_dotdot"])
def test_item8_external_data_outside(exported, tmp_path, form):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    out = exported / "models" / "output"
    location = {"absolute": str(secret), "dotdot": "../../../secret.bin",
                "sub_dotdot": "sub/../../../../secret.bin"}[form]
    assert (out / location).resolve() == secret.resolve() or form == "absolute"
    graph = out / "bitnet_b1.58_full.onnx"
    if graph.stat().st_nlink > 1:       # hard-linked into the hand-off bundle: break the link
        data = graph.read_bytes()
        graph.unlink()
        graph.write_bytes(data)
    tensor = _point_outside(graph, location)
    bitlinear = out / "bitnet_b1.58_bitlinear.onnx"
    for p in out.glob("bitnet_b1.58_bitlinear.onnx*"):
        p.unlink()
    cp = tdpu(["--batch", "--stage", "replace", "--no-bug-drafts"], exported)
    assert cp.returncode in (1, 2), (cp.returncode, cp.stderr[-2000:])
    no_traceback(cp)
    assert tensor in cp.stderr + cp.stdout, cp.stderr[-2000:]
    assert location in cp.stderr + cp.stdout, cp.stderr[-2000:]
    assert not bitlinear.exists(), "a BitLinear graph was written from an outside location"
    for p in out.rglob("*"):
        if p.is_file():
            assert b"SECRET-OUTSIDE-" not in p.read_bytes(), p


@pytest.mark.parametrize("stage,graph_name", [
    ("simulate", "bitnet_b1.58_full.onnx"),
    ("validate", "bitnet_b1.58_bitlinear.onnx"),
])
def test_item8_external_data_outside_other_readers(exported, tmp_path, stage, graph_name):
    """Every stage that reads a graph's weights confines its external-data locations."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET * 400)
    out = exported / "models" / "output"
    graph = out / graph_name
    if graph.stat().st_nlink > 1:
        data = graph.read_bytes()
        graph.unlink()
        graph.write_bytes(data)
    location = "../../../secret.bin"
    tensor = _point_outside(graph, location)
    cp = tdpu(["--batch", "--stage", stage, "--no-bug-drafts"], exported, timeout=180)
    assert cp.returncode in (1, 2), (cp.returncode, cp.stderr[-2000:])
    no_traceback(cp)
    assert location in cp.stderr + cp.stdout, cp.stderr[-2000:]
    assert tensor in cp.stderr + cp.stdout, cp.stderr[-2000:]


def test_item8_shard_index_outside(exported, tmp_path):
    src = exported / "models" / "output" / "synthetic" / "tiny-seed0"
    ck = tmp_path / "ckpt"
    ck.mkdir()
    shutil.copy2(src / "config.json", ck / "config.json")
    shutil.copy2(src / "model.safetensors", tmp_path / "outside.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "outside.safetensors"), "np") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": {n: "../outside.safetensors" for n in names}}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    cp = tdpu(["--batch", "--stage", "export", "--model", str(ck), "--no-bug-drafts"], exported)
    assert cp.returncode in (1, 2), (cp.returncode, cp.stderr[-2000:])
    no_traceback(cp)
    assert "../outside.safetensors" in cp.stderr + cp.stdout, cp.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# 9. SIGTERM / SIGHUP during a batch run: the Icraft child ends, no 'running', no half files.

def _fake_icraft(dir: Path, body: str) -> Path:
    fake = dir / "fake_icraft"
    fake.write_text("#!/bin/sh\n" + body)
    fake.chmod(0o755)
    return fake


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not re.search(r"State:\s+Z", state)


def _half_written(root: Path) -> list[str]:
    bad = []
    for p in root.rglob("*"):
        n = p.name
        if n.startswith((".staging-", ".validate-")) or n.endswith((".tmp", ".part", ".partial")) \
                or re.match(r"^\..*\.tmp.*$|^tmp[a-z0-9_]{6,}$", n):
            bad.append(str(p.relative_to(root)))
    return bad


@linux_only
@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_item9_stop_signal_during_icraft(exported, tmp_path, sig):
    pidfile = tmp_path / "child.pid"
    gpidfile = tmp_path / "grandchild.pid"
    # like `icraft parse` running `icraft-parse`: the child starts a grandchild and waits
    fake = _fake_icraft(tmp_path, f'sleep 60 &\necho $! > "{gpidfile}"\necho $$ >> "{pidfile}"\n'
                                  f'wait\n')
    set_toml(exported, "icraft", "bin", json.dumps(str(fake)))
    status_file = exported / "phase3_logs" / "runs" / "status.json"
    proc = subprocess.Popen([sys.executable, "-m", "tdpu_tui", "--batch", "--stage", "parse",
                             "--stage", "optimize", "--json", "s.json"],
                            cwd=exported, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "fake icraft never started"
            time.sleep(0.05)
        child = int(pidfile.read_text().split()[0])
        grandchild = int(gpidfile.read_text().split()[0])
        time.sleep(0.3)
        assert _alive(child) and _alive(grandchild)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err_text = err.decode("utf-8", "replace")
    assert "Traceback (most recent call last)" not in err_text, err_text[-3000:]
    assert proc.returncode == 130, (proc.returncode, err_text[-2000:])   # as Ctrl-C
    deadline = time.monotonic() + 5
    while (_alive(child) or _alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [p for p in (child, grandchild) if _alive(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, f"the Icraft child or grandchild outlived tdpu: {alive} of {child, grandchild}"
    status = json.loads(status_file.read_text())
    assert "running" not in json.dumps(status), status
    assert _half_written(exported) == []


# ---------------------------------------------------------------------------------------------
# 10. kill -9 during export / validate; a later run removes leftovers whose owner is dead.

def _kill9_when(proc: subprocess.Popen, watch: Path, prefix: str, timeout: float,
                ignore: tuple[str, ...] = ()) -> list[str]:
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            seen = [e.name for e in os.scandir(watch)
                    if e.name.startswith(prefix) and e.name not in ignore]
        except OSError:
            seen = []
        if seen:
            break
        time.sleep(0.005)
    proc.kill()
    proc.wait(timeout=30)
    return seen


def _leftovers(out: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(out) if e.name.startswith((".staging-", ".validate-")))


@linux_only
def test_item10_kill9_export_then_later_run_cleans(tmp_path):
    proj = fresh_project(tmp_path / "p")
    out = proj / "models" / "output"
    out.mkdir(parents=True)
    # a live owner's leftover: another process (alive) owns it, named the way tdpu names them
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        code = ("import sys; sys.path.insert(0, sys.argv[1]);"
                "from tdpu_tui.engine.osutil.files import owned_prefix;"
                "import tempfile, time;"
                "d = tempfile.mkdtemp(prefix=owned_prefix('.staging-'), dir=sys.argv[2]);"
                "print(d, flush=True); time.sleep(120)")
        holder = subprocess.Popen([sys.executable, "-c", code, str(REPO), str(out)],
                                  stdout=subprocess.PIPE, text=True)
        live_dir = Path(holder.stdout.readline().strip())
        assert live_dir.is_dir()
        proc = subprocess.Popen([sys.executable, "-m", "tdpu_tui", "--batch", "--stage", "export"],
                                cwd=proj, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        seen = _kill9_when(proc, out, ".staging-", 90, ignore=(live_dir.name,))
        if not seen:
            pytest.fail("export never made a staging folder before finishing (cannot probe)")
        left = [n for n in _leftovers(out) if n != live_dir.name]
        assert left, "nothing left after kill -9 (the probe did not hit the window)"
        cp = tdpu(["--batch", "--stage", "precheck"], proj)    # any later run
        no_traceback(cp)
        assert [n for n in _leftovers(out) if n != live_dir.name] == [], _leftovers(out)
        assert live_dir.is_dir(), "a live owner's staging folder was removed"
        holder.kill()
        holder.wait()
        cp = tdpu(["--batch", "--stage", "precheck"], proj)
        assert _leftovers(out) == [], "a dead owner's folder stayed"
    finally:
        live.kill()
        live.wait()
        with __import__("contextlib").suppress(Exception):
            holder.kill()
            holder.wait()


@linux_only
@pytest.mark.slow
def test_item10_kill9_while_writing_the_synthetic_checkpoint(tmp_path):
    """The 2b4t synthetic checkpoint is 1.1 GB, written under a temporary name by export:
    killed meanwhile, a later run removes the half-written folder."""
    proj = fresh_project(tmp_path / "p")
    set_toml(proj, "model.synthetic", "preset", '"2b4t"')
    syn = proj / "models" / "output" / "synthetic"
    syn.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "tdpu_tui", "--batch", "--stage", "export"],
                            cwd=proj, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    seen = _kill9_when(proc, syn, ".", 60)
    if not seen:
        pytest.fail("no temporary checkpoint folder appeared (cannot probe)")
    time.sleep(0.2)
    left = [e.name for e in os.scandir(syn) if e.name.startswith(".")]
    assert left, "nothing left after kill -9"
    set_toml(proj, "model.synthetic", "preset", '"tiny"')
    cp = tdpu(["--batch", "--stage", "precheck"], proj)
    no_traceback(cp)
    assert [e.name for e in os.scandir(syn) if e.name.startswith(".")] == []


@linux_only
@pytest.mark.slow
def test_item10_kill9_validate_then_later_run_cleans(exported):
    out = exported / "models" / "output"
    proc = subprocess.Popen([sys.executable, "-m", "tdpu_tui", "--batch", "--stage", "validate"],
                            cwd=exported, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    seen = _kill9_when(proc, out, ".validate-", 120)
    if not seen:
        pytest.fail("validate made no .validate-* file before finishing (cannot probe)")
    assert _leftovers(out), "nothing left after kill -9"
    tdpu(["--batch", "--stage", "precheck"], exported)
    assert _leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# 11. An unusable [paths].logs: no traceback, a summary, --json; file-system errors name files.

def _check_unusable_logs(proj: Path, name: str) -> None:
    set_toml(proj, "paths", "logs", json.dumps(name))
    summary = proj / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "tdpu_tui", "--batch", "--stage", "precheck",
                           "--json", str(summary)], cwd=proj, env=_env(), capture_output=True,
                          timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    out = proc.stdout.decode("utf-8", "replace")
    assert "Traceback (most recent call last)" not in err + out, err[-3000:]
    assert proc.returncode in (1, 2), (proc.returncode, err[-2000:])
    assert name in err + out, err[-2000:]
    if proc.returncode == 1:
        assert summary.exists(), "no --json summary"
        data = json.loads(summary.read_text())
        assert any(s["status"] == "failed" and name in s["message"] for s in data["stages"]), data
        assert "precheck" in out, "no summary table on stdout"


def test_item11_logs_is_a_file(exported):
    (exported / "logsfile").write_text("I am a file")
    _check_unusable_logs(exported, "logsfile")
    assert (exported / "logsfile").read_text() == "I am a file"


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX")
def test_item11_logs_read_only_dir(exported):
    ro = exported / "rologs"
    ro.mkdir()
    if os.getuid() == 0:
        # root ignores modes; an immutable folder (chattr +i) refuses even root's writes
        if shutil.which("chattr") is None or subprocess.run(
                ["chattr", "+i", str(ro)], capture_output=True).returncode != 0:
            pytest.skip("root, and no chattr +i here: cannot make a folder read-only")
        undo = ["chattr", "-i", str(ro)]
    else:
        ro.chmod(0o555)
        undo = ["chmod", "755", str(ro)]
    try:
        _check_unusable_logs(exported, "rologs")
    finally:
        subprocess.run(undo, check=True)
    assert list(ro.iterdir()) == []


def test_item11_output_is_a_file_is_reported_not_drafted(tmp_path):
    proj = fresh_project(tmp_path / "p", '[paths]\noutput = "outfile"\n')
    (proj / "outfile").write_text("a file")
    cp = tdpu(["--batch", "--stage", "export", "--json", "s.json"], proj)
    assert cp.returncode == 1, (cp.returncode, cp.stderr[-2000:])
    no_traceback(cp)
    assert "outfile" in cp.stderr
    data = json.loads((proj / "s.json").read_text())
    assert "outfile" in data["stages"][0]["message"]
    assert _records(proj) == [], _book(proj).read_text("utf-8")
    assert (proj / "outfile").read_text() == "a file"


@pytest.mark.parametrize("where", ["phase3_logs/runs", "models/output/synthetic"])
def test_item11_a_file_where_a_folder_goes_is_reported_not_drafted(tmp_path, where):
    """A file where tdpu makes a folder (the stage logs' `runs`, the synthetic checkpoints'
    folder): the stage fails naming it, and no bug record is drafted — the book itself is
    writable here."""
    proj = fresh_project(tmp_path / "p")
    (proj / where).parent.mkdir(parents=True)
    (proj / where).write_text("a file")
    cp = tdpu(["--batch", "--stage", "export", "--json", "s.json"], proj)
    assert cp.returncode == 1, (cp.returncode, cp.stderr[-2000:])
    no_traceback(cp)
    assert str(proj / where) in cp.stderr, cp.stderr[-2000:]
    data = json.loads((proj / "s.json").read_text())
    assert where.split("/")[-1] in data["stages"][0]["message"]
    assert _records(proj) == [], _book(proj).read_text("utf-8")
    assert "could not draft" not in cp.stderr
    assert (proj / where).read_text() == "a file"


def test_item11_json_path_is_a_directory(tmp_path):
    proj = fresh_project(tmp_path / "p")
    (proj / "jd").mkdir()
    cp = tdpu(["--batch", "--stage", "precheck", "--json", "jd"], proj)
    assert cp.returncode == 2, (cp.returncode, cp.stderr[-2000:])
    no_traceback(cp)
    assert "jd" in cp.stderr and ".tmp" not in cp.stderr, cp.stderr
    assert sorted(p.name for p in proj.iterdir()) == ["jd", "tdpu.toml"]


def test_item11_disk_full_names_the_file(exported, monkeypatch, capsys):
    """ENOSPC (no tiny tmpfs here): every write of the stage fails with a bare ENOSPC."""
    import builtins
    import errno
    monkeypatch.chdir(exported)
    monkeypatch.syspath_prepend(str(REPO))
    real_open = builtins.open
    hit: list[str] = []

    class FullFile:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            hit.append(getattr(self._f, "name", "?"))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self._f.close()

        def __iter__(self):
            return iter(self._f)

    def full_open(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        if any(c in mode for c in "wax+") and str(exported) in os.path.abspath(str(file)) \
                and "models" in str(file):
            return FullFile(f)
        return f
    monkeypatch.setattr(builtins, "open", full_open)
    from tdpu_tui import cli
    summary = exported / "s.json"
    try:
        rc = cli.main(["--batch", "--stage", "replace", "--json", str(summary), "--no-bug-drafts"])
    except SystemExit as exc:
        rc = exc.code
    monkeypatch.setattr(builtins, "open", real_open)
    captured = capsys.readouterr()
    assert hit, "the probe's ENOSPC was never hit (replace wrote through another path)"
    assert rc == 1, (rc, captured.err[-2000:])
    # caught: the trace goes to the stage log, the terminal gets the one-line error
    assert "Traceback (most recent call last)" not in captured.err, captured.err[-3000:]
    assert "Traceback" in (exported / "phase3_logs" / "runs" / "replace.log").read_text("utf-8")
    data = json.loads(summary.read_text())
    msg = [s for s in data["stages"] if s["name"] == "replace"][0]["message"]
    assert "No space left" in msg or "ENOSPC" in msg or "space" in msg.lower(), msg
    assert "models" in msg and ("output" in msg or ".onnx" in msg), msg


# ---------------------------------------------------------------------------------------------
# 14. Usage mistakes are reported, not drafted; temp names do not split a failure signature.

def _records(proj: Path) -> list[str]:
    book = _book(proj)
    if not book.exists():
        return []
    return re.findall(r"^## Bug #(\d+)", book.read_text("utf-8"), re.M)


def test_item14_out_of_order_stage_is_not_drafted(exported):
    """A fresh export, then validate (replace not run again): the BitLinear graph is from the
    earlier export. One run of both stages, as `--stage export --stage validate` is."""
    before = _book(exported).read_bytes() if _book(exported).exists() else b""
    cp = tdpu(["--batch", "--stage", "export", "--stage", "validate"], exported)
    # a stage run out of order fails (1) or is refused as a usage error (2); either way reported
    assert cp.returncode in (1, 2), (cp.returncode, cp.stderr[-2000:])
    no_traceback(cp)
    assert "replace" in cp.stderr
    after = _book(exported).read_bytes() if _book(exported).exists() else b""
    assert after == before and _records(exported) == []


def test_item14_seq_len_beyond_the_model_is_not_drafted(tmp_path):
    proj = fresh_project(tmp_path / "p", '[export]\nprofile = "icraft"\nseq_len = 100000\n')
    cp = tdpu(["--batch", "--stage", "export"], proj)
    assert cp.returncode in (1, 2), (cp.returncode, cp.stderr[-2000:])
    no_traceback(cp)
    assert "seq_len" in cp.stderr
    assert _records(proj) == [], _book(proj).read_text("utf-8")


def test_item14_missing_op_table_is_not_drafted(exported):
    """[icraft].op_table naming a file that is not there: a missing file the user named."""
    set_toml(exported, "icraft", "op_table", '"my_ops.csv"')
    cp = tdpu(["--batch", "--stage", "precheck"], exported)
    assert cp.returncode in (1, 2), (cp.returncode, cp.stderr[-2000:])
    no_traceback(cp)
    assert "op_table" in cp.stderr and "my_ops.csv" in cp.stderr
    assert _records(exported) == [], _book(exported).read_text("utf-8")


def test_item14_impossible_synthetic_shapes_are_not_drafted(tmp_path):
    proj = fresh_project(tmp_path / "p", "")
    set_toml(proj, "model.synthetic", "num_heads", "3")
    cp = tdpu(["--batch", "--stage", "export"], proj)
    assert cp.returncode in (1, 2), (cp.returncode, cp.stderr[-2000:])
    no_traceback(cp)
    assert "model.synthetic.num_heads" in cp.stderr and "tdpu.toml" in cp.stderr, cp.stderr[-2000:]
    assert _records(proj) == [], _book(proj).read_text("utf-8")


def test_item14_missing_model_dir_is_not_drafted(exported, tmp_path):
    cp = tdpu(["--batch", "--stage", "export", "--model", str(tmp_path / "nope")], exported)
    assert cp.returncode in (1, 2)
    no_traceback(cp)
    assert _records(exported) == []


def test_item14_temp_names_one_signature(exported, tmp_path):
    fake = _fake_icraft(tmp_path, textwrap.dedent("""\
        t=$(mktemp -d /tmp/tmpprobeXXXXXXXX)
        n=$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
        echo "[12/02/26 10:00:00.000] [E] cannot open $t/work_$n.json: No such file"
        echo "[12/02/26 10:00:00.000] [F] 21002"
        echo "[E] 执行以下命令时捕获到错误码21002: icraft-parse --tmp $t/.staging-$n"
        rmdir "$t"
        exit 1
        """))
    set_toml(exported, "icraft", "bin", json.dumps(str(fake)))
    for _ in range(2):
        cp = tdpu(["--batch", "--stage", "parse"], exported)
        assert cp.returncode == 1, (cp.returncode, cp.stderr[-2000:])
    assert len(_records(exported)) == 1, _book(exported).read_text("utf-8")


@pytest.mark.parametrize("a,b", [
    ("models/output/.staging-123.456.vm.k3j4h5ab/bitnet_b1.58_bitlinear.onnx.data: I/O error",
     "models/output/.staging-789.999.vm.zz_zz9zz/bitnet_b1.58_bitlinear.onnx.data: I/O error"),
    ("models/output/.validate-step1-1.2.my-host.abcdef12.onnx: bad graph",
     "models/output/.validate-step1-3.4.my-host.ghijkl_3.onnx: bad graph"),
    ("synthetic/.staging-1.2.vm.tiny-seed0-tmp-abc12345/config.json: truncated",
     "synthetic/.staging-9.8.vm.tiny-seed0-tmp-zzz98765/config.json: truncated"),
    ("/tmp/tmpa1b2c3d4/x.json: not found", "/tmp/tmpzz9y8x7w/x.json: not found"),
    # a file being replaced (atomic write: .NAME.<8 random>.tmp, NAME with dots and digits)
    ("/home/u/p/models/output/.bitnet_b1.58_full.raw.k3j4h5ab.tmp: Input/output error",
     "/home/u/p/models/output/.bitnet_b1.58_full.raw.zz_9y8x7.tmp: Input/output error"),
    # the RTL harness's folder
    ("harness: cannot open models/output/rtl/tdpu-rtl-abcd1234/cycles.bin",
     "harness: cannot open models/output/rtl/tdpu-rtl-q_wer9ty/cycles.bin"),
])
def test_item14_signature_ignores_tdpu_temp_names(a, b):
    """tdpu's own temp names (owner and random part) do not split a failure's signature;
    a different file does."""
    sys.path.insert(0, str(REPO))
    from tdpu_tui.engine.records.bugbook.drafts import failure_signature
    assert failure_signature("replace", a) == failure_signature("replace", b)
    assert failure_signature("replace", a) != failure_signature("replace", a.replace(": ", "x: "))


# ---------------------------------------------------------------------------------------------
# 16-19. The bug book, exactly.

PREAMBLE = ("# Phase 3 Bug记录\n\n我的笔记：这里是前言，不要改。\n"
            "<!-- my own comment -->\n\n")


def _record(n: int, title: str = "t", status: str = "未解决", extra: str = "") -> str:
    return (f"## Bug #{n}: {title}\n- **发现时间**: 2026-12-01 10:00\n- **发现阶段**: 编译\n"
            f"- **错误信息**: boom\n- **根本原因**: 未知\n- **解决方案**: 无\n"
            f"- **状态**: {status}\n{extra}\n---\n\n")


def test_item16_no_marker_in_preamble(tmp_path):
    proj = fresh_project(tmp_path / "p")
    book = _book(proj)
    book.parent.mkdir(parents=True)
    book.write_text(PREAMBLE + _record(1), encoding="utf-8")
    cp = tdpu(["bugs", "add", "--title", "second", "--stage", "编译"], proj)
    assert cp.returncode == 0, cp.stderr
    cp = tdpu(["bugs", "set", "2", "--status", "已解决"], proj)
    assert cp.returncode == 0, cp.stderr
    text = book.read_text("utf-8")
    assert text.startswith(PREAMBLE + _record(1)), text[:600]
    assert "tdpu:" not in text and "last-bug-number" not in text, text
    assert _records(proj) == ["1", "2"]


def test_item16_fresh_book_has_no_marker(tmp_path):
    proj = fresh_project(tmp_path / "p")
    cp = tdpu(["bugs", "add", "--title", "x", "--stage", "导出"], proj)
    assert cp.returncode == 0
    text = _book(proj).read_text("utf-8")
    assert text.startswith(BOOK_TITLE + "\n")
    head = text[: text.index("## Bug #1")]
    assert head.strip() == BOOK_TITLE, repr(head)


NESTED_STATUS = ("  - 2026-12-01: 复现了两次，见日志\n    更深一层的说明  \n"
                 "\t缩进用 tab 的一行\n  ```\n  $ icraft parse --x\n  ```\n")
NESTED_CAUSE = "  - 可能是 Slice 的负步长\n    * 子项\n"


def test_item17_nested_lines_kept_by_set(tmp_path):
    proj = fresh_project(tmp_path / "p")
    book = _book(proj)
    book.parent.mkdir(parents=True)
    rec = (f"## Bug #1: nested\n- **发现时间**: 2026-12-01 10:00\n- **发现阶段**: 编译\n"
           f"- **错误信息**: boom\n- **根本原因**: 未知\n{NESTED_CAUSE}- **解决方案**: 无\n"
           f"- **状态**: 未解决\n{NESTED_STATUS}\n---\n\n")
    book.write_text(BOOK_TITLE + "\n\n" + rec + _record(2), encoding="utf-8")
    cp = tdpu(["bugs", "set", "1", "--status", "已解决"], proj)
    assert cp.returncode == 0, cp.stderr
    text = book.read_text("utf-8")
    assert "- **状态**: 已解决\n" + NESTED_STATUS in text, text
    assert NESTED_CAUSE in text
    cp = tdpu(["bugs", "set", "1", "--fix", "改用 MaxPool"], proj)
    assert cp.returncode == 0, cp.stderr
    text = book.read_text("utf-8")
    assert "- **状态**: 已解决\n" + NESTED_STATUS in text, text
    assert "- **根本原因**: 未知\n" + NESTED_CAUSE in text, text
    assert text.endswith(_record(2))
    cp = tdpu(["bugs", "list", "--json"], proj)
    data = json.loads(cp.stdout)
    recs = data if isinstance(data, list) else data.get("records", data.get("bugs"))
    first = [r for r in recs if str(r.get("number", r.get("n"))) == "1"][0]
    assert "已解决" in json.dumps(first, ensure_ascii=False)


def test_item18_heading_in_fence_is_text(tmp_path):
    proj = fresh_project(tmp_path / "p")
    book = _book(proj)
    book.parent.mkdir(parents=True)
    code = [f"{fence}\n## Bug #7: not a record\n- **状态**: 未解决\n{fence}\n" for fence in ("```", "~~~")]
    text0 = BOOK_TITLE + "\n\n" + code[0] + "\n" + _record(1) + "说明：\n" + code[1] + "\n"
    book.write_text(text0, encoding="utf-8")
    cp = tdpu(["bugs", "set", "7", "--status", "已解决"], proj)
    assert cp.returncode != 0
    no_traceback(cp)
    assert book.read_text("utf-8") == text0
    cp = tdpu(["bugs", "add", "--title", "next", "--stage", "编译"], proj)
    assert cp.returncode == 0, cp.stderr
    text = book.read_text("utf-8")
    assert "## Bug #2: next" in text, text
    assert text.count("## Bug #7: not a record") == 2
    assert text.startswith(text0)


def test_item18_heading_in_an_indented_fence_outside_a_list_is_text(tmp_path):
    """A fence may be indented up to 3 columns (CommonMark): outside a list item it is a
    block at the margin like any other, and a `## Bug #8` inside it is text."""
    proj = fresh_project(tmp_path / "p")
    book = _book(proj)
    book.parent.mkdir(parents=True)
    code = "   ~~~\n## Bug #8: in an indented fence\n- **状态**: 未解决\n   ~~~\n"
    text0 = (BOOK_TITLE + "\n\n" + _record(1) + "说明：\n\n" + code + "\n" + _record(2)
             + "  ```\n## Bug #9: in a fence after a rule\n  ```\n\n")
    book.write_text(text0, encoding="utf-8")
    cp = tdpu(["bugs", "set", "8", "--status", "已解决"], proj)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    no_traceback(cp)
    cp = tdpu(["bugs", "set", "9", "--status", "已解决"], proj)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    assert book.read_text("utf-8") == text0
    cp = tdpu(["bugs", "add", "--title", "next", "--stage", "编译"], proj)
    assert cp.returncode == 0, cp.stderr
    text = book.read_text("utf-8")
    assert "## Bug #3: next" in text and text.startswith(text0), text
    cp = tdpu(["bugs", "list", "--json"], proj)
    data = json.loads(cp.stdout)
    recs = data if isinstance(data, list) else data.get("records", data.get("bugs"))
    assert sorted(str(r.get("number", r.get("n"))) for r in recs) == ["1", "2", "3"]


def test_item18_non_ascii_digits_are_not_a_record_number(tmp_path):
    proj = fresh_project(tmp_path / "p")
    book = _book(proj)
    book.parent.mkdir(parents=True)
    text0 = BOOK_TITLE + "\n\n" + _record(1) + "## Bug #١٢: arabic digits\n\n"
    book.write_text(text0, encoding="utf-8")
    cp = tdpu(["bugs", "add", "--title", "next", "--stage", "编译"], proj)
    assert cp.returncode == 0, cp.stderr
    text = book.read_text("utf-8")
    assert "## Bug #2: next" in text and text.startswith(text0), text


def test_item19_concurrent_set_no_conflict_copies(tmp_path):
    proj = fresh_project(tmp_path / "p")
    book = _book(proj)
    book.parent.mkdir(parents=True)
    book.write_text(BOOK_TITLE + "\n\n" + _record(1) + _record(2), encoding="utf-8")
    before = all_files(proj)
    for round_ in range(1):
        procs = [subprocess.Popen([sys.executable, "-m", "tdpu_tui", "bugs", "set", "1", "--cause",
                                   f"cause-{round_}-{i}"], cwd=proj, env=_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for i in range(3)]
        results = [(p.wait(timeout=60), p.stderr.read().decode()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        assert all(rc == 0 for rc, _ in results), results
        text = book.read_text("utf-8")
        assert re.search(rf"- \*\*根本原因\*\*: cause-{round_}-[012]\n", text), text
        assert "conflict" not in " ".join(e for _, e in results).lower(), results
    new = {f for f in all_files(proj) - before if not f.startswith("phase3_logs/.tdpu")}
    assert new == set(), new
    assert _records(proj) == ["1", "2"]
    assert book.read_text("utf-8").endswith(_record(2))


def test_item19_huge_heading_number(tmp_path):
    proj = fresh_project(tmp_path / "p")
    book = _book(proj)
    book.parent.mkdir(parents=True)
    text0 = BOOK_TITLE + "\n\n" + _record(1) + "## Bug #" + "9" * 5000 + ": huge\n- **状态**: 未解决\n"
    book.write_text(text0, encoding="utf-8")
    for args in (["bugs", "list", "--json"], ["bugs", "add", "--title", "x", "--stage", "编译"]):
        cp = tdpu(args, proj)
        no_traceback(cp)
        assert cp.returncode in (1, 2), (args, cp.returncode, cp.stdout[-300:])
        assert cp.stderr.strip() and len(cp.stderr) < 4000, (args, cp.stderr[-500:])
    assert book.read_text("utf-8") == text0
    book.write_text(BOOK_TITLE + "\n\n" + _record(1), encoding="utf-8")
    cp = tdpu(["bugs", "set", "9" * 5000, "--status", "已解决"], proj)
    no_traceback(cp)
    assert cp.returncode == 2, cp.returncode
    assert "N" in cp.stderr or "number" in cp.stderr


@pytest.mark.parametrize("envvars", [{"PYTHONIOENCODING": "latin-1"},
                                     {"PYTHONIOENCODING": "ascii"},
                                     {"LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0",
                                      "PYTHONIOENCODING": ""}])
def test_item19_list_json_utf8_any_encoding(tmp_path, envvars):
    proj = fresh_project(tmp_path / "p")
    book = _book(proj)
    book.parent.mkdir(parents=True)
    raw = (BOOK_TITLE + "\n\n").encode() + _record(1, title="坏字节 XX").encode().replace(
        b"XX", b"\xff\xfe\x80") + _record(2, title="正常").encode()
    book.write_bytes(raw)
    env = _env()
    for k, v in envvars.items():
        if v:
            env[k] = v
        else:
            env.pop(k, None)
    cp = tdpu(["bugs", "list", "--json"], proj, env=env)
    assert cp.returncode == 0, cp.stderr
    no_traceback(cp)
    data_bytes = cp.stdout_bytes
    text = data_bytes.decode("utf-8")   # strict: must be valid UTF-8
    data = json.loads(text)
    dumped = json.dumps(data, ensure_ascii=False)
    assert "正常" in dumped and "坏字节" in dumped and "未解决" in dumped
    # the undecodable bytes are kept escaped, not dropped or replaced by U+FFFD
    assert "\ufffd" not in dumped
    assert re.search(r"\\\\x[fF][fF]|\\udcff|\\\\xff|%FF|\\xff", json.dumps(data)), json.dumps(data)
    assert book.read_bytes() == raw


def test_item19_batch_results_under_an_ascii_stdout(exported):
    """Results go to stdout whatever its encoding (LANG=C over SSH, cron): the summary table
    with '→' and '×' in it is written with escapes, not dropped."""
    env = _env(PYTHONIOENCODING="ascii")
    cp = tdpu(["--batch", "--stage", "replace", "--no-bug-drafts"], exported, env=env)
    assert cp.returncode == 0, cp.stderr[-2000:]
    no_traceback(cp)
    assert re.search(r"^replace +ok", cp.stdout, re.M), (cp.stdout, cp.stderr[-1000:])
    assert "BitLinear" in cp.stdout


# ---------------------------------------------------------------------------------------------
# 20. A pipeline run creates the book with the template title; lock files in one hidden folder.

def test_item20_run_creates_book_and_locks_stay_hidden(exported):
    book = _book(exported)
    if book.exists():
        book.unlink()
    cp = tdpu(["--batch", "--stage", "precheck"], exported)
    assert cp.returncode == 0, cp.stderr[-2000:]
    assert book.exists(), "a pipeline run did not create bugs_found.md"
    assert book.read_text("utf-8").splitlines()[0] == BOOK_TITLE
    cp = tdpu(["bugs", "add", "--title", "x", "--stage", "编译"], exported)
    assert cp.returncode == 0
    cp = tdpu(["bugs", "set", "1", "--status", "待验证"], exported)
    assert cp.returncode == 0
    logs = exported / "phase3_logs"
    assert not [p.name for p in logs.iterdir() if p.name.endswith(".lock")]
    locks = [p for p in exported.rglob("*") if p.name.endswith(".lock") or ".lock." in p.name]
    dirs = {p.parent for p in locks}
    assert len(dirs) <= 1, dirs
    for d in dirs:
        assert d.name.startswith("."), d


def test_item20_failed_run_also_creates_book(tmp_path):
    proj = fresh_project(tmp_path / "p")
    cp = tdpu(["--batch", "--stage", "export", "--model", str(tmp_path / "nope")], proj)
    assert cp.returncode in (1, 2)
    # a usage error may stop before the run; a run that ran a stage creates the book
    if cp.returncode == 1:
        assert _book(proj).exists()
        assert _book(proj).read_text("utf-8").splitlines()[0] == BOOK_TITLE
