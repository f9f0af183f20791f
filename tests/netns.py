"""Separate hosts on one machine: network namespaces the test creates and removes, each joined to
the root namespace by a veth pair on 10.213.<i>.0/30 (root side .1, host side .2). Only those
addresses and loopback are used. A name in /etc/netns/<ns>/hosts maps to the root side, so every
host reaches the test's servers by the same name."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

NAME = "origin.test"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Hosts:
    def __init__(self, count: int, prefix: str) -> None:
        self.names = [f"{prefix}{i}" for i in range(count)]
        self.root_side = [f"10.213.{i + 1}.1" for i in range(count)]

    def create(self) -> Hosts:
        self.remove()  # what a killed earlier run left
        for i, ns in enumerate(self.names):
            root, inner = f"{ns}r", f"{ns}h"
            _ip("netns", "add", ns)
            _ip("link", "add", root, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("addr", "add", f"{self.root_side[i]}/30", "dev", root)
            _ip("link", "set", root, "up")
            _ip("-n", ns, "addr", "add", f"10.213.{i + 1}.2/30", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{self.root_side[i]} {NAME}\n")
        return self

    def remove(self) -> None:
        for ns in self.names:
            subprocess.run(["ip", "link", "del", f"{ns}r"], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)

    @staticmethod
    def available() -> bool:
        probe = "dlprobe"
        ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return ok
