#!/usr/bin/env python3
"""Writes docs/errors.md from tests/error_cases.py: every bad input of the public functions with
the exception and the message it really raises (each case is run; no GPU needed).

    python tools/errors_doc.py           # rewrite docs/errors.md
    python tools/errors_doc.py --check   # exit 1 if docs/errors.md is not current

tests/test_robustness.py::test_errors_doc_is_current does the --check as part of the tests."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from error_cases import render_markdown  # noqa: E402

DOC = ROOT / "docs" / "errors.md"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/errors.md differs from what it would write")
    args = parser.parse_args(argv)
    text = render_markdown()
    if args.check:
        current = DOC.read_text() if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is not current: run python tools/errors_doc.py", file=sys.stderr)
            return 1
        print(f"{DOC} is current")
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
