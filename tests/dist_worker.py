"""Worker of the multi-process tests (tests/test_distributed.py), run on every rank by
`python -m torch.distributed.run --nproc_per_node N tests/dist_worker.py ...`; in one process it is the
reference.

    dist_worker.py api OUT.json --batch B [--pad] [--steps 5] --case CASE [--case CASE ...]
        A training loop over the Python API: apply_sat, then DistributedDataParallel (or FSDP) and SGD
        with momentum, on a tiny Llama. Each step's global batch holds world * B sequences, identical in every process;
        rank r trains on rows r*B .. (r+1)*B - 1. CASE is `source:selection:metric[:wrap][:noreduce][:vocab]`,
        wrap one of ddp (default), fsdp2 (torch fully_shard per decoder layer and the root),
        accelerate-fsdp2 (accelerate's own FSDP2 wrapping, as the Trainer does it on GPUs), fsdp1,
        fsdp1-orig (FSDP1 flat parameters, without and with use_orig_params); noreduce turns the
        all-reduce of importance scores off (the negative control). Every rank writes OUT with `.rank<r>`
        before the suffix: per case and step the loss, each layer's kept units and history statistics;
        rank 0 also writes `.rank0.pt`: per case the full state dict after training.
    dist_worker.py recipe OUT_DIR [CONFIG.yaml] key=value ... [--stop-at N]
        The `satlm train` recipe (transformers.Trainer + SATCallback), stopped after step N when given,
        as an interrupted run would be.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import torch

VOCAB, SEQ, HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 128, 16, 64, 128, 4, 2, 2
WRAPS = ("ddp", "fsdp2", "accelerate-fsdp2", "fsdp1", "fsdp1-orig")


def tiny_llama(seed: int = 0):
    """2 layers, d=64, 4 query / 2 KV heads, f=128, vocab 128, fp32: the same weights in every process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                      use_cache=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # spread the scores apart (HF's small init makes every unit look alike)
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.empty(p.shape[0], 1).uniform_(0.2, 3.0))
    return model.train()


