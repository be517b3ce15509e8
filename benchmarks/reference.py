"""The masked dense reference, self-contained: torch, transformers and satlm's public API only.

One reference for the tests (tests/ import it from here) and the GPU check (benchmarks/gpu_check.py,
fsdp_check.py). Nothing here imports pytest or anything from tests/, so that `benchmarks/gpu.sh` runs from a
fresh clone with only `PYTHONPATH=src` and the dependencies pyproject.toml requires. The reference is written
independently of satlm's internals:

* the plain Hugging Face model runs (a causal LM or its bare *Model; a peft model's inner model), with a forward
  hook on every decoder layer's `self_attn.o_proj` and its MLP's output projection, found by name (`down_proj`,
  or `c_proj` as in Starcoder2; an MLP without one, a mixture of experts, is left as it is);
* at each hook the units are ranked by the L2 norm of their activations over the non-padding tokens (the
  batch's 2-D attention_mask; every token without one), a KV group by the sum of its heads' norms, and the
  top-k kept, or the kept set is given;
* forward="sparse": the projection runs on its input with the omitted units zeroed (MLP channels of the
  down projection's input; heads = blocks of head_dim columns of the o_proj input);
* forward="dense": the projection returns `f(h*m) + (f(h) - f(h*m)).detach()`: the exact dense value, with the
  gradient of the kept units only (none through an omitted unit, none on its weight columns);
* f(h*m) is the projection module's own forward (a LoRA layer's base and adapter together), run from the
  random state its own call started from, so that a dropout inside it draws the same mask.

SAT's kept sets are read back from `satlm.sat_state(model)["layers"]` (entries "attn"/"mlp" with "kept",
None meaning every unit kept).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

import satlm

VOCAB = 128


def tiny_llama(*, heads: int = 8, kv_heads: int = 2, hidden: int = 128, inter: int = 256, layers: int = 2,
               vocab: int = VOCAB, attn: str = "sdpa", seed: int = 0):
    """A tiny LlamaForCausalLM from a LlamaConfig (no download), fp32 on the CPU, in train mode.

    HF's small-std init makes every unit look alike; each weight matrix's rows are scaled by factors in
    [0.2, 3] so that importance scores are well separated (few near-ties, even in bf16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=False, use_cache=False)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.empty(p.shape[0], 1).uniform_(0.2, 3.0))
    return model.train()


def make_batch(*, vocab: int = VOCAB, b: int = 3, t: int = 64, pad: bool = True, seed: int = 1,
               device: str | torch.device = "cpu") -> dict:
    """input_ids and labels (B, T); with pad=True also a 2-D attention_mask with left padding on row 1 and right
    padding on row 2 (labels -100 there). pad=False: no attention_mask at all (HF's is_causal SDPA path)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    data = {"input_ids": ids, "labels": ids.clone()}
    if pad:
        mask = torch.ones(b, t, dtype=torch.long)
        mask[1 % b, : max(1, t // 8)] = 0  # left padding
        mask[2 % b, -max(1, t // 10):] = 0  # right padding
        data["attention_mask"] = mask
        data["labels"] = ids.masked_fill(mask == 0, -100)
    return {k: v.to(device) for k, v in data.items()}


def keep(n: int, rate: float) -> int:
    """Units kept out of n at omission rate `rate` (round half up, at least one)."""
    return max(1, math.floor((1 - rate) * n + 0.5))


def plain_name(name: str) -> str:
    """A parameter's name without a `base_layer.` that a SAT wrapper may add."""
    return re.sub(r"\.(self_attn|mlp)\.base_layer\.", r".\1.", name)


def grads_of(model) -> dict:
    return {plain_name(n): p.grad.detach().clone() if p.grad is not None else None
            for n, p in model.named_parameters()}


def rel_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def group_heads(units, unit: str, n_heads: int, n_kv: int) -> list[int]:
    """The query heads of the kept attention units (heads, or KV groups of n_heads // n_kv heads)."""
    if unit == "kv_group":
        rep = n_heads // n_kv
        return [g * rep + j for g in units for j in range(rep)]
    return list(units)


