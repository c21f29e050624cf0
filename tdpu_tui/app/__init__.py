"""The interactive face of tdpu: a Textual app over the same engine and events as `--batch`.

Imported lazily by `tdpu_tui.cli` so that `--batch` never loads Textual.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tdpu_tui.engine.core.config import Config
from tdpu_tui.engine.core.errors import ConfigError, ExitCode


def run_app(config: Config | str | Path) -> int:
    """Run the interactive session on `config` (a loaded Config or the path of a tdpu.toml)."""
    if not isinstance(config, Config):
        from tdpu_tui.engine.core.config import load_config
        try:
            config = load_config(config)
        except ConfigError as exc:
            print(f"tdpu: configuration error: {exc}", file=sys.stderr)
            return int(ExitCode.USAGE)
    from tdpu_tui.app.app import TdpuApp

    app = TdpuApp(config)
    result = app.run()
    if app.run_done is not None and not app.run_done.is_set():
        # `q` twice: the screen is gone, the cancelled stage has not reached its next check yet.
        print("tdpu: waiting for the cancelled stage to stop (ctrl+c leaves it)", file=sys.stderr)
        try:
            app.run_done.wait()
        except KeyboardInterrupt:
            return int(ExitCode.INTERRUPT)
    if app.return_code:  # Textual's own failure (an exception in the app)
        return int(app.return_code)
    return int(result or 0)


__all__ = ["run_app"]
