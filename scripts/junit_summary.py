"""Adds up the JUnit XML reports of every lane into one closing line: 'N passed, N failed'."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def main(directory: str) -> int:
    passed = failed = skipped = 0
    for report in sorted(Path(directory).glob("*.xml")):
        root = ET.parse(report).getroot()  # noqa: S314 (our own test reports)
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        lane = {"passed": 0, "failed": 0, "skipped": 0}
        for suite in suites:
            tests = int(suite.get("tests", 0))
            fails = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            skips = int(suite.get("skipped", 0))
            lane["passed"] += tests - fails - skips
            lane["failed"] += fails
            lane["skipped"] += skips
        print(
            f"{report.stem}: {lane['passed']} passed, {lane['failed']} failed, "
            f"{lane['skipped']} skipped"
        )
        passed += lane["passed"]
        failed += lane["failed"]
        skipped += lane["skipped"]
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
