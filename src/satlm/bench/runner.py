"""Dense against SAT, interleaved in one process: step times, FLOP ratios (the ideal) and memory.

Every variant trains the same model: SAT is applied once and each variant swaps in its own SATConfig
(dense runs inside `disable_sat`), so the variants share weights, optimizer and allocator state and are
timed round-robin, one full step each per round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import SATConfig
from ..core.ops import flash_cpu_available
from ..modeling.patch import _unwrap, apply_sat, disable_sat
from .settings import held, sat_variants


@dataclass
class Shape:
    hidden_size: int = 512
    intermediate_size: int = 1408
    heads: int = 8
    kv_heads: int = 8
    layers: int = 8
    vocab_size: int = 8192


PRESETS = {
    # Published shapes of the models the paper trains; use --layers to fit memory.
    "tinyllama-1.1b": Shape(2048, 5632, 32, 4, 22, 32000),
    "llama2-7b": Shape(4096, 11008, 32, 32, 32, 32000),
    "llama2-13b": Shape(5120, 13824, 40, 40, 40, 32000),
}


@dataclass
class Variant:
    name: str
    source: str | None  # None = dense
    rate: float
    forward: str = "auto"  # SATConfig.forward (auto: the library's, resolved per source)
    times: list[float] = field(default_factory=list)
    flops: int = 0
    peak_memory_bytes: int = 0
    bench: "Bench | None" = None  # a variant on another model (the kept-size dense models); None: the main one
    sat: SATConfig | None = None  # the SATConfig it ran with (set by Bench.variant); None: dense


def build_model(shape: Shape, model_path: str | None, dtype: torch.dtype, device: str, seq_len: int,
                attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if model_path:
        model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=dtype,
                                                     attn_implementation=attn_implementation)
    else:
        cfg = LlamaConfig(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                          num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                          num_hidden_layers=shape.layers, vocab_size=shape.vocab_size,
                          max_position_embeddings=max(seq_len, 2048), tie_word_embeddings=False, use_cache=False)
        cfg._attn_implementation = attn_implementation
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    return model.to(device).train()


def sdpa_flops(q, k, v) -> int:
    """Forward FLOPs of an SDPA kernel from the shapes (B, H, S_q, D), (B, H_kv, S_k, D), (B, H_kv, S_k, D_v): Q K^T
    and P V over every (query, key) pair of every query head. Grouped K/V (H_kv dividing H) cost what K/V copied
    per query head cost, as in PyTorch 2.13's formula (PyTorch 2.11's refuses grouped K/V)."""
    b, h, s_q, d = _sdpa_shapes(q, k, v)
    s_k, d_v = k[2], v[3]
    return 2 * b * h * s_q * s_k * (d + d_v)


def sdpa_backward_flops(grad_out, q, k, v) -> int:
    """Backward FLOPs of an SDPA kernel: the scores recomputed (d), dP = dO V^T (d_v), dV = P^T dO (d_v),
    dQ = dS K (d) and dK = dS^T Q (d): five matmuls over every (query, key) pair (PyTorch's formula)."""
    b, h, s_q, d = _sdpa_shapes(q, k, v)
    if tuple(grad_out[:3]) != (b, h, s_q):
        raise ValueError(f"sdpa backward: grad_out {tuple(grad_out)} against query {tuple(q)}")
    s_k, d_v = k[2], v[3]
    return 2 * b * h * s_q * s_k * (3 * d + 2 * d_v)


def _sdpa_shapes(q, k, v) -> tuple[int, int, int, int]:
    b, h, s_q, d = q
    if k[0] != b or v[0] != b or k[1] != v[1] or h % k[1] or k[3] != d or k[2] != v[2]:
        raise ValueError(f"sdpa: query {tuple(q)}, key {tuple(k)} and value {tuple(v)} do not fit")
    return b, h, s_q, d


# Every SDPA kernel a step can run: PyTorch's CPU flash kernel (which FlopCounterMode does not count by itself)
# and its CUDA flash, memory-efficient and cuDNN kernels (whose own formulas refuse grouped K/V before PyTorch
# 2.13). Each op's first tensors are q, k, v (forward) or grad_out, q, k, v (backward).
_SDPA_FORWARD = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
_SDPA_BACKWARD = tuple(f"{name}_backward" for name in _SDPA_FORWARD)


def sdpa_flop_mapping() -> dict:
    """FlopCounterMode's custom_mapping for every SDPA kernel this PyTorch has (satlm's formulas above)."""
    def forward(q, k, v, *args, out_shape=None, **kwargs) -> int:  # shapes, as FlopCounterMode passes them
        return sdpa_flops(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flops(grad_out, q, k, v)

    mapping = {}
    for names, fn in ((_SDPA_FORWARD, forward), (_SDPA_BACKWARD, backward)):
        for name in names:
            op = getattr(torch.ops.aten, name, None)
            if op is not None:
                mapping[op] = fn
    return mapping


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that counts every SDPA kernel with satlm's formulas (sdpa_flops, sdpa_backward_flops):
    forward Q K^T and P V over every (query, key) pair; backward five such matmuls (it recomputes the scores);
    grouped K/V as if copied per query head. The rest is PyTorch's own counting."""
    return FlopCounterMode(display=False, custom_mapping=sdpa_flop_mapping())


def kept_size_model(model, rate: float, attn_unit: str = "head"):
    """A dense model like `model` but of the size SAT keeps at `rate`: kept_count of the MLP channels and of
    the query heads, head size unchanged, everything else (width, layers, vocabulary) the same. With grouped
    KV heads, KV groups are kept in proportion (kept_count of the groups, their query heads all kept: the
    `kv_group` shape, which with attn_unit=head is the fewest groups the kept heads can touch). Its step time is
    what SAT would take with no overhead at all, at this machine's efficiency for dense models: the yardstick
    `satlm bench --kept-size` reports beside the FLOP ideal. Random weights; same dtype and device."""
    import copy

    from ..schedules import kept_count

    cfg = copy.deepcopy(model.config)
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rep = heads // kv
    kv_kept = kept_count(kv, rate) if rep > 1 or attn_unit == "kv_group" else kept_count(heads, rate)
    cfg.head_dim = head_dim
    cfg.intermediate_size = kept_count(cfg.intermediate_size, rate)
    # Set after construction: transformers' config check wants hidden_size % heads == 0, which a kept-size
    # model with an explicit head_dim does not need.
    cfg.num_key_value_heads = kv_kept
    cfg.num_attention_heads = kv_kept * rep if rep > 1 else kv_kept
    param = next(model.parameters())
    torch.manual_seed(0)
    kept = type(model)(cfg).to(device=param.device, dtype=param.dtype)
    kept.config.use_cache = False
    return kept.train()


def with_lora(model, r: int | None):
    """The model with a peft LoRA adapter of rank r on every linear of its decoder layers (alpha 2r, no dropout);
    unchanged when r is None. The base weights are frozen, as in LoRA fine-tuning."""
    if not r:
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():  # B away from zero, as after some training (the cost is the same)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Bench:
    """Holds the model, the data and the step function for whole-model or per-layer timing."""

    def __init__(self, model, *, per_layer: bool, batch_size: int, seq_len: int, device: str,
                 sat: SATConfig | None = None, compile: bool = False, **settings):
        """sat: the SATConfig every SAT variant starts from (default: the library's, SATConfig()); each variant
        sets its own rate, source and forward, and the bench holds the schedule (HELD). settings: SATConfig fields
        that replace sat's (attn_rate: attn_omission_rate, as before)."""
        self.model, self.per_layer, self.device = model, per_layer, device
        if "attn_rate" in settings:
            settings["attn_omission_rate"] = settings.pop("attn_rate")
        self.sat = held(dataclasses.replace(sat or SATConfig(), **settings))
        self._configs: dict[tuple, SATConfig] = {}
        seed = self.sat.seed
        apply_sat(model, self.sat)
        self.runtime = model.sat_runtime
        g = torch.Generator().manual_seed(seed)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(device)
        self.batch = {"input_ids": ids, "labels": ids}
        self.tokens = batch_size * seq_len
        hf = _unwrap(model)  # the HF model (inside a peft wrapper with --lora)
        if per_layer:
            self.layer = hf.model.layers[0]
            d = model.config.hidden_size
            dtype = next(model.parameters()).dtype
            self.x = torch.randn(batch_size, seq_len, d, generator=g).to(device=device, dtype=dtype)
            self.x.requires_grad_(True)
            pos = torch.arange(seq_len, device=device)[None].expand(batch_size, -1)
            self.pos_emb = hf.model.rotary_emb(self.x, pos)
            causal = torch.full((seq_len, seq_len), float("-inf"), device=device).triu(1)
            self.mask = causal.to(dtype)[None, None] if model.config._attn_implementation == "eager" else None
            # The layer's output gradient is fixed and given, so that no loss computation (elementwise work
            # outside the layer, the same for dense and SAT) is timed with the layer.
            self.grad_out = torch.randn(batch_size, seq_len, d, generator=g).to(device=device, dtype=dtype)
            self.optimizer = None
        else:
            self.layer = None
            fused = device.startswith("cuda") or device == "cpu"
            trainable = [p for p in model.parameters() if p.requires_grad]
            try:
                self.optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=fused)
            except (RuntimeError, TypeError):
                self.optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        # --compile: the timed steps call the compiled model (or layer); each variant compiles in its warm-up (one
        # graph per distinct kept count, so the limit is raised for the variants of one bench).
        self.compiled = None
        if compile:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self.compiled = torch.compile(self.layer if per_layer else model)

    @contextlib.contextmanager
    def variant(self, v: Variant):
        if v.source is None:
            with disable_sat(self.model):
                yield
            return
        cfg = self.runtime.config
        v.sat = self.config_for(v)
        self.runtime.config = v.sat
        self.runtime.set_step(0, None)
        try:
            yield
        finally:
            self.runtime.config = cfg

    def config_for(self, v: Variant) -> SATConfig:
        """The SATConfig of a SAT variant: the bench's, at the variant's rate, source and forward."""
        key = (v.rate, v.source, v.forward)
        if key not in self._configs:
            self._configs[key] = dataclasses.replace(self.sat, omission_rate=v.rate, source=v.source,
                                                     forward=v.forward)
        return self._configs[key]

    def forward_backward(self, compiled: bool = True) -> None:
        """One forward and backward; compiled (with --compile) unless told otherwise (FLOP and memory counts)."""
        use = compiled and self.compiled is not None
        if self.per_layer:
            self.runtime.begin_forward(None, torch.device(self.device))  # the layer alone has no model pre-hook
            out = (self.compiled if use else self.layer)(self.x, attention_mask=self.mask, position_embeddings=self.pos_emb)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(self.grad_out)
        else:
            (self.compiled if use else self.model)(**self.batch).loss.backward()

    def step(self) -> None:
        self.forward_backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)
            self.x.grad = None

    def timed_step(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self.step()
        _sync(self.device)
        return time.perf_counter() - t0

    def count_flops(self) -> int:
        """FLOPs of forward + backward (the optimizer has no matmuls), counted as the step runs them: the
        attention core with PyTorch's SDPA formulas (`flop_counter`), or where a kernel has no formula (the CPU
        flash kernel on a PyTorch without it) through eager attention."""
        cfg = self.model.config
        impl = cfg._attn_implementation
        swap = self.device == "cpu" and impl == "sdpa" and not flash_cpu_available()
        if swap:
            cfg._attn_implementation = "eager"
            saved_mask = getattr(self, "mask", None)
            if self.per_layer:
                seq = self.x.shape[1]
                self.mask = torch.full((seq, seq), float("-inf")).triu(1).to(self.x.dtype)[None, None]
        try:
            with flop_counter() as counter:
                self.forward_backward(compiled=False)
        finally:
            if swap:
                cfg._attn_implementation = impl
                if self.per_layer:
                    self.mask = saved_mask
        self.model.zero_grad(set_to_none=True)
        if self.per_layer:
            self.x.grad = None
        return counter.get_total_flops()

    def memory(self) -> int:
        """Peak CUDA memory of one step, or on CPU the bytes autograd saves for the backward."""
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.step()
            return torch.cuda.max_memory_allocated()
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        storages: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                storages[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.forward_backward(compiled=False)
        self.model.zero_grad(set_to_none=True)
        if self.per_layer:
            self.x.grad = None
        return sum(storages.values())


def run(bench: Bench, sources: list[str], rates: list[float], warmup: int, repeats: int,
        progress=None, kept_size: dict[float, Bench] | None = None, forwards: tuple[str, ...] = ("auto",)
        ) -> list[Variant]:
    """Dense, then each source and forward (sat_variants) at each rate, then (kept_size: rate -> Bench of a
    kept-size dense model) the kept-size dense models, all timed round-robin: one full step each per round."""
    variants = [Variant("dense", None, 0.0)] + [Variant(*v) for v in sat_variants(sources, rates, forwards)]
    variants += [Variant(f"kept-size@{r:g}", None, r, bench=b) for r, b in (kept_size or {}).items()]
    for v in variants:  # warm-up, FLOPs (history: after its statistics are seeded) and memory
        b = v.bench or bench
        with b.variant(v):
            for _ in range(warmup):
                b.step()
            v.flops = b.count_flops()
            v.peak_memory_bytes = b.memory()
    for i in range(repeats):  # interleaved round-robin
        for v in variants:
            b = v.bench or bench
            with b.variant(v):
                v.times.append(b.timed_step())
        if progress:
            progress(i + 1, repeats)
    return variants


def summarize(variants: list[Variant], tokens: int) -> tuple[dict, list[dict]]:
    dense = variants[0]
    d_med = statistics.median(dense.times)

    def row(v: Variant) -> dict:
        med = statistics.median(v.times)
        ideal = dense.flops / v.flops if v.flops else float("nan")
        speed = d_med / med
        q = statistics.quantiles(v.times, n=4) if len(v.times) >= 2 else [med, med, med]
        sat = v.sat if v.source else None
        return {"source": v.source or "dense", "forward": sat.effective_forward if sat else "dense", "rate": v.rate,
                "selection": sat.selection if sat else None, "attn_rate": sat.max_attn_rate if sat else 0.0,
                "mlp_rate": sat.max_mlp_rate if sat else 0.0, "ideal_speedup": ideal, "speedup": speed,
                "efficiency": speed / ideal if ideal else float("nan"), "tokens_per_second": tokens / med,
                "peak_memory_bytes": v.peak_memory_bytes, "step_seconds_median": med,
                "step_seconds_iqr": q[2] - q[0], "spread": (q[2] - q[0]) / med, "flops": v.flops,
                "repeats": len(v.times)}

    kept = {v.rate: row(v) for v in variants[1:] if v.bench is not None}
    rows = []
    for v in variants[1:]:
        if v.bench is not None:
            continue
        r = row(v)
        if v.rate in kept:  # the yardstick: a dense model of the kept size, no SAT overhead at all
            r["kept_size_speedup"] = kept[v.rate]["speedup"]
            r["kept_size_ideal_speedup"] = kept[v.rate]["ideal_speedup"]
        rows.append(r)
    return row(dense), rows
