"""Multi-process SAT on CPU: 2 processes launched through torchrun (gloo, loopback only), tiny models.

Each launch runs tests/dist_worker.py or `satlm train` on 2 ranks; the single-process references run in
this process. What must hold: every rank keeps the same units at every step; 2 ranks with batch
b train exactly as 1 rank with batch 2b (importance over the union of the ranks' tokens); a 2-rank run
stopped and resumed continues exactly; FSDP shards the parameters the sparse ops slice.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import run_overrides, tiny_data, tiny_model_dir  # noqa: F401  (fixtures)

import dist_worker as W
from satlm import distributed
from satlm.app.train import run_train
from satlm.app.run_config import load_run_config

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("dist_worker.py")
KEPT = {"attn": 2, "mlp": 64}  # omission rate 0.5 of 4 heads and of 128 channels
LAUNCH_TIMEOUT = 300  # seconds; a launch takes ~10 s on 2 cores: this only stops a hang


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2) -> str:
    """`python -m torch.distributed.run --nproc_per_node nproc ARGS` on this machine only; its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's peer connections on loopback too
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        lines = [line for line in output.splitlines() if not line.lstrip().startswith("frame #")]  # C++ frames
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n" + "\n".join(lines)[-8000:], pytrace=False)
    return output


def launch_api(out: Path, cases: list[str], batch: int = 2, pad: bool = False) -> tuple[dict, dict, dict]:
    """(rank 0's results, rank 1's results, rank 0's state dicts per case)."""
    args = [str(WORKER), "api", str(out), "--batch", str(batch), "--steps", "5"]
    args += ["--pad"] if pad else []
    for case in cases:
        args += ["--case", case]
    torchrun(*args)
    r0, r1 = (json.loads(W.rank_path(out, r).read_text()) for r in (0, 1))
    return r0, r1, torch.load(W.rank_path(out, 0, ".pt"), weights_only=True)


def reference(case: str, batch: int) -> tuple[dict, dict]:
    """The same case in this one process (no process group) with the whole global batch."""
    source, selection, metric = case.split(":")[:3]
    vocab = ":vocab" if "vocab" in case.split(":") else ""
    return W.train_case(f"{source}:{selection}:{metric}{vocab}", batch)


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * abs(b)


def assert_same_units(a: dict, b: dict, what: str) -> None:
    assert len(a["kept"]) == len(b["kept"]) == 5, what
    for step, (ka, kb) in enumerate(zip(a["kept"], b["kept"])):
        assert ka == kb, f"{what}: kept units differ at step {step}"


# -- (1) one selection across ranks ---------------------------------------------------------------------
UNIT_CASES = ["current:sample:l2", "history:sample:l2", "current:topk:output", "history:sample:l1",
              "current:sample:l2:ddp:noreduce"]


@pytest.fixture(scope="module")
def padded_run(tmp_path_factory):
    """2 ranks, different data and different numbers of real tokens per rank (right padding)."""
    return launch_api(tmp_path_factory.mktemp("units") / "units.json", UNIT_CASES, pad=True)


@pytest.mark.parametrize("case", [c for c in UNIT_CASES if "noreduce" not in c])
def test_ranks_keep_the_same_units_at_every_step(padded_run, case):
    r0, r1, _ = padded_run
    a, b = (next(c for c in r["cases"] if c["case"] == case) for r in (r0, r1))
    assert a["local_losses"] != b["local_losses"]  # the ranks trained on different data
    assert_same_units(a, b, case)
    for step in a["kept"]:
        for name, kept in step.items():
            assert kept is not None and len(kept) == KEPT[name.split(".")[1]], (name, kept)
    assert len({json.dumps(step["0.mlp"]) for step in a["kept"]}) > 1  # the selection moves between steps
    if case.startswith("history"):
        assert a["history"] == b["history"] and all(v is not None for v in a["history"][-1].values())


def test_without_the_score_all_reduce_ranks_would_diverge(padded_run):
    """The negative control: the check above fails when each rank ranks units by its own tokens only."""
    r0, r1, _ = padded_run
    a, b = (next(c for c in r["cases"] if c["case"].endswith("noreduce")) for r in (r0, r1))
    assert any(ka != kb for ka, kb in zip(a["kept"], b["kept"]))


