"""The two-host rehearsal on object storage (scripts/multihost_s3.py): two network namespaces, each a
2-rank gloo job into its own run in one SeaweedFS bucket, one PostgreSQL catalog, a third process
pruning and verifying meanwhile, one host SIGKILLed mid-save. Skipped where namespaces are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "multihost_s3.py"


@pytest.mark.timeout(400)
def test_two_hosts_one_bucket_one_dies_mid_save(catalog_url: str) -> None:
    if not catalog_url.startswith("postgresql"):
        pytest.skip("the hosts share a PostgreSQL catalog")
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--url", catalog_url, "--mib", "6"], capture_output=True, text=True, timeout=380
    )
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    if r.returncode == 77:
        pytest.skip(rep["skipped"])
    assert r.returncode == 0 and rep["ok"], r.stdout + r.stderr[-3000:]
    checks = rep["checks"]
    assert checks["victim_killed"] and checks["victim_pending"] == [4]
    assert [g["rolled_back"] for name, g in sorted(checks["gc"].items())] == [[], [4]]
    assert checks["hostA_committed"] and checks["maintainer"]["rounds"] > 1