def autocast_ctx(device: str | torch.device, dtype: torch.dtype | None):
    """torch.autocast on the device in `dtype` (None: no autocast)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@dataclass
class Step:
    loss: torch.Tensor
    grads: dict
    kept: dict  # (layer, "mlp" | "attn") -> sorted kept unit indices
    scores: dict = field(default_factory=dict)  # (layer, comp) -> float64 scores as the reference saw them


def decoder_layers(model):
    """The decoder layers of a causal LM or of its bare *Model (`base_model` is the bare model of either)."""
    return getattr(model, "base_model", model).layers


def mlp_out_proj(layer):
    """The MLP's output projection (down_proj; c_proj in Starcoder2), or None where the MLP has none (a mixture
    of experts keeps its projections inside the experts)."""
    mlp = getattr(layer, "mlp", None)
    for name in ("down_proj", "c_proj"):
        mod = getattr(mlp, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    return None


def reference_step(model, data: dict, rate: float | Callable[[int, str], float | None] | None = None,
                   unit: str = "head", forward: str = "sparse", kept: dict | None = None,
                   autocast: torch.dtype | None = None, *, attn_rate: float | None = None,
                   rows: torch.Tensor | None = None,
                   weights: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> Step:
    """Loss, gradients, kept sets and scores of the masked dense reference on the plain HF `model` (which it
    runs forward and backward; its gradients are cleared first).

    Units: `kept[(layer, comp)]` when kept is given, else the top-k by L2 over non-padding tokens at `rate`
    (heads or KV groups at `attn_rate` when given). rate may also be a function (layer, comp) -> rate, where
    None leaves that projection as it is. rows (B, T): 1 in the rows the omission applies to (the others keep
    every unit), which are also the only rows scored. Scores are recorded either way (for the near-tie report).
    weights(layer, scores) -> (f,): with forward="dense", the MLP's kept channels' gradients are multiplied by
    these (the masked input h*m of the cut projection becomes h*m*w; its value stays the dense one).
    The loss is the model's, or for a bare model (no LM head) the mean square of its last hidden state."""
    if forward not in ("sparse", "dense"):
        raise ValueError(f"forward={forward!r}")
    if rate is None and kept is None:
        raise ValueError("reference_step needs a rate or the kept sets")
    model.zero_grad(set_to_none=True)
    ids = data["input_ids"]
    mask2d = data.get("attention_mask")
    token_mask = (mask2d if mask2d is not None else torch.ones_like(ids)).to(torch.float64)
    if rows is not None:
        rows = rows.to(device=ids.device, dtype=torch.float64)
        token_mask = token_mask * rows
    chosen: dict = {}
    scores: dict = {}
    rng: dict = {}  # projection -> the CPU random state its call started from
    hooks = []

    def choose(i, comp, s):
        """The kept units of layer i's comp from their scores s, or None: that projection is left as it is."""
        scores[(i, comp)] = s.cpu()
        if kept is not None:
            units = sorted(kept[(i, comp)])
        else:
            r = rate(i, comp) if callable(rate) else attn_rate if comp == "attn" and attn_rate is not None else rate
            if r is None:
                return None
            units = sorted(s.topk(keep(s.numel(), r)).indices.tolist())
        chosen[(i, comp)] = units
        return units

    def remember_rng(mod, args):
        rng[mod] = torch.get_rng_state()

    def cut(mod, h, m, output):
        """mod(h) cut to the kept input features m (1 kept, 0 omitted), in the rows the omission applies to."""
        if rows is not None:
            m = 1 - rows.to(h.dtype)[..., None] * (1 - m)  # (B, T, features): every feature kept in the others
        torch.set_rng_state(rng[mod])  # the dropout mask of mod's own call (peft's LoRA dropout), drawn again
        part = mod.forward(h * m)  # (forward, not mod(...): that would run these hooks again)
        return part if forward == "sparse" else part + (output - part).detach()

    for i, layer in enumerate(decoder_layers(model)):
        cfg = layer.self_attn.config
        n_h, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads

        def mlp_hook(mod, args, output, i=i):
            (h,) = args  # (B, T, f): act(gate) * up, the down projection's input
            s = ((h.detach().double() ** 2) * token_mask[..., None]).sum((0, 1)).sqrt()
            units = choose(i, "mlp", s)
            if units is None:
                return None
            m = torch.zeros(h.shape[-1], dtype=h.dtype, device=h.device)
            m[units] = 1
            if weights is not None:
                m = m * weights(i, s).to(device=h.device, dtype=h.dtype)
            return cut(mod, h, m, output)

        def attn_hook(mod, args, output, i=i, n_h=n_h, n_kv=n_kv):
            (o,) = args  # (B, T, H*hd): per-head attention outputs, head-major columns
            oh = o.detach().view(*o.shape[:2], n_h, -1)
            s = ((oh.double() ** 2) * token_mask[..., None, None]).sum((0, 1, 3)).sqrt()
            if unit == "kv_group":
                s = s.view(n_kv, -1).sum(1)  # a group's score: the sum of its heads' norms
            units = choose(i, "attn", s)
            if units is None:
                return None
            m = torch.zeros(n_h, oh.shape[-1], dtype=o.dtype, device=o.device)
            m[group_heads(units, unit, n_h, n_kv)] = 1
            return cut(mod, o, m.reshape(-1), output)

        for mod, hook in ((mlp_out_proj(layer), mlp_hook), (layer.self_attn.o_proj, attn_hook)):
            if mod is not None:
                hooks.append(mod.register_forward_pre_hook(remember_rng))
                hooks.append(mod.register_forward_hook(hook))
    try:
        with autocast_ctx(ids.device, autocast):
            out = model(**data)
            loss = out.loss if getattr(out, "loss", None) is not None else out.last_hidden_state.square().mean()
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return Step(loss.detach(), grads_of(model), chosen, scores)


