"""UnitSelector: which units one wrapped module keeps, step by step.

It owns the module's selection generator, the per-forward cache (a recomputation under gradient checkpointing
reuses the selection of its forward), the history statistics (source=history) and its own state dict, which
`sat_state_dict` saves for exact resume.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.selection import select_unbiased, select_units, uniform
from ..distributed import reduce_scores
from .runtime import SATRuntime


class UnitSelector:
    def __init__(self, runtime: SATRuntime, n_units: int, seed: int):
        self.runtime = runtime
        self.n_units = n_units
        self.seed = seed
        self.generator_: torch.Generator | None = None
        # This forward's state, reset by begin_forward (the model's forward pre-hook, outside any compiled region,
        # so that a compiled forward reads no forward counter and holds no generator):
        # (k, kept units, their gradient weights or None): a recomputation reuses them
        self._cache: tuple[int, torch.Tensor, torch.Tensor | None] | None = None
        self._path: bool | None = None  # selected from history (None: not decided yet in this forward)
        self._noise: list[torch.Tensor] = []  # uniform draws for `sample` / `random`, drawn before the forward
        self.history: torch.Tensor | None = None  # running importance per unit (history source)
        self.age: torch.Tensor | None = None  # steps since each unit was last observed
        self.last_kept: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None
        # omitted_update: skip: which units this optimizer step kept in any of its forwards ((n,) bool, on the
        # device; None: none chosen yet), or all of them (a forward ran the module dense).
        self.step_kept: torch.Tensor | None = None
        self.step_all_kept = False

    def generator(self, device: torch.device) -> torch.Generator:
        if self.generator_ is None or self.generator_.device.type != torch.device(device).type:
            self.generator_ = torch.Generator(device=device)
            self.generator_.manual_seed(self.seed)
        return self.generator_

    def draws(self) -> int:
        """Uniform vectors one selection uses: scores of the random metric, keys of sample / random selection."""
        cfg = self.runtime.config
        return int(cfg.metric == "random") + int(cfg.selection in ("sample", "random", "unbiased"))

    def begin_forward(self, device: torch.device | None) -> None:
        """A new training forward: forget the last forward's selection and, given a device, draw this forward's
        noise from the selector's generator (one stream per module, so that a run is reproducible and resumes
        exactly)."""
        self._cache, self._path = None, None
        self._noise = []
        if device is not None:
            g = self.generator(device)
            self._noise = [uniform(self.n_units, g) for _ in range(self.draws())]

    def _draw(self, device) -> torch.Tensor:
        """The next of this forward's uniform draws (drawn now when the forward had no pre-hook)."""
        if self._noise:
            return self._noise.pop(0)
        return uniform(self.n_units, self.generator(device))

    def cached(self, k: int) -> torch.Tensor | None:
        """The units this forward already selected (a recomputation), or None."""
        c = self._cache
        if c is not None and c[0] == k:
            return c[1]
        return None

    def weights(self, k: int) -> torch.Tensor | None:
        """The gradient weights 1/p of the units this forward kept (selection: unbiased), or None."""
        c = self._cache
        return c[2] if c is not None and c[0] == k else None

    def use_history(self) -> bool:
        """Select from history statistics in this forward? Fixed per forward, so that a recomputation takes the
        same path even though the first pass seeded the statistics; history delegates to current until then."""
        if self._path is None:
            self._path = self.runtime.config.source == "history" and self.history is not None
        return self._path

    def choose(self, k: int, scores: torch.Tensor | None, device) -> torch.Tensor:
        """Keep k units by this step's scores (None with the random metric), ascending."""
        cfg = self.runtime.config
        if cfg.metric == "random" or scores is None:
            scores = self._draw(device)
        scores = reduce_scores(scores, cfg.metric)
        noise = self._draw(device) if cfg.selection != "topk" and k < self.n_units else None
        weights = None
        if cfg.selection == "unbiased" and k < self.n_units:
            idx, weights = select_unbiased(scores, k, noise)
        else:
            idx = select_units(scores, k, cfg.selection, noise)
        self._cache = (k, idx, weights)
        if cfg.omitted_update == "skip":
            mask = torch.zeros(self.n_units, dtype=torch.bool, device=idx.device).index_fill_(0, idx, True)
            self.step_kept = mask if self.step_kept is None else self.step_kept.to(mask.device) | mask
        self.last_kept, self.last_scores = idx, scores.detach()
        if cfg.source == "history" and self.history is None:
            # The first sparse forward in history mode observes every unit (current path) to seed the statistics.
            self.history = scores.detach().float().clone()
            self.age = torch.zeros_like(self.history)
        return idx

    def choose_from_history(self, k: int, device) -> torch.Tensor:
        cfg = self.runtime.config
        scores = self.history
        if cfg.history_exploration > 0:
            # The score of an unobserved unit doubles every `history_exploration` steps, so any unit overtakes
            # the kept ones within log2(score ratio) doublings and is observed again.
            scores = scores * torch.exp2((self.age / cfg.history_exploration).clamp_max(60.0))
        return self.choose(k, scores, device)

    def observe(self, idx: torch.Tensor, observed: torch.Tensor) -> None:
        """history: fold this step's scores of the kept units into the running statistics (once per forward)."""
        cfg = self.runtime.config
        observed = reduce_scores(observed.detach().float(), cfg.metric)
        old = self.history.index_select(0, idx)
        self.history.index_copy_(0, idx, cfg.history_decay * old + (1.0 - cfg.history_decay) * observed)
        self.age.add_(1.0).index_fill_(0, idx, 0.0)

    def forget_last(self, dropped: bool = False) -> None:
        """This forward runs the module's base layer: every unit kept, or (dropped: layer_drop_rate skipped the
        layer's backward) none trained."""
        self.last_kept = None
        if not dropped:
            self.step_all_kept = True
        elif self.step_kept is None:
            self.step_kept = torch.zeros(self.n_units, dtype=torch.bool)

    def begin_step(self) -> None:
        """A new optimizer step (omitted_update: skip): no unit kept yet."""
        self.step_kept, self.step_all_kept = None, False

    def step_omitted(self) -> torch.Tensor | None:
        """Indices of the units no forward of this step kept, or None when every unit was kept (or none ran)."""
        if self.step_all_kept or self.step_kept is None:
            return None
        return (~self.step_kept).nonzero().squeeze(1)

    # -- resume --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        g = self.generator_
        return {"generator": g.get_state() if g is not None else None,
                "generator_device": str(g.device) if g is not None else None,
                "history": self.history.cpu() if self.history is not None else None,
                "age": self.age.cpu() if self.age is not None else None}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        if state.get("generator") is not None:
            self.generator_ = torch.Generator(device=device)
            self.generator_.set_state(state["generator"])
        if state.get("history") is not None:
            self.history = state["history"].to(device)
            self.age = state["age"].to(device)
