"""Stage helpers: the failure-rate check every stage uses."""

import pytest

from pipeline.runtime import check_failure_rate


def test_failure_rate_limit_is_inclusive_and_names_the_param():
    check_failure_rate(1, 100, 0.01, "sample x", "multigen.max_failed_rate")  # exactly at the limit: passes
    check_failure_rate(0, 0, 0.0, "nothing", "p")  # no items: nothing to judge
    with pytest.raises(RuntimeError, match=r"masks rows: 2 of 100 failed \(limit 1.0%\).*raise grounding.max_failed_rate"):
        check_failure_rate(2, 100, 0.01, "masks rows", "grounding.max_failed_rate")