def read_kept(model) -> dict:
    kept = {}
    for entry in satlm.sat_state(model)["layers"]:
        for comp in ("mlp", "attn"):
            e = entry[comp]  # None: the layer ran dense, every unit kept
            kept[(entry["layer"], comp)] = sorted(e["kept"]) if e["kept"] is not None else list(range(e["n_units"]))
    return kept


def sat_step(model, data: dict, config, autocast: torch.dtype | None = None, seed_data: dict | None = None
             ) -> Step:
    """apply_sat(model, config), [one seeding step on seed_data (history), gradients dropped], then one step on
    data: its loss, gradients and kept sets. Leaves SAT applied."""
    satlm.apply_sat(model, config)
    device = data["input_ids"].device
    if seed_data is not None:
        with autocast_ctx(device, autocast):
            seed_loss = model(**seed_data).loss
        seed_loss.backward()
    model.zero_grad(set_to_none=True)
    with autocast_ctx(device, autocast):
        loss = model(**data).loss
    loss.backward()
    return Step(loss.detach(), grads_of(model), read_kept(model))


def tie_gap(scores: dict, kept: dict) -> float:
    """How far `kept` is from the top-k of `scores`, over all (layer, comp): the largest relative amount by which
    an omitted unit's score exceeds a kept unit's (0 when every kept set is a top-k)."""
    worst = 0.0
    for key, units in kept.items():
        s = scores.get(key)
        if s is None or len(units) >= s.numel():
            continue
        inside = torch.zeros(s.numel(), dtype=torch.bool)
        inside[list(units)] = True
        lo, hi = s[inside].min().item(), s[~inside].max().item()
        if hi > lo:
            worst = max(worst, (hi - lo) / max(abs(hi), 1e-30))
    return worst


def zero_off_slices(grads: dict, kept: dict, unit: str, n_heads: int, n_kv: int, head_dim: int) -> bool:
    """Every omitted unit's slice of gate/up rows, down columns, q rows and o columns has exactly zero gradient."""
    for (i, comp), units in kept.items():
        if comp == "mlp":
            p = f"model.layers.{i}.mlp."
            n = grads[p + "down_proj.weight"].shape[1]
            off = sorted(set(range(n)) - set(units))
            if off and not (grads[p + "down_proj.weight"][:, off].abs().max() == 0
                            and grads[p + "gate_proj.weight"][off].abs().max() == 0
                            and grads[p + "up_proj.weight"][off].abs().max() == 0):
                return False
        else:
            p = f"model.layers.{i}.self_attn."
            heads = set(group_heads(units, unit, n_heads, n_kv))
            cols = [h * head_dim + j for h in range(n_heads) if h not in heads for j in range(head_dim)]
            if cols and not (grads[p + "o_proj.weight"][:, cols].abs().max() == 0
                             and grads[p + "q_proj.weight"][cols].abs().max() == 0):
                return False
    return True


