"""`python -m soak`: run the chaos soak and write docs/soak.md (SOAK_QUICK=1: a short run;
SOAK_DOWNLOADS=N: N downloads, the time scaled to match; SOAK_REDIS_KILLS=1: 2,400 small
downloads under 40 Redis SIGKILLs and nothing else)."""

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
    kills = os.environ.get("SOAK_REDIS_KILLS") == "1"
    default = not (os.environ.get("SOAK_QUICK") or os.environ.get("SOAK_DOWNLOADS") or kills)
    stem = ROOT / "docs" / ("soak" if default else "soak-redis-kills" if kills else "soak-last")
    stem.with_suffix(".md").write_text(report + "\n")
    stem.with_suffix(".json").write_text(json.dumps(figures, indent=1, default=str) + "\n")
    sys.exit(0 if figures["ok"] else 1)
