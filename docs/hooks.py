"""MkDocs hook: the reference tables are generated at build time by `gen_ref.expand`, so they
follow the code (the schema, the command line, the package's modules) and never go stale."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's `tuner`

import gen_ref  # noqa: E402


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return gen_ref.expand(markdown)
