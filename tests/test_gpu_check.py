"""CI runs the GPU check's CPU mode: every part of the script (correctness, timing, server) runs
and writes its report."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_cpu_mode_writes_its_report(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu", "--out", str(tmp_path),
                           "--server-duration", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and len(report["correctness"]) == 8
    assert all(c["fp32_equal_cpu"] for c in report["correctness"])
    assert {c["batch"] for c in report["speed"]} == {1, 4} and all(c["images_per_s"] > 0 for c in report["speed"])
    assert [r["concurrency"] for r in report["server"]["runs"]] == [1, 4]
    assert all(set(r["statuses"]) == {"200"} for r in report["server"]["runs"])
    assert "## Correctness" in (tmp_path / "gpu_check.md").read_text()