def test_distributed_helpers_across_ranks(padded_run):
    r0, r1, _ = padded_run
    for rank, seen in enumerate((r0["helpers"], r1["helpers"])):
        assert (seen["rank"], seen["world_size"], seen["main"]) == (rank, 2, rank == 0)
        assert seen["broadcast"] == {"from": 0} and seen["on_main"] == 41
        assert seen["on_main_error"] == repr("raised on rank 0")  # rank 0's exception, raised on every rank
        assert seen["first_saw_marker"]  # rank 0 ran the block before rank 1


def test_distributed_helpers_do_nothing_in_one_process():
    assert (distributed.world_size(), distributed.rank(), distributed.is_main_process()) == (1, 0, True)
    distributed.barrier()
    assert distributed.broadcast_object([1, 2]) == [1, 2] and distributed.on_main_process(lambda: 7) == 7
    with distributed.main_process_first():
        pass
    scores = torch.tensor([3.0, 4.0])
    assert distributed.reduce_scores(scores, "l2") is scores


# -- (2) 2 ranks x batch b == 1 rank x batch 2b ---------------------------------------------------------
LOSS_CASES = ["current:topk:l2", "current:sample:l2", "history:topk:l2", "history:sample:l2", "current:topk:l2:ddp:vocab"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return launch_api(tmp_path_factory.mktemp("ddp") / "ddp.json", LOSS_CASES)


def assert_matches_one_rank(case: str, a: dict, state: dict | None) -> None:
    ref, ref_state = reference(case, batch=4)
    assert_same_units(a, ref, f"{case} vs 1 rank")
    for step, (x, y) in enumerate(zip(a["losses"], ref["losses"])):
        assert close(x, y), f"{case}: step {step} loss {x} on 2 ranks, {y} on 1 rank"
    initial = W.tiny_llama().state_dict()
    assert all((ref_state[k] - initial[k]).abs().max() > 1e-3 for k in initial)  # every weight trained
    if state is not None:  # the gradients matched too: SGD's final weights are those of 1 rank
        assert set(state) == set(ref_state)  # the plain architecture's names
        for key in ref_state:
            torch.testing.assert_close(state[key], ref_state[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", LOSS_CASES)
def test_ddp_two_ranks_match_one_rank_with_twice_the_batch(ddp_run, case):
    r0, r1, states = ddp_run
    a, b = (next(c for c in r["cases"] if c["case"] == case) for r in (r0, r1))
    assert a["losses"] == b["losses"]
    assert_same_units(a, b, case)
    assert_matches_one_rank(case, a, states[case])


# -- `satlm train` under torchrun: batch, resume --------------------------------------------------------
def recipe_config(model_dir: Path, data: dict, out: Path, batch_size: int, **extra):
    """8 steps of 2 micro-batches, the ladder schedule moving at step 4, history statistics, checkpoints."""
    extra = {"max_steps": 8, "save_steps": 4, "grad_accum": 2, "sat.schedule": "ladder", "sat.rungs": 2,
             "sat.source": "history", "sat.selection": "sample", "batch_size": batch_size, **extra}
    return load_run_config(None, run_overrides(model_dir, data, out, **extra))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_two_ranks(tmp_path_factory, tiny_model_dir, tiny_data):
    """`satlm train CONFIG` under torchrun, 2 ranks x batch 2, uninterrupted."""
    root = tmp_path_factory.mktemp("recipe")
    cfg = recipe_config(tiny_model_dir, tiny_data, root / "straight", batch_size=2)
    config = root / "run.yaml"
    config.write_text(cfg.to_yaml())
    # overwrite=true: a rank that reaches the output-dir check after rank 0 began writing must not refuse
    torchrun("-m", "satlm.cli", "train", str(config), "overwrite=true")
    return config, root / "straight"


def test_satlm_train_under_torchrun_matches_one_process(straight_two_ranks, tmp_path, tiny_model_dir, tiny_data):
    _, out = straight_two_ranks
    single = run_train(recipe_config(tiny_model_dir, tiny_data, tmp_path / "one", batch_size=4), quiet=True)
    a, b = records(out), records(tmp_path / "one")
    assert [r["step"] for r in a] == list(range(1, 9))  # one writer: no line twice
    assert [r["mlp_omission_rate"] for r in a] == [0.5] * 4 + [0.25] * 4
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b] == [s * 2 * 4 * 32 for s in range(1, 9)]
    for ra, rb in zip(a, b):
        assert close(ra["loss"], rb["loss"]), (ra["step"], ra["loss"], rb["loss"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and math.isclose(summary["eval_loss"], single["eval_loss"], rel_tol=1e-5)
    assert (out / "checkpoint-4" / "sat_state.pt").is_file() and (out / "final" / "model.safetensors").is_file()


def test_resume_under_two_ranks_is_exact(straight_two_ranks, tmp_path):
    config, straight = straight_two_ranks
    out = tmp_path / "resumed"
    torchrun(str(WORKER), "recipe", str(out), str(config), "overwrite=true", "--stop-at", "4")
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4] and not (out / "final").exists()
    assert {p.name for p in (out / "checkpoint-4").glob("rng_state_*.pth")} == {"rng_state_0.pth",
                                                                                 "rng_state_1.pth"}
    torchrun("-m", "satlm.cli", "train", str(config), f"output_dir={out}", "--resume")

    a, b = records(straight), records(out)
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["mlp_omission_rate"] for r in b] == [0.5] * 4 + [0.25] * 4  # the schedule moved on after resume
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), ra["step"]
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (straight, out))
    assert sb["eval_loss"] == pytest.approx(sa["eval_loss"], abs=1e-5) and sb["tokens"] == sa["tokens"]


