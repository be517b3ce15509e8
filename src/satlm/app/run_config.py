"""Run configs for `satlm train` / `satlm compare`: typed dataclasses, YAML files and dotted overrides.

A config is a `RunConfig`; YAML is only how it is stored. Every key can be overridden on the command
line as `key=value` (`sat.omission_rate=0.3`, `data.train=corpus/`), the value parsed as YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, Union

import yaml

from ..config import SATConfig, closest_key
from ..data.config import EMBEDDED, TEMPLATES, TRUNCATIONS, DataConfig  # noqa: F401  (re-exported)
from ..errors import RunConfigError
from ..fields import FieldSpec, Problem, check_fields, field_specs, read_value

TASKS = ("cpt", "sft")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BUDGETS = ("tokens", "time")
SHIPPED_CONFIGS = "configs"  # package-data folder (src/satlm/configs); top-level configs/ links to it


@dataclass
class SATSection(SATConfig):
    """The `sat:` section: `enabled` plus every SATConfig field (see satlm.config.SATConfig)."""

    _prefix: ClassVar[str] = "sat."

    enabled: bool = field(default=True, metadata={
        "help": "Train with SAT (true) or dense (false). `satlm compare` runs both."})

    def _field_error(self, problem: Problem) -> Exception:
        # A value that is not of the field's type is a config-key error, as for every other key; the rest is SAT's.
        return RunConfigError(problem.as_key(self._prefix)) if problem.kind == "type" else super()._field_error(problem)

    def to_sat_config(self) -> SATConfig:
        self.validate()  # a no-op unless a value changed since the section was checked
        return SATConfig._from_checked({f.name: getattr(self, f.name) for f in dataclasses.fields(SATConfig)})

    def to_dict(self) -> dict[str, Any]:
        out = {"enabled": self.enabled}
        out.update(self.to_sat_config().to_dict())
        return out


def _key_error(prefix: str) -> Callable[[Problem], Exception]:
    return lambda problem: RunConfigError(problem.as_key(prefix))


@dataclass
class LoRASection:
    """The `lora:` section: train a peft LoRA adapter instead of the whole model (SAT runs base + LoRA over the
    kept units). Off while r is null; `lora.r=16` on the command line turns it on."""

    r: int | None = field(default=None, metadata={
        "range": "[1, inf)", "null": "no LoRA",
        "help": "LoRA rank; null: no LoRA (full fine-tuning)."})
    alpha: float | None = field(default=None, metadata={
        "range": "(0, inf)", "null": "2 r",
        "help": "LoRA alpha (the update is scaled by alpha / r, or alpha / sqrt(r) with use_rslora); null: 2 r."})
    dropout: float = field(default=0.0, metadata={
        "range": "[0, 1)",
        "help": "Dropout on the LoRA input."})
    target_modules: Union[str, list] = field(default="all-linear", metadata={
        "expects": "all-linear or a list of module names",
        "help": "Projections that get an adapter: all-linear (every linear of the decoder layers), or a list of names "
                "(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, ...)."})
    modules_to_save: list | None = field(default=None, metadata={
        "help": "Modules trained in full and saved beside the adapter (e.g. [lm_head]); null: none."})
    use_rslora: bool = field(default=False, metadata={
        "help": "Rank-stabilised LoRA: scale by alpha / sqrt(r)."})

    @property
    def enabled(self) -> bool:
        return self.r is not None

    def validate(self) -> "LoRASection":
        check_fields(self, _key_error("lora."))
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

    task: str = field(default="cpt", metadata={
        "choices": TASKS,
        "help": "cpt (continual pre-training on packed text) or sft (supervised fine-tuning, loss on responses)."})
    model: str = field(default=EMBEDDED, metadata={
        "help": "A local checkpoint folder or a hub name; `embedded`: satlm's tiny pretrained Llama."})
    output_dir: str = field(default="runs/satlm", metadata={
        "help": "The run directory (config.yaml, metrics.jsonl, summary.json, checkpoint-N/, final/, plots/)."})
    max_steps: int = field(default=100, metadata={
        "range": "[1, inf)",
        "help": "Optimizer steps to train; the SAT schedule and the learning-rate schedule span them."})
    epochs: float | None = field(default=None, metadata={
        "range": "(0, inf)", "null": "use max_steps",
        "help": "Passes over the training data instead of max_steps: the steps are computed from the data's size, "
                "the batch, grad_accum and the number of processes (and the LR and SAT schedules span them); null: "
                "max_steps."})
    batch_size: int = field(default=8, metadata={
        "range": "[1, inf)",
        "help": "Sequences per device per micro-batch."})
    grad_accum: int = field(default=1, metadata={
        "range": "[1, inf)",
        "help": "Micro-batches accumulated per optimizer step."})
    seq_len: int = field(default=256, metadata={
        "range": "[2, inf)",
        "help": "Tokens per sequence: the packing block (cpt) or the truncation length (sft)."})
    lr: float = field(default=1e-4, metadata={
        "range": "(0, inf)",
        "help": "Peak learning rate."})
    lr_scheduler: str = field(default="cosine", metadata={
        "help": "A transformers scheduler name: cosine, linear, constant, constant_with_warmup, ..."})
    warmup: float = field(default=0.05, metadata={
        "range": "[0, inf)",
        "help": "Linear warmup: a fraction of max_steps when below 1, else a number of steps."})
    weight_decay: float = field(default=0.0, metadata={
        "range": "[0, inf)",
        "help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={
        "range": "[0, inf)",
        "help": "Gradient clipping norm; 0 disables clipping."})
    max_skipped_steps: int = field(default=0, metadata={
        "range": "[0, inf)",
        "help": "Steps with a NaN or inf loss or gradient whose update may be dropped (the run goes on) before the "
                "run stops; 0: stop at the first, before its update, keeping the last good checkpoint."})
    optim: str = field(default="adamw_torch_fused", metadata={
        "help": "A transformers optimizer name; fused AdamW is the fast one on CPU and GPU."})
    seed: int = field(default=42, metadata={
        "help": "Seed of model-side randomness and of the data order (same seed, same batches)."})
    save_steps: int = field(default=500, metadata={
        "range": "[0, inf)",
        "help": "Write checkpoint-N/ every this many steps and at the end (for resume); 0: no checkpoints."})
    save_total_limit: int | None = field(default=2, metadata={
        "range": "[1, inf)", "null": "keep all",
        "help": "Keep at most this many checkpoints (the newest); null: keep all."})
    eval_steps: int = field(default=0, metadata={
        "range": "[0, inf)",
        "help": "Evaluate (dense) every this many steps; the run always evaluates at the end. 0: only at the end."})
    eval_batch_size: int | None = field(default=None, metadata={
        "range": "[1, inf)", "null": "batch_size",
        "help": "Sequences per evaluation batch; null: batch_size."})
    logging_steps: int = field(default=1, metadata={
        "range": "[1, inf)",
        "help": "Write a metrics.jsonl record every this many steps."})
    precision: str = field(default="auto", metadata={
        "choices": PRECISIONS,
        "help": "auto (bf16 mixed precision on a GPU that has it, else fp32), fp32, bf16 or fp16 (mixed precision)."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "eager, sdpa, flash_attention_2, ...; null: the transformers default."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in the backward to save memory."})
    tensorboard: bool = field(default=True, metadata={
        "help": "Write TensorBoard logs to output_dir/tensorboard when tensorboard is installed."})
    report_to: Union[str, list] = field(default="none", metadata={
        "help": "Trackers the Trainer reports to (transformers' report_to: none, all, tensorboard, wandb, mlflow, ... "
                "or a list); the dense evaluations are logged through them too (eval_loss, eval_perplexity)."})
    progress: bool = field(default=True, metadata={
        "help": "Show a progress bar with tokens/s and ETA."})
    resume: Union[bool, str] = field(default=False, metadata={
        "expects": "true, false or a checkpoint path",
        "help": "true: continue from the newest checkpoint-N in output_dir; a path: from that checkpoint."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace a previous run in output_dir (only the files a run writes are removed)."})
    budget: str = field(default="tokens", metadata={
        "choices": BUDGETS,
        "help": "`satlm compare` only. tokens: both sides train max_steps steps (the same tokens, in the same order). "
                "time: the SAT side gets the dense side's training time instead: its steps are estimated from its "
                "own measured step time (each scheduled rate timed against dense before it starts), its LR and SAT "
                "schedules laid over those steps; it answers which model is better for the same compute time."})
    seeds: list[int] | None = field(default=None, metadata={
        "range": "[0, inf)", "expects": "a non-empty list of integers >= 0", "null": "one run with `seed`",
        "help": "`satlm compare` only: run both sides once per seed in this list (each seed sets the data order, the "
                "model-side randomness and SAT's selection; the runs go to output_dir/seed-N/dense and .../sat) and "
                "report the mean paired eval-loss delta over seeds with its standard error; null: one pair of runs "
                "with `seed` (output_dir/dense, output_dir/sat). `satlm compare --seeds 0,1` sets it."})
    interleaved_pairs: int = field(default=4, metadata={
        "range": "[0, inf)",
        "help": "`satlm compare` only: dense/SAT pairs of training steps timed interleaved in one process at each "
                "omission level of the schedule, after one warm-up pair (speedup_interleaved; also the time axis of "
                "SAT's curve and the step count of budget: time); at least 4; 0: skip the measurement (no "
                "interleaved figures)."})
    trainer_args: dict = field(default_factory=dict, metadata={
        "help": "Extra transformers.TrainingArguments (fsdp, deepspeed, ...), passed through as given."})
    data: DataConfig = field(default_factory=DataConfig)
    sat: SATSection = field(default_factory=SATSection)
    lora: LoRASection = field(default_factory=LoRASection)

    def validate(self) -> "RunConfig":
        """Every key as its field declares it (sat: as SATConfig does), and the few rules between keys."""
        check_fields(self, _key_error(""))
        self.data.validate()
        self.lora.validate()
        self.sat.validate()  # a no-op unless a value changed since the section was checked
        if 0 < self.interleaved_pairs < 4:
            raise RunConfigError(f"config key 'interleaved_pairs' must be >= 4 or 0 (no interleaved measurement), "
                                 f"got {self.interleaved_pairs!r}")
        if self.seeds is not None:
            if not self.seeds:
                raise RunConfigError("config key 'seeds' must be a non-empty list of integers >= 0 or null (one run "
                                     "with `seed`), got []")
            if len(set(self.seeds)) < len(self.seeds):
                raise RunConfigError(f"config key 'seeds' lists a seed twice: {self.seeds!r}")
        if isinstance(self.resume, str) and not self.resume:
            raise RunConfigError("config key 'resume' must be true, false or a checkpoint path, got ''")
        if self.sat.enabled:
            _warn_unreached_stairs(self.sat, self.max_steps)
        return self

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
        kwargs = _read_section(cls, raw, "")
        for name, section in _SECTIONS.items():
            sub = raw.get(name) or {}
            if not isinstance(sub, dict):
                raise RunConfigError(f"config key {name!r} is a section: give a mapping or set {name}.<field>=value")
            kwargs[name] = section(**_read_section(section, sub, name + "."))  # sat: checked here, once
        return cls(**kwargs).validate()


# -- keys and values -------------------------------------------------------------------------------------
_SECTIONS = {"data": DataConfig, "sat": SATSection, "lora": LoRASection}


def key_specs() -> dict[str, FieldSpec]:
    """Every settable key, dotted (task, ..., data.train, ..., sat.enabled, sat.omission_rate, ...), and its field's
    declaration: generated from the dataclasses, so that a key is declared once, as a field."""
    out = dict(field_specs(RunConfig))
    for name, section in _SECTIONS.items():
        out.update({f"{name}.{key}": spec for key, spec in field_specs(section).items()})
    return out


def config_keys() -> list[str]:
    """Every settable key, dotted: task, model, ..., data.train, ..., sat.enabled, sat.omission_rate, ..."""
    return list(key_specs())


def describe_key(key: str) -> str:
    """A key's entry in `satlm keys --describe`: its name, what it takes, its default, then its help, indented."""
    spec = key_specs()[key]
    default = yaml.safe_dump(spec.default, default_flow_style=True).splitlines()[0]
    help_lines = textwrap.wrap(spec.help, width=100, initial_indent="    ", subsequent_indent="    ")
    return "\n".join([f"{key}: {spec.words()}; default {default}", *help_lines])


def _unknown(key: str) -> RunConfigError:
    return RunConfigError(f"unknown config key {key!r}{closest_key(key, config_keys())}")


def _read_section(cls, raw: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The keyword arguments of one section from its raw mapping: unknown keys refused, each value read as its
    field's type (read_value converts; the section's own check judges)."""
    specs = field_specs(cls)
    out = {}
    for key, value in raw.items():
        if not prefix and key in _SECTIONS:
            continue
        if not isinstance(key, str) or key not in specs:
            raise _unknown(f"{prefix}{key}")
        out[key] = read_value(specs[key], value)
    return out


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
