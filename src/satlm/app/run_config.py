"""Run configs for `satlm train` / `satlm compare`: typed dataclasses, YAML files and dotted overrides.

A config is a `RunConfig`; YAML is only how it is stored. Every key can be overridden on the command
line as `key=value` (`sat.omission_rate=0.3`, `data.train=corpus/`), the value parsed as YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import yaml

from ..config import SATConfig, SATConfigError, closest_key
from ..data.config import EMBEDDED, TEMPLATES, TRUNCATIONS, DataConfig  # noqa: F401  (re-exported)
from ..errors import RunConfigError

TASKS = ("cpt", "sft")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BUDGETS = ("tokens", "time")
SHIPPED_CONFIGS = "configs"  # package-data folder (src/satlm/configs); top-level configs/ links to it


@dataclass
class SATSection(SATConfig):
    """The `sat:` section: `enabled` plus every SATConfig field (see satlm.config.SATConfig)."""

    enabled: bool = True
    """Train with SAT (true) or dense (false). `satlm compare` runs both."""

    def validate(self) -> "SATSection":
        if not isinstance(self.enabled, bool):
            raise SATConfigError(f"sat.enabled={self.enabled!r} must be true or false")
        return super().validate()

    def to_sat_config(self) -> SATConfig:
        return SATConfig(**copy.deepcopy({f.name: getattr(self, f.name) for f in dataclasses.fields(SATConfig)}))

    def to_dict(self) -> dict[str, Any]:
        out = {"enabled": self.enabled}
        out.update(self.to_sat_config().to_dict())
        return out


@dataclass
class LoRASection:
    """The `lora:` section: train a peft LoRA adapter instead of the whole model (SAT runs base + LoRA over the
    kept units). Off while r is null; `lora.r=16` on the command line turns it on."""

    r: int | None = None
    """LoRA rank; null: no LoRA (full fine-tuning)."""
    alpha: float | None = None
    """LoRA alpha (the update is scaled by alpha / r, or alpha / sqrt(r) with use_rslora); null: 2 r."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: Union[str, list] = "all-linear"
    """Projections that get an adapter: all-linear (every linear of the decoder layers), or a list of names
    (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, ...)."""
    modules_to_save: list | None = None
    """Modules trained in full and saved beside the adapter (e.g. [lm_head]); null: none."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r)."""

    @property
    def enabled(self) -> bool:
        return self.r is not None

    def validate(self) -> "LoRASection":
        if self.r is not None and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1):
            raise RunConfigError(f"config key 'lora.r' must be an integer >= 1 or null (no LoRA), got {self.r!r}")
        if self.alpha is not None and not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise RunConfigError(f"config key 'lora.alpha' must be a number > 0 or null (2 r), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise RunConfigError(f"config key 'lora.dropout' must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if not (isinstance(targets, str) and targets) and not (
                isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
            raise RunConfigError(f"config key 'lora.target_modules' must be all-linear or a list of module names, "
                                 f"got {targets!r}")
        return self

    def peft_config(self, task_type: str = "CAUSAL_LM"):
        try:
            from peft import LoraConfig
        except ImportError:
            raise RunConfigError("lora.r is set, but peft is not installed: pip install 'satlm[lora]'") from None
        return LoraConfig(r=self.r, lora_alpha=self.alpha if self.alpha is not None else 2 * self.r,
                          lora_dropout=self.dropout, target_modules=self.target_modules,
                          modules_to_save=self.modules_to_save, use_rslora=self.use_rslora, task_type=task_type)


@dataclass
class RunConfig:
    """One training run. Sizes are per device; one step is one optimizer update."""

    task: str = "cpt"
    """cpt (continual pre-training on packed text) or sft (supervised fine-tuning, loss on responses)."""
    model: str = EMBEDDED
    """A local checkpoint folder or a hub name; `embedded`: satlm's tiny pretrained Llama."""
    output_dir: str = "runs/satlm"
    """The run directory (config.yaml, metrics.jsonl, summary.json, checkpoint-N/, final/, plots/)."""
    max_steps: int = 100
    """Optimizer steps to train; the SAT schedule and the learning-rate schedule span them."""
    epochs: float | None = None
    """Passes over the training data instead of max_steps: the steps are computed from the data's size, the
    batch, grad_accum and the number of processes (and the LR and SAT schedules span them); null: max_steps."""
    batch_size: int = 8
    """Sequences per device per micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    seq_len: int = 256
    """Tokens per sequence: the packing block (cpt) or the truncation length (sft)."""
    lr: float = 1e-4
    """Peak learning rate."""
    lr_scheduler: str = "cosine"
    """A transformers scheduler name: cosine, linear, constant, constant_with_warmup, ..."""
    warmup: float = 0.05
    """Linear warmup: a fraction of max_steps when below 1, else a number of steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    max_skipped_steps: int = 0
    """Steps with a NaN or inf loss or gradient whose update may be dropped (the run goes on) before the
    run stops; 0: stop at the first, before its update, keeping the last good checkpoint."""
    optim: str = "adamw_torch_fused"
    """A transformers optimizer name; fused AdamW is the fast one on CPU and GPU."""
    seed: int = 42
    """Seed of model-side randomness and of the data order (same seed, same batches)."""
    save_steps: int = 500
    """Write checkpoint-N/ every this many steps and at the end (for resume); 0: no checkpoints."""
    save_total_limit: int | None = 2
    """Keep at most this many checkpoints (the newest); null: keep all."""
    eval_steps: int = 0
    """Evaluate (dense) every this many steps; the run always evaluates at the end. 0: only at the end."""
    eval_batch_size: int | None = None
    """Sequences per evaluation batch; null: batch_size."""
    logging_steps: int = 1
    """Write a metrics.jsonl record every this many steps."""
    precision: str = "auto"
    """auto (bf16 mixed precision on a GPU that has it, else fp32), fp32, bf16 or fp16 (mixed precision)."""
    attn_implementation: str | None = None
    """eager, sdpa, flash_attention_2, ...; null: the transformers default."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward to save memory."""
    tensorboard: bool = True
    """Write TensorBoard logs to output_dir/tensorboard when tensorboard is installed."""
    report_to: Union[str, list] = "none"
    """Trackers the Trainer reports to (transformers' report_to: none, all, tensorboard, wandb, mlflow, ... or a
    list); the dense evaluations are logged through them too (eval_loss, eval_perplexity)."""
    progress: bool = True
    """Show a progress bar with tokens/s and ETA."""
    resume: Union[bool, str] = False
    """true: continue from the newest checkpoint-N in output_dir; a path: from that checkpoint."""
    overwrite: bool = False
    """Replace a previous run in output_dir (only the files a run writes are removed)."""
    budget: str = "tokens"
    """`satlm compare` only. tokens: both sides train max_steps steps (the same tokens, in the same order).
    time: the SAT side gets the dense side's training time instead: its steps are estimated from its own
    measured step time (each scheduled rate timed against dense before it starts), its LR and SAT schedules
    laid over those steps; it answers which model is better for the same compute time."""
    seeds: list | None = None
    """`satlm compare` only: run both sides once per seed in this list (each seed sets the data order, the model-side
    randomness and SAT's selection; the runs go to output_dir/seed-N/dense and .../sat) and report the mean paired
    eval-loss delta over seeds with its standard error; null: one pair of runs with `seed` (output_dir/dense,
    output_dir/sat). `satlm compare --seeds 0,1` sets it."""
    interleaved_pairs: int = 4
    """`satlm compare` only: dense/SAT pairs of training steps timed interleaved in one process at each omission
    level of the schedule, after one warm-up pair (speedup_interleaved; also the time axis of SAT's curve and the
    step count of budget: time); at least 4; 0: skip the measurement (no interleaved figures)."""
    trainer_args: dict = field(default_factory=dict)
    """Extra transformers.TrainingArguments (fsdp, deepspeed, ...), passed through as given."""
    data: DataConfig = field(default_factory=DataConfig)
    sat: SATSection = field(default_factory=SATSection)
    lora: LoRASection = field(default_factory=LoRASection)

    def validate(self) -> "RunConfig":
        _one_of("task", self.task, TASKS)
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("data.template", self.data.template, TEMPLATES)
        _one_of("data.truncation", self.data.truncation, TRUNCATIONS)
        _one_of("budget", self.budget, BUDGETS)
        from ..data.formats import FORMATS, TRAIN_ON

        _one_of("data.format", self.data.format, FORMATS)
        _one_of("data.train_on", self.data.train_on, TRAIN_ON)
        for key in ("max_steps", "batch_size", "grad_accum", "logging_steps"):
            _at_least(key, getattr(self, key), 1)
        _at_least("seq_len", self.seq_len, 2)
        for key in ("save_steps", "eval_steps", "max_skipped_steps"):
            _at_least(key, getattr(self, key), 0)
        self._validate_seeds()
        if self.interleaved_pairs != 0:
            _at_least("interleaved_pairs", self.interleaved_pairs, 4)
        if self.eval_batch_size is not None:
            _at_least("eval_batch_size", self.eval_batch_size, 1)
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise RunConfigError(f"config key 'epochs' must be a number > 0 or null (use max_steps), got {self.epochs!r}")
        if self.save_total_limit is not None:
            _at_least("save_total_limit", self.save_total_limit, 1)
        if self.data.max_eval_samples is not None:
            _at_least("data.max_eval_samples", self.data.max_eval_samples, 1)
        if not self.lr > 0:
            raise RunConfigError(f"config key 'lr' must be > 0, got {self.lr!r}")
        if not math.isfinite(self.lr):
            raise RunConfigError(f"config key 'lr' must be a finite number > 0, got {self.lr!r}")
        for key in ("warmup", "weight_decay", "max_grad_norm"):
            if not getattr(self, key) >= 0 or not math.isfinite(getattr(self, key)):
                raise RunConfigError(f"config key {key!r} must be a finite number >= 0, got {getattr(self, key)!r}")
        if not 0 < self.data.eval_fraction < 1:
            raise RunConfigError(f"config key 'data.eval_fraction' must be in (0, 1), got {self.data.eval_fraction!r}")
        if isinstance(self.resume, str) and not self.resume:
            raise RunConfigError("config key 'resume' must be true, false or a checkpoint path, got ''")
        self.lora.validate()
        if self.sat.enabled:
            _warn_unreached_stairs(self.sat, self.max_steps)
        return self

    def _validate_seeds(self) -> None:
        seeds = self.seeds
        if seeds is None:
            return
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise RunConfigError(f"config key 'seeds' must be a non-empty list of integers >= 0 or null (one run "
                                 f"with `seed`), got {seeds!r}")
        if len(set(seeds)) < len(seeds):
            raise RunConfigError(f"config key 'seeds' lists a seed twice: {seeds!r}")

    # -- conversion ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["data"] = dataclasses.asdict(self.data)
        out["sat"] = self.sat.to_dict()
        out["lora"] = dataclasses.asdict(self.lora)
        return out

    def to_yaml(self, header: str | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        return (f"# {header}\n" if header else "") + text

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "RunConfig":
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise RunConfigError(f"a run config must be a mapping of keys to values, got {type(raw).__name__}")
        kwargs = _build_kwargs(cls, raw, "")
        for name, section in (("data", DataConfig), ("sat", SATSection), ("lora", LoRASection)):
            sub = raw.get(name) or {}
            if not isinstance(sub, dict):
                raise RunConfigError(f"config key {name!r} is a section: give a mapping or set {name}.<field>=value")
            try:
                kwargs[name] = section(**_build_kwargs(section, sub, name + "."))
            except SATConfigError as e:
                raise SATConfigError(str(e).replace("SATConfig.", "sat.")) from None
        return cls(**kwargs).validate()


# -- keys and values -------------------------------------------------------------------------------------
_SECTIONS = {"data": DataConfig, "sat": SATSection, "lora": LoRASection}


def config_keys() -> list[str]:
    """Every settable key, dotted: task, model, ..., data.train, ..., sat.enabled, sat.omission_rate, ..."""
    keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in _SECTIONS]
    for name, section in _SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(section)]
    return keys


def _unknown(key: str) -> RunConfigError:
    return RunConfigError(f"unknown config key {key!r}{closest_key(key, config_keys())}")


def _build_kwargs(cls, raw: dict[str, Any], prefix: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in names:
            raise _unknown(f"{prefix}{key}")
        if not prefix and key in _SECTIONS:
            continue
        out[key] = _coerce(prefix + key, value, hints[key])
    return out


def _describe(hint) -> str:
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if typing.get_origin(hint) in (list, tuple):
        return "a list"
    if hint is dict or typing.get_origin(hint) is dict:
        return "a mapping"
    args = typing.get_args(hint)
    return " or ".join("null" if a is type(None) else _describe(a) for a in args) or str(hint)


def _coerce(key: str, value: Any, hint) -> Any:
    """The value as the field's type, or a RunConfigError naming the key (YAML 1.1 reads 1e-4 as a string)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        for a in candidates:  # an exact type match first (resume: true stays a bool, a path stays a str)
            if _matches(value, a):
                return _coerce(key, value, a)
        for a in candidates:
            try:
                return _coerce(key, value, a)
            except RunConfigError:
                pass
        raise RunConfigError(f"config key {key!r} expects {_describe(hint)}, got {value!r}")
    bad = RunConfigError(f"config key {key!r} expects {_describe(hint)}, got {value!r}")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise bad
    if hint is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin in (list, tuple) or hint in (list, tuple):
        if isinstance(value, (list, tuple)):
            return list(value)
        raise bad
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad
    return value


def _matches(value: Any, hint) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, hint) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin = typing.get_origin(hint) or hint
    return isinstance(origin, type) and isinstance(value, origin)


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise RunConfigError(f"config key {key!r} is {value!r}; choose one of {', '.join(allowed)}")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise RunConfigError(f"config key {key!r} must be >= {low}, got {value!r}")


def _warn_unreached_stairs(sat: SATConfig, max_steps: int) -> None:
    """A ladder with more rungs than sparse steps (or a `steps` stair narrower than one step) still trains: the
    schedule jumps over the stairs that get no step. Said once, as a warning, so a short smoke run of a
    long config works."""
    from ..schedules import unreached_stairs

    shown = 20
    missed = unreached_stairs(sat, max_steps, limit=shown + 1)
    if not missed:
        return
    if sat.schedule == "ladder":
        what, n, fix = f"sat.rungs={sat.rungs}", sat.rungs, "lower sat.rungs or raise max_steps"
    else:
        what, n, fix = "sat.steps", len(sat.steps), "widen those stairs or raise max_steps"
    stairs = ", ".join(str(i + 1) for i in missed[:shown]) + (", ..." if len(missed) > shown else "")
    warnings.warn(f"{what} with max_steps={max_steps}: stair(s) {stairs} of {n} get no step and are skipped; {fix}",
                  UserWarning, stacklevel=3)


# -- files and overrides ---------------------------------------------------------------------------------
def shipped_configs() -> dict[str, Path]:
    """The YAML configs that ship inside the package, by name (demo-cpt, demo-sft, ...)."""
    from importlib import resources

    folder = resources.files("satlm") / SHIPPED_CONFIGS
    if not folder.is_dir():
        return {}
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith((".yaml", ".yml"))}


def find_config(name: str) -> Path:
    """A config file path: an existing file, else a shipped config by name or by its configs/ path."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = shipped_configs()
    stem = path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else path.name
    if stem in shipped and (path.parent in (Path("."), Path(SHIPPED_CONFIGS))):
        return shipped[stem]
    names = ", ".join(sorted(shipped)) or "none"
    raise RunConfigError(f"config file {name!r} not found (shipped configs: {names})")


class DuplicateKeyError(yaml.YAMLError):
    """A mapping key given twice in one YAML mapping (PyYAML would keep the last one silently)."""

    def __init__(self, key, first: "yaml.Mark", second: "yaml.Mark"):
        super().__init__(f"key {key!r} is given twice (line {first.line + 1} and line {second.line + 1}); keep one")
        self.key, self.first, self.second = key, first, second


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in a mapping: `max_steps: 2` ... `max_steps: 5000`
    would otherwise train 5000 steps without a word. Merge keys (`<<: *base`) may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise DuplicateKeyError(key, seen[key], key_node.start_mark)
                    seen[key] = key_node.start_mark
                except TypeError:  # an unhashable key: the base constructor says so
                    continue
        return super().construct_mapping(node, deep)


def _yaml_value(text: str):
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _decode_config(path: str | Path) -> str:
    """The file's text; non-UTF-8 bytes are a RunConfigError naming the byte, its offset and line."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise RunConfigError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RunConfigError(f"config file {str(path)!r} is not UTF-8 text: byte 0x{data[e.start]:02x} at byte "
                             f"offset {e.start} (line {line}); save it as UTF-8") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file. Duplicate keys, non-UTF-8 text and invalid YAML are RunConfigErrors
    naming the file and line; an empty file (or only comments) is a warning that every key has its default."""
    text = _decode_config(path)
    try:
        raw = _yaml_value(text)
    except DuplicateKeyError as e:
        raise RunConfigError(f"config file {str(path)!r}: {e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise RunConfigError(f"config file {str(path)!r}{line} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if raw is not None and not isinstance(raw, dict):
        raise RunConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    if raw is None:
        warnings.warn(f"config file {str(path)!r} is empty: every key has its default (`satlm keys` lists them), "
                      "but for the key=value overrides", UserWarning, stacklevel=2)
    return raw or {}


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings applied to a raw config dict; values parsed as YAML (`0.5`, `true`, `[0, -1]`)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RunConfigError(f"override {item!r} is not key=value")
        try:
            value = _yaml_value(text) if text.strip() else ""
        except DuplicateKeyError as e:
            raise RunConfigError(f"override {item!r}: {e}") from None
        except yaml.YAMLError:
            value = text
        parts = key.split(".")
        if parts[0] == "trainer_args" and len(parts) > 1:
            if not all(parts[1:]):
                raise RunConfigError(f"override {item!r}: {key!r} has an empty part")
            if raw.get("trainer_args") is None:
                raw["trainer_args"] = {}
            node = raw["trainer_args"]
            for i, p in enumerate(parts[1:], 1):
                if not isinstance(node, dict):  # trainer_args.a=1 then trainer_args.a.b=2
                    raise RunConfigError(f"override {item!r}: {'.'.join(parts[:i])} is {node!r}, not a mapping")
                if i < len(parts) - 1:
                    node = node.setdefault(p, {})
            node[parts[-1]] = value
            continue
        if key not in config_keys():
            if key in _SECTIONS:
                raise RunConfigError(f"config key {key!r} is a section: set {key}.<field>=value")
            raise _unknown(key)
        if len(parts) == 2:
            section = raw.get(parts[0])
            if section is None:
                section = raw[parts[0]] = {}
            if not isinstance(section, dict):
                raise RunConfigError(f"config key {parts[0]!r} is a section: give a mapping")
            section[parts[1]] = value
        else:
            raw[key] = value
    return raw


def load_run_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """A RunConfig from a YAML file (or the defaults) plus dotted `key=value` overrides."""
    raw = read_config_file(find_config(str(path))) if path is not None else {}
    return RunConfig.from_dict(apply_overrides(raw, overrides))


DEFAULT_COMPARE_CONFIG = "demo-cpt"  # configs/demo-cpt.yaml, shipped inside the package


def parse_run_args(command: str, argv: Sequence[str] | None, config_required: bool):
    """CONFIG [key=value ...] [--resume] [--print-config] -> RunConfig, or None after --print-config. The flags
    may come anywhere among the items."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=f"satlm {command}",
        description="Config keys: see `satlm keys`. Values are YAML: 0.5, true, null, [0, -1].",
    )
    parser.add_argument("items", nargs="*", metavar="CONFIG | key=value",
                        help="a YAML config (path, or a shipped name such as demo-cpt) then key=value overrides"
                        + ("" if config_required else f"; default config: {DEFAULT_COMPARE_CONFIG}"))
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint (resume=true)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    if command == "compare":
        parser.add_argument("--seeds", default=None, metavar="S,S,...",
                            help="run both sides once per seed and report the mean paired delta (seeds=[...]), "
                            "e.g. --seeds 0,1")
    args = parser.parse_intermixed_args(list(argv or []))  # the flags anywhere: `CONFIG --resume key=value`
    config, overrides = None, []
    for item in args.items:
        if "=" in item:
            overrides.append(item)
        elif config is None and not overrides:
            config = item
        else:
            parser.error(f"{item!r} is neither the config (which comes first) nor a key=value override")
    if config is None:
        if config_required:
            parser.error("a config is required, e.g. `satlm train configs/demo-cpt.yaml` (or: demo-cpt)")
        config = DEFAULT_COMPARE_CONFIG
    if args.resume:
        overrides.append("resume=true")
    if getattr(args, "seeds", None) is not None:
        parts = [p.strip() for p in args.seeds.split(",") if p.strip()]
        if not parts or not all(p.isdigit() for p in parts):
            parser.error(f"--seeds {args.seeds!r}: give seeds as integers separated by commas, e.g. --seeds 0,1")
        overrides.append(f"seeds=[{','.join(parts)}]")
    cfg = load_run_config(config, overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return None
    return cfg


__all__ = [
    "DataConfig",
    "LoRASection",
    "RunConfig",
    "SATSection",
    "apply_overrides",
    "config_keys",
    "find_config",
    "load_run_config",
    "parse_run_args",
    "read_config_file",
    "shipped_configs",
    "EMBEDDED",
]
