"""The Pipeline tab's Import action: `i` asks for a bundle path and runs the engine's import."""

from __future__ import annotations

import asyncio

from conftest import write_config

from tdpu_tui.app.app import TdpuApp
from tdpu_tui.app.import_screen import ImportScreen
from tdpu_tui.engine.core.config import load_config


def test_import_key_asks_for_a_path_and_reports_a_refusal(tmp_path):
    cfg = load_config(write_config(tmp_path))
    bogus = tmp_path / "not_a_bundle"
    bogus.mkdir()

    async def scenario():
        app = TdpuApp(cfg, stages=[])
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("i")
            await pilot.pause()
            assert isinstance(app.screen, ImportScreen)
            field = app.screen.query_one("#import-path")
            field.value = str(bogus)
            await pilot.press("enter")
            for _ in range(100):
                await pilot.pause(0.05)
                if any(n.title == "icraft import" for n in app._notifications):
                    break
            notes = [n.message for n in app._notifications if n.title == "icraft import"]
            assert notes and notes[0].startswith("import refused: ")
            assert "no bundle.json" in notes[0] and str(bogus) in notes[0]

    asyncio.run(scenario())


def test_escape_closes_the_import_question_without_importing(tmp_path):
    cfg = load_config(write_config(tmp_path))

    async def scenario():
        app = TdpuApp(cfg, stages=[])
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("i")
            await pilot.pause()
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, ImportScreen)
            assert not any(n.title == "icraft import" for n in app._notifications)

    asyncio.run(scenario())
