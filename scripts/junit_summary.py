"""Adds up the JUnit XML reports of every lane into one closing line: 'N passed, N failed'."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def main(directory: str) -> int:
    passed = failed = skipped = 0
    for report in sorted(Path(directory).glob("*.xml")):
        root = ET.parse(report).getroot()  # noqa: S314 (our own test reports)
        lane = {"passed": 0, "failed": 0, "skipped": 0}
        for case in root.iter("testcase"):
            children = {child.tag for child in case}
            if children & {"failure", "error"}:
                lane["failed"] += 1
            elif "skipped" in children or case.get("status") in ("skipped", "pending", "disabled"):
                lane["skipped"] += 1  # ginkgo marks a pending spec by status only
            else:
                lane["passed"] += 1
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
