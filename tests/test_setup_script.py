"""scripts/setup.sh, which `make test` and CI run first: as a user who cannot install, it names
every missing Debian package in one line and stops before installing or running anything."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.harness import ROOT

SETPRIV = shutil.which("setpriv")


@pytest.mark.skipif(os.getuid() != 0 or SETPRIV is None, reason="needs root and setpriv(1)")
def test_without_root_the_missing_packages_are_named_in_one_line():
    # A PATH with only what the script itself runs: every tool the tests need is missing. In a
    # folder of its own that the unprivileged user can read (pytest's tmp_path is root's alone).
    bin_dir = Path(tempfile.mkdtemp(prefix="setup-path-"))
    bin_dir.chmod(0o755)
    # A copy of the script there too: the checkout itself may be readable by its owner alone.
    (bin_dir / "scripts").mkdir(mode=0o755)
    script = bin_dir / "scripts" / "setup.sh"
    shutil.copy(ROOT / "scripts" / "setup.sh", script)
    script.chmod(0o755)
    for tool in ("bash", "dirname", "python3"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or tool)
    nobody = [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups"]
    done = subprocess.run(
        [*nobody, str(bin_dir / "bash"), str(script)],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    shutil.rmtree(bin_dir)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    for package in ("redis-server", "nodejs", "npm", "tinyproxy", "chromium", "prometheus"):
        assert package in line, line
    assert line.startswith("the tests need these Debian packages:")
