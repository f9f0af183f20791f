"""`python -m soak`: run the chaos soak and write docs/soak.md (SOAK_QUICK=1: a short run;
SOAK_DOWNLOADS=N: N downloads, the time scaled to match)."""

from __future__ import annotations

import json
import sys

from soak.report import ROOT, markdown
from soak.run import main

if __name__ == "__main__":
    figures = main()
    report = markdown(figures)
    print(report)
    print(json.dumps(figures, indent=1, default=str)[:4000])
    (ROOT / "docs" / "soak.md").write_text(report + "\n")
    (ROOT / "docs" / "soak.json").write_text(json.dumps(figures, indent=1, default=str) + "\n")
    sys.exit(0 if figures["ok"] else 1)
