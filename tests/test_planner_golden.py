"""Every plan over the golden grid is what was recorded (tests/planner_golden.py says how to re-record).

A failure here means the planner now answers a case differently: a refactor must not; a change
that means to re-records the file and shows the diff.
"""
from __future__ import annotations

import json

import pytest

from planner_golden import GOLDEN, answer, cases

RECORDED = json.loads(GOLDEN.read_text(encoding="utf-8"))
CASES = cases()


def test_the_recording_covers_the_grid():
    assert sorted(RECORDED) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_plan_is_the_recorded_one(name):
    got, want = answer(CASES[name]), RECORDED[name]
    if got != want:  # name the fields that differ first: a whole plan is long
        differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        assert {k: got.get(k) for k in differ} == {k: want.get(k) for k in differ}, name