def global_batch(step: int, rows: int, pad: bool):
    """The step's global batch, the same in every process: ids, attention mask, labels, each (rows, SEQ)."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    mask = torch.ones(rows, SEQ, dtype=torch.long)
    if pad:  # right padding of different lengths: ranks hold different numbers of real tokens
        lengths = torch.randint(SEQ // 2, SEQ + 1, (rows,), generator=g)
        mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return ids, mask, ids.masked_fill(mask == 0, -100)


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_path(out: str | Path, rank: int, suffix: str | None = None) -> Path:
    p = Path(out)
    return p.with_name(f"{p.stem}.rank{rank}{suffix or p.suffix}")


def per_module(model, attr: str) -> dict[str, list | None]:
    from satlm.modeling.patch import _sat_modules

    out = {}
    for m in _sat_modules(model):
        value = getattr(m, attr)
        out[f"{m.sat_layer_idx}.{m.component}"] = value.tolist() if value is not None else None
    return out


def parse_case(case: str) -> tuple[str, str, str, str, bool]:
    parts = [p for p in case.split(":") if p != "vocab"]  # vocab: the output layer's rows omitted too
    source, selection, metric = parts[:3]
    wrap = parts[3] if len(parts) > 3 else "ddp"
    if wrap not in WRAPS:
        raise ValueError(f"case {case!r}: wrap must be one of {WRAPS}")
    return source, selection, metric, wrap, "noreduce" in parts[4:]


@contextlib.contextmanager
def scores_reduced(enabled: bool):
    """noreduce: every rank keeps the units its own tokens rank highest (what satlm must not do)."""
    from satlm.modeling import selector

    original = selector.reduce_scores
    if not enabled:
        selector.reduce_scores = lambda scores, metric="l2": scores
    try:
        yield
    finally:
        selector.reduce_scores = original


def wrap_model(model, wrap: str, world: int):
    """(the module to call, a description of how its parameters are held)."""
    if wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    if wrap == "accelerate-fsdp2":
        # accelerate enables FSDP only on accelerator backends (a CPU run of the Trainer falls back to DDP),
        # so call the function its Accelerator.prepare uses for FSDP2, with the few attributes it reads.
        import types

        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
        stub = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                     device=torch.device("cpu"),  # read by accelerate >= 1.16
                                     is_main_process=rank_world()[0] == 0)
        return fsdp2_prepare_model(stub, model)
    if wrap.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                        use_orig_params=wrap == "fsdp1-orig", device_id=torch.device("cpu"))
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(model)
    return model


def sharding(engine, wrap: str) -> dict:
    from torch.distributed.tensor import DTensor

    params = list(engine.parameters())
    return {"params": len(params), "dtensors": sum(isinstance(p, DTensor) for p in params),
            "flat": sum(bool(getattr(p, "_is_flat_param", False)) for p in params),
            "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)}


def full_state_dict(model, wrap: str):
    """The trained weights under the plain architecture's names, gathered as a checkpoint would be."""
    if wrap in ("fsdp2", "accelerate-fsdp2"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_case(case: str, batch: int, steps: int = 5, pad: bool = False) -> tuple[dict, dict | None]:
    """Train one case; returns (record, full state dict or None when gathering it failed)."""
    import torch.distributed as dist

    from conftest import sat_config
    from satlm import apply_sat

    source, selection, metric, wrap, noreduce = parse_case(case)
    rank, world = rank_world()
    model = tiny_llama()
    apply_sat(model, sat_config(omission_rate=0.5, schedule="constant", source=source, selection=selection,
                                metric=metric, history_exploration=2.0, seed=3,
                                vocab_omission_rate=0.5 if "vocab" in case.split(":") else 0.0))
    engine = wrap_model(model, wrap, world)
    # SGD: updates linear in the gradients, so the final weights compare as tightly as the gradients (Adam
    # would turn rounding noise in near-zero gradients into steps of size lr).
    opt = torch.optim.SGD(engine.parameters(), lr=0.5, momentum=0.9)
    record = {"case": case, "world": world, "sharding": sharding(engine, wrap), "losses": [],
              "local_losses": [], "kept": [], "history": []}
    with scores_reduced(not noreduce):
        for step in range(steps):
            ids, mask, labels = global_batch(step, batch * world, pad)
            rows = slice(rank * batch, (rank + 1) * batch)
            loss = engine(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mean = loss.detach().clone()
            if world > 1:  # the loss tests give every rank as many tokens: the mean of means is the global mean
                dist.all_reduce(mean)
                mean /= world
            record["local_losses"].append(loss.item())
            record["losses"].append(mean.item())
            record["kept"].append(per_module(model, "sat_last_kept"))
            record["history"].append(per_module(model, "sat_history"))
    state = None
    if not wrap.startswith("fsdp1"):  # FSDP1 state dicts of a SAT model fail (see FSDP_CASES in the test)
        try:
            state = full_state_dict(model, wrap)
        except Exception as e:  # noqa: BLE001 - reported to the test
            record["state_dict_error"] = f"{type(e).__name__}: {e}"
    return record, state


def check_helpers(out: Path) -> dict:
    """satlm.distributed's helpers, as every rank sees them."""
    from satlm import distributed as sd

    seen = {"rank": sd.rank(), "world_size": sd.world_size(), "main": sd.is_main_process()}
    seen["broadcast"] = sd.broadcast_object({"from": sd.rank()} if sd.is_main_process() else None)
    seen["on_main"] = sd.on_main_process(lambda: sd.rank() + 41)

    def fail():
        raise KeyError(f"raised on rank {sd.rank()}")

    try:
        sd.on_main_process(fail)
    except KeyError as e:
        seen["on_main_error"] = str(e)
    marker = out.with_name(out.stem + ".first")
    with sd.main_process_first():
        if sd.is_main_process():
            marker.write_text("rank 0 was here")
        seen["first_saw_marker"] = marker.is_file()
    sd.barrier()
    return seen


def run_api(args) -> None:
    rank, _ = rank_world()
    out = Path(args.out)
    records, states = [], {}
    for case in args.case:
        record, state = train_case(case, args.batch, args.steps, args.pad)
        records.append(record)
        if state is not None:
            states[case] = state
    result = {"helpers": check_helpers(out), "cases": records}
    rank_path(out, rank).write_text(json.dumps(result))
    if rank == 0:
        torch.save(states, rank_path(out, rank, ".pt"))


def run_recipe(args) -> None:
    from transformers import TrainerCallback

    from satlm.app.train import run_train
    from satlm.app.run_config import load_run_config

    class StopAt(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step == args.stop_at:
                control.should_training_stop = True

    cfg = load_run_config(args.overrides[0] if args.overrides and "=" not in args.overrides[0] else None,
                          [o for o in args.overrides if "=" in o] + [f"output_dir={args.out}"])
    run_train(cfg, callbacks=[StopAt()] if args.stop_at else [], quiet=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("api", "recipe"))
    parser.add_argument("out")
    parser.add_argument("overrides", nargs="*", help="recipe: [CONFIG.yaml] key=value ...")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--pad", action="store_true")
    parser.add_argument("--case", action="append", default=None)
    parser.add_argument("--stop-at", type=int, default=0)
    args = parser.parse_args(argv)
    args.case = args.case or ["current:sample:l2"]
    torch.set_num_threads(1)
    try:
        run_recipe(args) if args.mode == "recipe" else run_api(args)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
