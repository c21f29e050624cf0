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