# -- FSDP ----------------------------------------------------------------------------------------------
# FSDP2 (the Trainer's FSDP in transformers 5) and FSDP1 both train SAT exactly. Their state dicts: a SAT
# wrapper shares its base module's children and parameters, so every name is the plain model's and FSDP2's
# full state dict (torch.distributed.checkpoint, as accelerate saves it) must work; FSDP1's is not checked.
FSDP_CASES = ["current:sample:l2:fsdp2", "history:topk:l2:accelerate-fsdp2", "current:topk:l2:fsdp1",
              "history:sample:l2:fsdp1-orig"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    return launch_api(tmp_path_factory.mktemp("fsdp") / "fsdp.json", FSDP_CASES)


@pytest.mark.parametrize("case", FSDP_CASES)
def test_fsdp_shards_and_trains_as_one_rank(fsdp_run, case):
    """The sparse ops slice the unsharded parameters inside forward; FSDP reduce-scatters their gradients."""
    r0, r1, states = fsdp_run
    a, b = (next(c for c in r["cases"] if c["case"] == case) for r in (r0, r1))
    held = a["sharding"]
    assert held["local_numel"] < sum(p.numel() for p in W.tiny_llama().parameters())  # each rank holds a shard
    if case.endswith("fsdp2"):
        assert held["dtensors"] == held["params"]  # FSDP2: every parameter is a DTensor
    elif case.endswith("fsdp1"):
        assert held["flat"] == held["params"]  # FSDP1 without use_orig_params: flat parameters only
    assert a["losses"] == b["losses"]
    assert_same_units(a, b, case)
    error = a.get("state_dict_error")
    assert error is None, error
    assert_matches_one_rank(case, a, states.get(case))


def test_tokenized_once_under_torchrun_and_read_on_resume(tmp_path, tiny_model_dir, tiny_data):
    """Two ranks build the tokenized cache once (one process tokenizes, the other waits and memory-maps it);
    the resumed launch reads it and tokenizes nothing."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    cfg = recipe_config(tiny_model_dir, tiny_data, out, batch_size=2, **{"data.cache_dir": str(cache)})
    config = tmp_path / "run.yaml"
    config.write_text(cfg.to_yaml())
    torchrun(str(WORKER), "recipe", str(out), str(config), "overwrite=true", "--stop-at", "4")
    log = cache / "tokenized" / "builds.log"
    assert len(log.read_text().splitlines()) == 1
    torchrun("-m", "satlm.cli", "train", str(config), f"output_dir={out}", "--resume")
    assert len(log.read_text().splitlines()) == 1 and [r["step"] for r in records(out)] == list(range(1, 9))
