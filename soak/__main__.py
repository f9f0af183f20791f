"""`python -m soak`: run the chaos soak and write docs/soak.md (SOAK_QUICK=1: a short run;
SOAK_DOWNLOADS=N: N downloads, the time scaled to match)."""

from __future__ import annotations

import json
import os
import sys

from soak.report import ROOT, markdown
from soak.run import main

if __name__ == "__main__":
    figures = main()
    report = markdown(figures)
    print(report)
    print(json.dumps(figures, indent=1, default=str)[:4000])
    # The committed report is a default run's; a quick or resized run writes beside it.
    default = not os.environ.get("SOAK_QUICK") and not os.environ.get("SOAK_DOWNLOADS")
    stem = ROOT / "docs" / ("soak" if default else "soak-last")
    stem.with_suffix(".md").write_text(report + "\n")
    stem.with_suffix(".json").write_text(json.dumps(figures, indent=1, default=str) + "\n")
    sys.exit(0 if figures["ok"] else 1)
