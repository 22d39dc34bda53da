"""Suite-wide hooks.

A test skipped because a dependency is missing is a test that did not run while CI stays green:
with ``MANO_FAIL_ON_MISSING_DEPENDENCY=1`` (set by ``.ci/run``) such a skip fails the session.
The tests import what we install directly (no ``importorskip``), so this guards new tests and
plugins that skip on an ImportError.
"""

from __future__ import annotations

import os
import re

MISSING_DEPENDENCY = re.compile(r"could not import|No module named|not installed|ImportError", re.IGNORECASE)
_missing: list[str] = []


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return str(longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr)


def pytest_runtest_logreport(report):
    """Runs in the controlling process for every test (pytest-xdist forwards workers' reports)."""
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if MISSING_DEPENDENCY.search(reason):
            _missing.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report):  # a module-level skip (importorskip at import time)
    if report.skipped and MISSING_DEPENDENCY.search(_skip_reason(report)):
        _missing.append(f"{report.nodeid}: {_skip_reason(report)}")


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput") or not _missing:  # xdist worker: the controller decides
        return
    if os.environ.get("MANO_FAIL_ON_MISSING_DEPENDENCY") == "1":
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if _missing and not hasattr(terminalreporter.config, "workerinput"):
        strict = os.environ.get("MANO_FAIL_ON_MISSING_DEPENDENCY") == "1"
        terminalreporter.section("skipped for a missing dependency" + (" (fails the run)" if strict else ""))
        for line in _missing:
            terminalreporter.write_line(line)
