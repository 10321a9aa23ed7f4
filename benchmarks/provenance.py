"""What every benchmark records beside its figures, and how it writes them."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def provenance(machine_note: str = "") -> dict[str, Any]:
    """Date, machine, commit and the exact command: enough to reproduce a table."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs" + (f", {machine_note}" if machine_note else "")
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": machine,
        "commit": commit or "unknown",
        "command": "python " + " ".join(sys.argv),
    }


def write_results(out: Path, doc: dict[str, Any], markdown: str) -> None:
    """OUT.json (every figure) and OUT.md (the table for people), and the table on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
