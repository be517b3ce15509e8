"""Memory does not grow with steps: 300 tiny SAT steps (history statistics, a metrics record every step) with
the resident set size sampled at steps 100, 200 and 300, in a fresh process so nothing else moves it.

What legitimately grows per logged step is one entry in the Trainer's state.log_history (a small dict,
transformers' own) and 16 bytes in RunRecorder (the loss and tokens/s it summarises; the records themselves
are only on disk): ~0.27 MiB from step 100 to 300 was measured when the recorder still kept every record. The bound, 2 MiB, is ~10 KB a step: a leak of anything tensor-sized (activations, per-step scores or
kept indices, a graph kept alive) grows faster than that and fails it.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STEPS, SAMPLE_AT = 300, (100, 200, 300)
MAX_GROWTH_MIB = 2.0  # RSS from step 100 to 300; the records above account for ~0.27 MiB


def rss_bytes() -> int:
    """Resident set size now (not the peak): /proc/self/statm, field 2, in pages."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _train(root: Path) -> dict:
    """Runs in the child process: the tiny model, history SAT, logging every step; RSS at SAMPLE_AT."""
    import torch
    from tiny_run import make_model_dir, write_data
    from transformers import TrainerCallback

    from satlm.app.train import run_train
    from satlm.app.run_config import load_run_config

    torch.set_num_threads(1)  # tensors this small gain nothing from threads, and other tests may share the cores
    samples: dict[int, int] = {}
    sizes: dict[str, int] = {}

    class Sample(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in SAMPLE_AT:
                gc.collect()
                samples[state.global_step] = rss_bytes()
                sizes["log_history"] = len(state.log_history)

    model_dir, data = make_model_dir(root / "model"), write_data(root / "data")
    cfg = load_run_config(None, [
        "task=cpt", f"model={model_dir}", f"output_dir={root / 'run'}", f"max_steps={STEPS}", "batch_size=2",
        "seq_len=16", "lr=1e-3", "warmup=0", "save_steps=0", "logging_steps=1", "eval_steps=0",
        "precision=fp32", "progress=false", "tensorboard=false", f"data.train={data['cpt_train']}",
        f"data.eval={data['cpt_eval']}", "data.max_eval_samples=2", "sat.source=history", "sat.schedule=constant",
        "sat.omission_rate=0.5",
    ])
    run_train(cfg, callbacks=[Sample()], quiet=True)
    metrics = (root / "run" / "metrics.jsonl").read_text().splitlines()
    return {"rss": samples, "metrics_lines": len(metrics), **sizes}


@pytest.mark.integration
def test_rss_stays_flat_over_300_steps(tmp_path):
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=tests, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rss = {int(k): v for k, v in result["rss"].items()}
    assert sorted(rss) == list(SAMPLE_AT) and result["metrics_lines"] == STEPS  # it logged every step
    growth = [(rss[b] - rss[a]) / 2**20 for a, b in zip(SAMPLE_AT, SAMPLE_AT[1:])]
    total = (rss[SAMPLE_AT[-1]] - rss[SAMPLE_AT[0]]) / 2**20
    assert total < MAX_GROWTH_MIB, f"RSS grew {total:.2f} MiB from step 100 to 300 ({growth} MiB per 100 steps)"


if __name__ == "__main__":
    print(json.dumps(_train(Path(sys.argv[1]))))
