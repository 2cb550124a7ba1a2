"""The installed kansas finds its twistd plugin without PYTHONPATH (an editable install
as `make` makes, or a plain one), from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kansas.testing.processes import CHECKOUT


def test_the_plugin_dir_lives_under_src_too() -> None:
    # What an editable install puts on sys.path is src/: Twisted finds the plugin in its
    # twisted/plugins (setup.py says why).
    top = CHECKOUT / "twisted" / "plugins" / "kansas_plugin.py"
    assert (CHECKOUT / "src" / "twisted" / "plugins" / "kansas_plugin.py").samefile(top)


def test_twistd_finds_the_plugin_without_pythonpath(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    twistd = Path(sys.executable).parent / "twistd"
    result = subprocess.run([str(twistd), "kansas", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Usage: twistd [options] kansas [options]" in result.stdout, result.stdout
