"""SATCallback: drives the SAT schedule inside any transformers.Trainer (TRL's SFTTrainer included).

    model = apply_sat(AutoModelForCausalLM.from_pretrained(...), SATConfig(omission_rate=0.5))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[SATCallback()])
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)

Before each optimizer step it tells the model where training is (step of max_steps), so the omission
schedule advances; it adds the current rates to the Trainer's logs; on every checkpoint it writes
`sat_state.pt` (schedule position, selection RNG states, history statistics) beside the weights, and on
resume it reads it back, so that a resumed run selects exactly what an uninterrupted one would have.
Evaluation needs nothing: SAT layers run dense whenever the model is in eval mode.
"""

from __future__ import annotations

import os
import warnings

import torch
from transformers import TrainerCallback

from ..config import SATConfig, SATConfigError
from ..modeling.patch import _unwrap, apply_sat, load_sat_state_dict, sat_state_dict, set_sat_lr_profile, set_sat_step
from ..modeling.omitted import OmittedUpdate
from ..schedules import needs_lr_profile

SAT_STATE_NAME = "sat_state.pt"
CHECKPOINT_PREFIX = "checkpoint-"  # transformers' PREFIX_CHECKPOINT_DIR and its dash: checkpoint-<step>


def lr_profile_of(lr_scheduler, steps: int) -> list[float] | None:
    """The learning rate of each of `steps` optimizer steps under a LambdaLR scheduler (every transformers schedule
    is one), read from its multipliers without stepping it; None for other schedulers."""
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    base = getattr(lr_scheduler, "base_lrs", None)
    if not lambdas or not base:
        return None
    return [float(base[0]) * float(lambdas[0](t)) for t in range(steps)]


def first_batches(dataloader, n: int, device) -> list[dict]:
    """The first n batches of the training data in the dataset's own order (its first rows, collated as the
    loader collates them), on `device`: reading them draws no random number, so the run's data order and every
    other random stream stay as they would be."""
    dataset, collate = dataloader.dataset, dataloader.collate_fn
    size = getattr(dataloader, "batch_size", None) or getattr(dataloader, "total_batch_size", None) or 1
    batches = []
    for b in range(n):
        rows = [dataset[i] for i in range(b * size, min(len(dataset), (b + 1) * size))]
        if not rows:
            break
        batch = collate(rows)
        batches.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return batches


def prepare_sat_training(model, total_steps: int, lr_scheduler=None, train_dataloader=None) -> None:
    """What a SAT schedule needs before its first step: the LR of every step (rung_placement: lr) and, with
    layer_rates: auto, the per-layer factors measured on the first batches (unless restored from a checkpoint)."""
    from ..modeling.sensitivity import BATCHES, measure_layer_rates

    rt = model.sat_runtime
    if needs_lr_profile(rt.config) and rt.lr_profile is None:
        profile = lr_profile_of(lr_scheduler, total_steps) if lr_scheduler is not None else None
        if profile is None:
            raise SATConfigError("SATConfig.rung_placement='lr' needs the learning rate of every step: the Trainer's "
                                 f"scheduler ({type(lr_scheduler).__name__}) is not a LambdaLR; call "
                                 "satlm.set_sat_lr_profile(model, lrs) or use rung_placement='steps'")
        set_sat_lr_profile(model, profile)
    if rt.config.layer_rates == "auto" and rt.sensitivity is None:
        if train_dataloader is None:
            raise SATConfigError("SATConfig.layer_rates='auto' measures each layer on the first training batches, "
                                 "but the Trainer passed no train_dataloader to the callback; measure them with "
                                 "satlm.measure_layer_rates(model, batches) before training")
        device = next(model.parameters()).device
        measure_layer_rates(model, first_batches(train_dataloader, BATCHES, device))


class SATCallback(TrainerCallback):
    """Advance the SAT schedule per optimizer step, log the rates, save and restore SAT state with checkpoints.

    Args:
        config: applied to the model at the start of training if SAT is not applied yet; None expects
            a model already prepared with `satlm.apply_sat`.
        resume_from_checkpoint: the checkpoint folder to read `sat_state.pt` from on resume; None: the
            Trainer's `output_dir/checkpoint-<step>` of the step training resumes at.
    """

    def __init__(self, config: SATConfig | None = None, resume_from_checkpoint: str | None = None):
        self.config = config
        self.resume_from_checkpoint = resume_from_checkpoint
        self.rates: tuple[float, float] | None = None  # (attention, MLP) of the latest step
        self.omitted = OmittedUpdate()  # omitted_update: skip

    @staticmethod
    def _model(model):
        if model is None:
            raise ValueError("SATCallback needs the Trainer to pass its model to callbacks")
        return _unwrap(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = self._model(model)
        if getattr(model, "sat_runtime", None) is None:
            if self.config is None:
                raise ValueError("the model has no SAT applied: call satlm.apply_sat(model, config) before "
                                 "training, or pass SATCallback(config=...)")
            apply_sat(model, self.config)
        if state.global_step > 0:
            folder = self.resume_from_checkpoint or os.path.join(
                args.output_dir, f"{CHECKPOINT_PREFIX}{state.global_step}")
            path = os.path.join(folder, SAT_STATE_NAME)
            if os.path.isfile(path):
                load_sat_state_dict(model, torch.load(path, map_location="cpu", weights_only=True))
            else:
                warnings.warn(f"resuming at step {state.global_step} without {path}: the SAT schedule continues "
                              "from that step, but unit selection restarts from its seed", stacklevel=2)
        prepare_sat_training(model, state.max_steps, kwargs.get("lr_scheduler"), kwargs.get("train_dataloader"))
        self.rates = set_sat_step(model, state.global_step, state.max_steps)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        # Called once per optimizer step (before its first micro-batch); global_step counts finished steps.
        model = self._model(model)
        self.rates = set_sat_step(model, state.global_step, state.max_steps)
        if model.sat_runtime.config.omitted_update == "skip":
            self.omitted.begin_step(model.sat_runtime.modules)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        model = self._model(model)
        if model.sat_runtime.config.omitted_update == "skip":
            if optimizer is None:
                raise SATConfigError("SATConfig.omitted_update='skip' needs the optimizer, which the Trainer did not "
                                     "pass to the callback")
            self.omitted.save(model.sat_runtime.modules, optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.omitted.restore()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self.rates is None:
            return
        rates = {"attn_omission_rate": self.rates[0], "mlp_omission_rate": self.rates[1]}
        logs.update(rates)  # callbacks after this one (and the log history) see the rates
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(rates)

    def on_save(self, args, state, control, model=None, **kwargs):
        # The SAT state is the same on every rank; write it where the Trainer writes the checkpoint (rank 0,
        # or each node's first process with save_on_each_node=True, for nodes that share no file system).
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{state.global_step}")
        if os.path.isdir(folder):
            # Whole or absent: a process killed while writing leaves only the temporary name behind.
            path = os.path.join(folder, SAT_STATE_NAME)
            torch.save(sat_state_dict(self._model(model)), path + ".tmp")
            os.replace(path + ".tmp", path)


__all__ = ["SATCallback", "SAT_STATE_NAME"]
