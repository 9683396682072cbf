"""``eval/gpu_check.py --dry-run``: the GPU check's code paths on the CPU, at tiny shapes.

The numbers are not asserted (the dry run's timings are meaningless and its correctness rows are
what the GPU run reports); the test checks that every section and every method is there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from orthoft.adapters import REGISTERED

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu-check"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval" / "gpu_check.py"), str(out), "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["meta"]["dry_run"] is True
    assert {"cuda_tests", "correctness", "throughput", "newton_schulz"} <= set(results)

    assert results["cuda_tests"]["status"] == "skipped" and results["cuda_tests"]["reason"]

    methods = {config_cls.__name__.removesuffix("Config") for config_cls, _ in REGISTERED.values()}
    assert methods >= {"OFT", "BOFT", "QGOFT", "HRA", "PSOFT", "SVFT", "CLOVER"}
    rows = results["correctness"]["rows"]
    for kind in results["correctness"]["kinds"]:
        assert {r["method"] for r in rows if r["kind"] == kind} == methods, kind
    for row in rows:
        assert "checks" in row, row  # a row that crashed before its checks would only carry "error"
        assert set(row["checks"]) - {"errors"} == {
            "identity",
            "merged_eq_unmerged",
            "finite_grads",
            "export",
            "autocast_fp32",
        }, row

    throughput = results["throughput"]
    assert throughput["timings_meaningful"] is False
    configs = {r["config"] for r in throughput["rows"]}
    assert len(configs) == 7 and any("QLoRA" in c for c in configs)
    assert all(r.get("tokens_per_s") for r in throughput["rows"]), throughput["rows"]

    newton = results["newton_schulz"]["rows"]
    assert {r["method"] for r in newton} >= {"keller", "polar_express", "turbo"}
    assert all(r.get("ms_median") for r in newton), newton

    text = (out / "gpu_check.md").read_text()
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "DRY RUN"):
        assert heading in text
