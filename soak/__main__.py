"""`python -m soak`: run the chaos soak and write docs/soak.md (SOAK_QUICK=1: a short run;
SOAK_DOWNLOADS=N: N downloads, the time scaled to match; SOAK_REDIS_KILLS=1: 2,400 small
downloads under 40 Redis SIGKILLs and nothing else; SOAK_DISK_MARGIN=<bytes>: with disk
reservations on, reported as soak-disk-<broker>)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

from soak.report import ROOT, markdown, runs_table
from soak.run import main


def report_stem(env: Mapping[str, str], broker: str) -> str:
    """Where a run's report goes in docs/: the committed one is a default run's on Redis; a
    resized run writes one of its own (listed in docs/soak.md), a quick one soak-last."""
    if env.get("SOAK_REDIS_KILLS") == "1":
        return "soak-redis-kills"
    if env.get("SOAK_DISK_MARGIN"):
        return f"soak-disk-{broker}"
    if env.get("SOAK_QUICK"):
        return "soak-last"
    if env.get("SOAK_DOWNLOADS"):
        return f"soak-{int(env['SOAK_DOWNLOADS'])}-{broker}"
    return "soak" if broker == "redis" else f"soak-{broker}"


if __name__ == "__main__":
    figures = main()
    report = markdown(figures)
    print(report)
    print(json.dumps(figures, indent=1, default=str)[:4000])
    stem = report_stem(os.environ, figures["broker"])
    docs = ROOT / "docs"
    (docs / f"{stem}.json").write_text(json.dumps(figures, indent=1, default=str) + "\n")
    if stem != "soak":
        (docs / f"{stem}.md").write_text(report + "\n")
    # The default report lists the resized runs: written again with the table as it now stands.
    main_json = docs / "soak.json"
    if main_json.exists():
        default_figures = json.loads(main_json.read_text())
        (docs / "soak.md").write_text(markdown(default_figures, runs_table(docs)) + "\n")
    sys.exit(0 if figures["ok"] else 1)
