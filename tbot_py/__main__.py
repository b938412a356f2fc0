"""``python -m tbot_py`` is the same as ``tbot-py``."""

from __future__ import annotations

from tbot_py.cli.main import main

main()
