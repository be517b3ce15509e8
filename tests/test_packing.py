"""SFT packing: whole examples per row, no attention across them, loss on the trained spans; SAT exact on packed
batches against the masked dense reference (importance over every token of the batch: there is no padding mask)."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import reference_step
from tiny_run import make_tokenizer, run_overrides, tiny_data, tiny_model_dir  # noqa: F401  (fixtures)

import satlm
from satlm.data import SFTCollator, build_datasets
from satlm.data.packing import PackedCollator, pack_examples
from satlm.app.run_config import load_run_config


def examples(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(5, 11, (1,), generator=g))
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        labels = [-100] * (length // 2) + ids[length // 2:]  # a prompt, then the trained response
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_rows_hold_whole_examples_and_restart_positions():
    rows = pack_examples(examples(), 20)
    assert sum(r["examples"] for r in rows) == 5 and all(len(r["input_ids"]) <= 20 for r in rows)
    row = rows[0]
    assert row["position_ids"][0] == 0 and row["position_ids"].count(0) == row["examples"]
    for r in rows:  # each example's first label is ignored
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert all(r["labels"][i] == -100 for i in starts)


def test_packed_batch_equals_the_padded_batch_for_a_plain_model():
    """The packed forward computes each example as alone: the same summed loss as a padded batch."""
    from conftest import tiny_model

    model = tiny_model(attn="sdpa").eval()
    ex = examples()
    packed = PackedCollator(0)(pack_examples(ex, 24))
    padded = SFTCollator(0)(ex)

    def summed(batch):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")

    with torch.no_grad():
        assert packed["input_ids"].shape[0] < len(ex)
        assert summed(packed).item() == pytest.approx(summed(padded).item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["current-sparse", "current-dense", "history-sparse"])
def test_sat_on_packed_batches_matches_the_reference(mode):
    from conftest import sat_config
    from family_models import family_model

    source, forward = mode.split("-")
    model = family_model("llama", heads=4, kv_heads=2)
    data = PackedCollator(0)(pack_examples(examples(8), 24))
    # a packed batch has no attention_mask (position_ids separate its examples): the reference scores every token
    cfg = sat_config(omission_rate=0.5, schedule="constant", selection="topk", source=source, forward=forward)
    if source == "current":
        ref = reference_step(copy.deepcopy(model), data, 0.5, "head", forward)
        satlm.apply_sat(model, cfg)
        loss = model(**data).loss
        loss.backward()
        kept = {(e["layer"], c): e[c]["kept"] for e in satlm.sat_state(model)["layers"] for c in ("attn", "mlp")}
        assert kept == ref.kept
        grads = {n: p.grad for n, p in model.named_parameters()}
    else:
        satlm.apply_sat(model, cfg)
        model(**PackedCollator(0)(pack_examples(examples(6, seed=3), 24))).loss.backward()
        model.zero_grad(set_to_none=True)
        loss = model(**data).loss
        loss.backward()
        kept = {(e["layer"], c): e[c]["kept"] for e in satlm.sat_state(model)["layers"] for c in ("attn", "mlp")}
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        satlm.remove_sat(model)
        model.zero_grad(set_to_none=True)
        ref = reference_step(model, data, kept=kept)
    assert abs(loss.item() - ref.loss.item()) <= 1e-9 * abs(ref.loss.item())
    for name, g in ref.grads.items():
        assert (grads[name] - g).norm() <= 1e-9 * g.norm() + 1e-13, name


def test_packing_config_builds_rows_and_keeps_eval_unpacked(tmp_path, tiny_model_dir, tiny_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = build_datasets(load_run_config(None, run_overrides(tiny_model_dir, tiny_data, tmp_path, task="sft",
                                                               seq_len=400)), tok)
    packed = build_datasets(load_run_config(None, run_overrides(tiny_model_dir, tiny_data, tmp_path, task="sft",
                                                                seq_len=400, **{"data.packing": True})), tok)
    assert len(packed.train) < len(plain.train) and packed.info["packed_examples"] == len(plain.train)
    assert packed.train.num_tokens() == plain.train.num_tokens()
    assert len(packed.eval) == len(plain.eval) and isinstance(packed.eval_collator, SFTCollator)
    batch = packed.collator([packed.train[0], packed.train[1]])
    assert "position_ids" in batch and "attention_mask" not in batch
    tokens = sum(sum(1 for x in packed.train[i]["labels"] if x != -100) for i in range(len(packed.train)))
    assert tokens == sum(sum(1 for x in plain.train[i]["labels"][1:] if x != -100) for i in range(len(plain.train)))
