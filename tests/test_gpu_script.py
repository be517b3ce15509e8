"""benchmarks/gpu.sh, the one-shot GPU check, in its CPU dry mode (`--cpu`): every section runs (tiny shapes),
the summary table names each with its status, and a section that fails does not stop the ones after it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "check", "perlayer", "step", "fsdp2")


def run_script(out: Path, **env: str) -> tuple[int, str, dict[str, tuple[str, str]]]:
    """(exit status, output, {section: (status, key figures)} from the summary table)."""
    full_env = dict(os.environ, **env)
    full_env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + os.environ["PYTHONPATH"]
                                                 if os.environ.get("PYTHONPATH") else "")
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--cpu", str(out)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert "== summary" in proc.stdout, output[-6000:]
    table = proc.stdout.split("== summary", 1)[1].splitlines()
    rows = {}
    for line in table:
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 4 and cells[0] in SECTIONS:
            rows[cells[0]] = (cells[1], cells[3])
    return proc.returncode, output, rows


@pytest.mark.integration
def test_gpu_script_dry_run(tmp_path):
    out = tmp_path / "gpu"
    rc, output, rows = run_script(out)
    assert rc == 0, output[-6000:]
    assert set(rows) == set(SECTIONS), output[-3000:]
    for name in ("env", "check", "perlayer", "step"):
        assert rows[name][0] == "ok", (name, rows[name], output[-6000:])
    assert rows["fsdp2"][0] == "skipped"
    check = json.loads((out / "check.json").read_text())
    assert check["summary"]["failed"] == 0 and check["summary"]["cases"] >= 48
    assert {c["precision"] for c in check["cases"]} == {"fp32", "bf16-autocast", "bf16"}
    assert {(c["source"], c["forward"]) for c in check["cases"]} == {("current", "sparse"), ("current", "dense"),
                                                                     ("history", "sparse")}
    assert "cases ok" in rows["check"][1]
    for name in ("perlayer", "step"):
        bench = json.loads((out / f"{name}.json").read_text())
        labels = {(r["source"], r["forward"], r["rate"]) for r in bench["results"]}
        assert {("current", "sparse", 0.5), ("current", "dense", 0.5), ("history", "sparse", 0.5)} <= labels
        assert "rate 0.5:" in rows[name][1] and "history" in rows[name][1]
        assert (out / f"{name}.png").is_file()
    for f in ("env.txt", "env.json", "check.txt", "perlayer.txt", "step.txt", "fsdp2.txt", "sections.tsv",
              "summary.txt"):
        assert (out / f).is_file(), f
    assert "section" in (out / "summary.txt").read_text()


@pytest.mark.integration
def test_gpu_script_goes_on_past_a_failed_section(tmp_path):
    out = tmp_path / "gpu"
    rc, output, rows = run_script(out, SATLM_GPU_FAIL_SECTION="check,perlayer")
    assert rc != 0
    assert set(rows) == set(SECTIONS), output[-3000:]
    assert rows["check"][0] == rows["perlayer"][0] == "FAIL"
    assert "on purpose" in rows["perlayer"][1]
    assert rows["env"][0] == rows["step"][0] == "ok", output[-6000:]  # step ran after the failures
    assert rows["fsdp2"][0] == "skipped"
    assert (out / "step.json").is_file() and not (out / "perlayer.json").exists()


def test_summary_reads_the_step_targets():
    """The step row says whether the whole-step targets (r=0.5, forward sparse: current >= 1.45x, history >= 1.8x,
    efficiency >= 0.85) are met, and names each one missed."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_summary import step_targets

    def row(source, speedup, eff, forward="sparse", rate=0.5):
        return {"source": source, "forward": forward, "rate": rate, "speedup": speedup, "efficiency": eff}

    met = {"results": [row("current", 1.5, 0.9), row("history", 1.85, 0.86), row("current", 1.0, 0.5, "dense"),
                       row("history", 1.0, 0.5, rate=0.25)]}
    assert step_targets(met) == "targets met"
    missed = step_targets({"results": [row("current", 1.5, 0.8), row("history", 1.79, 0.9)]})
    assert missed.startswith("targets MISSED") and "current 1.50x/0.80" in missed and "history 1.79x" in missed
    assert step_targets({"results": []}) == "targets: no rows"