def max_grad_err(grads: dict, ref_grads: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name, g in ref_grads.items():
        e = rel_err(grads.get(name), g)
        if e > worst or not where:
            worst, where = e, name
    return worst, where


def check_case(base, data: dict, *, rate: float, unit: str, source: str, forward: str, tol: float,
               weights: torch.dtype = torch.float32, autocast: torch.dtype | None = None,
               seed_data: dict | None = None) -> dict:
    """One case: SAT (topk, L2, constant schedule) against the reference. `base` is a plain fp32 model (copied,
    never modified). Returns a JSON-able record with ok, the errors and whether the kept sets agreed.

    current: the reference picks its own top-k; when SAT's kept sets differ (bf16 near-ties) SAT is compared with
    the reference masked with SAT's own kept sets, and the tie gap (how much better, relatively, the reference
    scored a unit SAT omitted than one SAT kept) must be within tol.
    history: one seeding step on seed_data first; with topk and no exploration bonus the kept sets of the second
    step are the top-k of the seeding step's scores, which the reference's seeding step (current, sparse, on
    seed_data) gives independently; the second step is compared with the reference masked with SAT's kept sets.
    """
    device = data["input_ids"].device

    def fresh():
        return copy.deepcopy(base).to(device=device, dtype=weights)

    cfg_ = base.config
    n_h, n_kv = cfg_.num_attention_heads, cfg_.num_key_value_heads
    hd = cfg_.hidden_size // n_h
    # Every field the check depends on is explicit (the defaults may change: heads kept, forward auto, ...).
    config = satlm.SATConfig(omission_rate=rate, attn_omission_rate=rate, mlp_omission_rate=rate,
                             schedule="constant", selection="topk", metric="l2", source=source, forward=forward,
                             attn_unit=unit, history_exploration=0.0)
    sat = sat_step(fresh(), data, config, autocast, seed_data if source == "history" else None)
    if source == "history":
        expected = reference_step(fresh(), seed_data, rate, unit, "sparse", autocast=autocast).kept
        same = sat.kept == expected
        ref = reference_step(fresh(), data, rate, unit, "sparse", kept=sat.kept, autocast=autocast)
        gap = 0.0 if same else tie_gap(
            reference_step(fresh(), seed_data, rate, unit, "sparse", kept=sat.kept, autocast=autocast).scores,
            sat.kept)
    else:
        ref = reference_step(fresh(), data, rate, unit, forward, autocast=autocast)
        expected = ref.kept
        same = sat.kept == expected
        gap = 0.0
        if not same:
            ref = reference_step(fresh(), data, rate, unit, forward, kept=sat.kept, autocast=autocast)
            gap = tie_gap(ref.scores, sat.kept)
    differing = sum(max(len(set(v) - set(expected.get(k, []))), len(set(expected.get(k, [])) - set(v)))
                    for k, v in sat.kept.items())
    # A near-tie swaps units; it never changes how many are kept (a different count is a real difference).
    same_counts = sat.kept.keys() == expected.keys() and all(len(v) == len(expected[k]) for k, v in sat.kept.items())
    loss_err = abs(sat.loss.item() - ref.loss.item()) / max(abs(ref.loss.item()), 1e-30)
    grad_err, worst_param = max_grad_err(sat.grads, ref.grads)
    zero_off = zero_off_slices(sat.grads, sat.kept, unit, n_h, n_kv, hd)
    near_tie = (not same) and same_counts and gap <= tol
    ok = (loss_err <= tol and grad_err <= tol and zero_off and (same or near_tie)
          and math.isfinite(sat.loss.item()))
    return {"ok": ok, "loss": sat.loss.item(), "ref_loss": ref.loss.item(), "loss_rel_err": loss_err,
            "grad_rel_err": grad_err, "worst_param": worst_param, "same_kept": same, "kept_units_differing": differing,
            "same_kept_counts": same_counts,
            "tie_gap": gap, "near_tie": near_tie, "compared_with": "reference's own kept sets" if same and source ==
            "current" else "reference masked with SAT's kept sets", "zero_grad_on_omitted": zero_off}
