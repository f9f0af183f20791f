"""What a prefork child writes into pages of its own: work a child would repeat after fork is done
once in the main process instead."""

from __future__ import annotations

import signal
import sys

import pytest

from worker import lifecycle


def test_a_child_setting_its_parent_death_signal_builds_no_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """billiard sets each child's parent-death signal with cffi's cdef; once the main process
    has parsed that declaration, a child's cdef reuses cffi's parser instead of building one."""
    cffi = pytest.importorskip("cffi")
    pycparser = pytest.importorskip("pycparser")
    from billiard.util import set_pdeathsig

    assert "cffi" in sys.modules and cffi is not None
    lifecycle._parse_before_fork()

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a new C parser was built after the main process made one")

    monkeypatch.setattr(pycparser.CParser, "__init__", refuse)
    set_pdeathsig(signal.SIGTERM)
    set_pdeathsig(0)
