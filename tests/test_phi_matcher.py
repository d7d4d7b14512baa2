"""The PHI screen's identifier matcher (``phi._IdentifierMatcher``) against the regular
expression that defines it (``phi.identifier_pattern``): the same verdict on every text.

The matcher looks needles of dot-separated digit groups (UIDs, numeric IDs, dates) up in a
set instead of compiling them into one alternation (13-20 ms a seal for a 300-slice
series); that is only an optimisation if no text is judged differently. Texts are built
from the needles themselves, their fragments, digits, dots, letters (those that match
``[a-z]`` case-insensitively included: 'K' KELVIN SIGN, 'ſ' LONG S) and separators.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from icam_med.audit import find_phi
from icam_med.audit.phi import _IdentifierMatcher, _needles, identifier_pattern

UIDS = ["1.2.826.0.1.3680043.8.498.10000000000000000007",
        "1.2.826.0.1.3680043.8.498.10000000000000007926", "2.25.123", "1.2.3"]
OTHERS = ["DOE^JOHN", "12345678", "19800101", "GENERAL HOSPITAL", "ab.12", "007", "12.0."]

identifiers = st.lists(st.sampled_from(UIDS + OTHERS) | st.from_regex(r"[0-9]{1,4}(\.[0-9]{1,3}){0,3}",
                                                                      fullmatch=True),
                       min_size=1, max_size=6)


def _pieces(ids: list[str]) -> st.SearchStrategy[str]:
    frags = [i[a:b] for i in ids for a in range(0, len(i), 3) for b in (a + 2, a + 5, len(i))]
    return st.sampled_from(ids + [i.lower() for i in ids] + frags) | st.sampled_from(
        ["0", "1", "9", ".", "..", "a", "Z", "K", "ſ", "é", "_", "-", " ", "^", "/", "x1", "٣"])


@settings(max_examples=600, deadline=None)
@given(data=st.data(), ids=identifiers)
def test_matcher_agrees_with_the_pattern(data, ids):
    needles = _needles(ids)
    pattern = identifier_pattern(ids)
    if not needles:  # every value under 3 characters: nothing to look for either way
        assert pattern is None
        return
    matcher = _IdentifierMatcher(needles)
    for _ in range(8):
        text = "".join(data.draw(st.lists(_pieces(ids), max_size=8)))
        assert matcher.search(text) == bool(pattern.search(text)), (text, needles)


def test_known_cases():
    ids = ["1.2.826.0.1.3680043.8.498.1", "12345678"]
    m = _IdentifierMatcher(_needles(ids))
    for text, hit in [("1.2.826.0.1.3680043.8.498.1", True), ("x_1.2.826.0.1.3680043.8.498.1-y", True),
                      ("a1.2.826.0.1.3680043.8.498.1", False), ("1.2.826.0.1.3680043.8.498.12", False),
                      ("9.1.2.826.0.1.3680043.8.498.1.5", True), ("id 12345678.", True),
                      ("012345678", False), ("K12345678", False), ("12345678Z", False),
                      ("version 2.13.0", False)]:
        assert m.search(text) is hit, text
    record = {"scan": {"id": "case-12345678"}, "n": "1.2.826.0.1.3680043.8.498.1x"}
    assert [f.split(":")[0] for f in find_phi(record, ids)] == ["scan.id"]
