"""The architecture's refactors keep every result: one small run of each command gives the recorded numbers.

``tests/outputs/check.py`` holds the commands and the recorded outputs (JSON less timing fields, and a
SHA-256 of every tensor); this runs them in-process on the embedded model and wants no difference.
"""

from __future__ import annotations

import os

import pytest

from tests.outputs import check


@pytest.mark.slow
def test_every_command_gives_the_recorded_outputs(embedded):
    if check.recorded_machine() != check.machine():  # other kernels give other last bits: not a refactor's doing
        message = (f"outputs recorded on {check.recorded_machine()}, this is {check.machine()}: re-record them at "
                   "the last compared commit on this machine (tests/outputs/check.py)")
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    differences = {name: diff for name, diff in check.compare(in_process=True).items() if diff is not None}
    assert not differences, differences


def test_first_difference_names_the_path_and_both_values():
    want = {"results": [{"ppl": 1.5, "method": "weightedkv"}], "tokens": 4}
    assert check.first_difference(want, {"results": [{"ppl": 1.5, "method": "weightedkv"}], "tokens": 4}) is None
    assert check.first_difference(want, {"results": [{"ppl": 1.25, "method": "weightedkv"}], "tokens": 4}) == \
        "/results[0]/ppl: recorded 1.5, now 1.25"
    assert check.first_difference(want, {"results": [], "tokens": 4}) == "/results: 1 items recorded, 0 now"
    assert "only in recorded" in check.first_difference(want, {"results": want["results"]})


def test_volatile_fields_and_work_paths_are_left_out():
    data = {"seconds": 3.2, "ppl": 7.0, "dir": "/data/w/heads_profile", "rows": [{"device": "cpu", "x": 1}]}
    assert check._strip(data, "/data/w") == {"ppl": 7.0, "dir": "<work>/heads_profile", "rows": [{"x": 1}]}
