"""The README's reliability table is generated from the suite's cases and must not drift from them."""

from __future__ import annotations

import cases


def test_readme_lists_every_case_of_the_suite() -> None:
    found = cases.collect()
    assert len(found) >= 40, f"the reliability suite has {len(found)} cases; the issue asks for at least 40"
    text = cases.README.read_text(encoding="utf-8")
    assert cases.BEGIN in text and cases.END in text, "README.md lacks the reliability table markers"
    start, stop = text.index(cases.BEGIN), text.index(cases.END) + len(cases.END)
    assert text[start:stop] == cases.readme_block(found), (
        "README.md's reliability table differs from tests/reliability: run `python tests/reliability/cases.py --write`"
    )
