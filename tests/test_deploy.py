"""``partitioner.deploy.local_deployment`` (what ``teesplit demo`` and the serving benchmark
start): a bundle that cannot be served fails with a typed error naming the process at fault, and
leaves no process behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from partitioner.deploy import DeployError, local_deployment


def children() -> set[int]:
    """This process's live children (Linux /proc): what a failed start must not leave."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


def test_a_missing_bundle_is_a_deploy_error_and_nothing_keeps_running(tmp_path):
    before = children()
    with pytest.raises(DeployError, match="GPU worker did not start"):
        with local_deployment(tmp_path / "nothing-here", log=tmp_path / "log.txt"):
            pytest.fail("no deployment should start")
    after = children()
    assert after <= before
    assert "nothing-here" in (tmp_path / "log.txt").read_text()
