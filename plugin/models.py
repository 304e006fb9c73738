"""Find, check and load checkpoints, architecture-generic.

Turns a registry ``ModelSpec`` into a local checkpoint directory (toy recipe, local
path or hub id), refuses unsafe checkpoints (pickle weights, remote code) unless the
user opted in, and loads a model in eval mode with hidden states available. It computes
nothing; activations live in ``activations.py``, weight diffs in ``weightdiff.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .dtypes import resolve_dtype
from .errors import ArchitectureMismatch, ModelLoadError, ModelUnavailable
from .fingerprint import fingerprint
from .records import LAYER_KEYS

if TYPE_CHECKING:
    from .registry import ModelSpec

__all__ = [
    "CheckpointFiles",
    "LoadedModel",
    "check_compatible",
    "check_compatible_configs",
    "checkpoint_files",
    "fingerprint",
    "load_model",
    "load_tokenizer",
    "pick_device",
    "read_config",
    "resolve_dtype",
    "resolve_source",
    "torch_dtype",
]

#: What a hub snapshot needs: config, tokenizer, safetensors weights and their index.
HUB_PATTERNS = (
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
)
# Not "*.bin": fine-tuned repos ship training_args.bin, a pickle that is no weight file.
_PICKLE_PATTERNS = ("pytorch_model*.bin",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
)
# Config keys for layer count and width across architectures (first present wins).
_LAYER_KEYS = LAYER_KEYS
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
_VOCAB_KEYS = ("vocab_size",)


@dataclass
class LoadedModel:
    """A model ready for forwards, with the facts the rest of the suite asks about."""

    model: torch.nn.Module
    config: Any  # transformers.PretrainedConfig
    num_layers: int
    hidden_size: int
    vocab_size: int
    device: str
    dtype: torch.dtype
    name: str
    path: Path


@dataclass(frozen=True)
class CheckpointFiles:
    """The weight files of a checkpoint: safetensors (preferred) or pickle."""

    path: Path
    format: str  # "safetensors" | "pickle"
    files: tuple[Path, ...]
    index: Path | None  # *.index.json of a sharded checkpoint


# ---------------------------------------------------------------------- sources
def resolve_source(
    spec: ModelSpec,
    *,
    toy_root: Path,
    allow_pickle: bool = False,
    cache_dir: Path | None = None,
) -> Path:
    """Local checkpoint directory for a registry model (building / fetching as needed).

    ``toy:<recipe>`` builds the toy model under ``toy_root``; an existing directory is
    used as-is; ``org/name[@revision]`` goes through the hub cache. With
    ``HF_HUB_OFFLINE=1`` only the cache is consulted (``ModelUnavailable`` if absent).
    ``cache_dir`` defaults to ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, read at call time.
    """
    source = spec.source
    if spec.is_toy:
        from reasondiff.fixtures.toy import ensure_toy_model

        path = Path(ensure_toy_model(toy_root, spec.toy_recipe))
        checkpoint_files(path, allow_pickle=allow_pickle, name=spec.key)
        return path
    local = Path(source).expanduser()
    if local.exists():
        checkpoint_files(local, allow_pickle=allow_pickle, name=spec.key)
        return local
    if not _HUB_ID.match(source):
        raise ModelLoadError(
            f"model {spec.key!r}: {source!r} is neither an existing directory nor a hub id "
            "(org/name or org/name@revision)"
        )
    path = _snapshot(spec.key, source, allow_pickle=allow_pickle, cache_dir=cache_dir)
    checkpoint_files(path, allow_pickle=allow_pickle, name=spec.key)
    return path


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as the environment says *now* (huggingface_hub reads it at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """The hub cache directory from the environment at call time."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _snapshot(key: str, source: str, *, allow_pickle: bool, cache_dir: Path | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = source.partition("@")
    patterns = list(HUB_PATTERNS) + (list(_PICKLE_PATTERNS) if allow_pickle else [])
    offline = hub_offline()
    try:
        out = snapshot_download(
            repo_id,
            revision=revision or None,
            cache_dir=cache_dir or hub_cache_dir(),
            allow_patterns=patterns,
            local_files_only=offline,
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        rev = f" --revision {revision}" if revision else ""
        how = (
            f"fetch it on a machine with network (`hf download {repo_id}{rev}`, or "
            f"`huggingface-cli download {repo_id}{rev}` with older huggingface_hub) and copy "
            "the hub cache here (HF_HOME / HF_HUB_CACHE)"
        )
        if offline:
            how += ", or unset HF_HUB_OFFLINE to download it"
        raise ModelUnavailable(
            f"model {key!r} ({source}) is not available on this machine "
            f"({type(exc).__name__}: {_first_line(exc)}); {how}"
        ) from exc
    return Path(str(out))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------- checks
def read_config(path: Path, *, name: str | None = None) -> dict[str, Any]:
    """config.json of a checkpoint as a dict; ``ModelLoadError`` naming what is wrong."""
    who = f"model {name!r} at {path}" if name else str(path)
    if not path.exists():
        raise ModelLoadError(f"{who}: directory does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{who}: not a directory (expected a checkpoint directory)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{who}: not a checkpoint, config.json is missing")
    try:
        data = json.loads(cfg.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{who}: cannot read config.json: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{who}: config.json is not a JSON object")
    return data


def checkpoint_files(path: Path, *, allow_pickle: bool, name: str | None = None) -> CheckpointFiles:
    """The weight files to read. Safetensors win; pickle only with ``allow_pickle``."""
    read_config(path, name=name)
    who = f"model {name!r} at {path}" if name else str(path)
    st_index = sorted(path.glob("*.safetensors.index.json"))
    st_files = sorted(path.glob("*.safetensors"))
    if st_index or st_files:
        index = st_index[0] if st_index else None
        files = _index_files(index, who) if index is not None else tuple(st_files)
        return CheckpointFiles(path=path, format="safetensors", files=files, index=index)
    bin_index = sorted(path.glob("pytorch_model*.bin.index.json"))
    bin_files = sorted(path.glob("pytorch_model*.bin"))
    if bin_index or bin_files:
        if not allow_pickle:
            raise ModelLoadError(
                f"{who}: only pickle weights ({(bin_index or bin_files)[0].name}), which can run "
                "code when loaded; pass --allow-pickle to load them (with weights_only=True)"
            )
        index = bin_index[0] if bin_index else None
        files = _index_files(index, who) if index is not None else tuple(bin_files)
        return CheckpointFiles(path=path, format="pickle", files=files, index=index)
    raise ModelLoadError(
        f"{who}: no weight files (expected model.safetensors, a sharded "
        "model.safetensors.index.json, or pytorch_model.bin with --allow-pickle)"
    )


def _index_files(index: Path, who: str) -> tuple[Path, ...]:
    try:
        data = json.loads(index.read_text("utf-8"))
        weight_map = data["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{who}: unreadable shard index {index.name}: {exc!r}") from exc
    files = tuple(index.parent / n for n in names)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{who}: shard(s) listed in {index.name} are missing: {missing}")
    return files


def _check_safetensors_headers(files: tuple[Path, ...], *, who: str) -> None:
    """Open each file's header (cheap, no tensor data) so that a truncated or corrupt file
    is a ``ModelLoadError`` naming it, not a bare ``SafetensorError`` from transformers."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as exc:  # SafetensorError, OSError: the file is unusable either way
            raise ModelLoadError(
                f"{who}: cannot read safetensors file {f.name} ({_first_line(exc)}); "
                "it is truncated or corrupt, re-download it"
            ) from exc


def _check_remote_code(cfg: dict[str, Any], *, who: str, trust_remote_code: bool) -> None:
    if cfg.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(
            f"{who}: config.json has auto_map (custom code from the checkpoint, {sorted(cfg['auto_map'])}); "
            "refusing to run it; pass --trust-remote-code if you trust this checkpoint"
        )


def _arch_value(cfg: Any, keys: tuple[str, ...]) -> int | None:
    """First of ``keys`` in a config dict / object, looking into ``text_config`` too."""
    for holder in (cfg, _get(cfg, "text_config")):
        if holder is None:
            continue
        for k in keys:
            v = _get(holder, k)
            if isinstance(v, int):
                return v
    return None


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def check_compatible(
    base: LoadedModel | Any, desc: LoadedModel | Any, *, base_name: str, desc_name: str
) -> None:
    """Raise ``ArchitectureMismatch`` unless layer count and hidden size agree.

    Accepts ``LoadedModel`` objects, transformers configs or config dicts, so that it
    can run before any forward (and, via ``check_compatible_configs``, before loading).
    """
    a = base.config if isinstance(base, LoadedModel) else base
    b = desc.config if isinstance(desc, LoadedModel) else desc
    for what, keys in (("decoder layers", _LAYER_KEYS), ("hidden size", _HIDDEN_KEYS)):
        va, vb = _arch_value(a, keys), _arch_value(b, keys)
        if va is None or vb is None:
            missing = base_name if va is None else desc_name
            raise ArchitectureMismatch(
                f"cannot compare {base_name} and {desc_name}: {missing}'s config has no "
                f"{what} (looked for {', '.join(keys)})"
            )
        if va != vb:
            raise ArchitectureMismatch(
                f"cannot compare layer by layer: {what} differ, base {base_name} has {va}, "
                f"descendant {desc_name} has {vb}"
            )


def check_compatible_configs(path_a: Path, path_b: Path, *, base_name: str, desc_name: str) -> None:
    """``check_compatible`` from config.json alone, before any weights are read."""
    check_compatible(
        read_config(path_a, name=base_name),
        read_config(path_b, name=desc_name),
        base_name=base_name,
        desc_name=desc_name,
    )


# ---------------------------------------------------------------------- loading
def pick_device(device: str) -> str:
    """Concrete torch device. ``auto``: cuda if present; under xdist, worker i -> GPU i mod n."""
    if device not in ("auto", "cuda") and not device.startswith(("cuda:", "cpu", "mps")):
        raise ModelLoadError(f"unknown device {device!r} (expected auto, cpu, cuda or cuda:<i>)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available here")
    if device == "cuda":
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        match = re.fullmatch(r"gw(\d+)", worker)
        index = int(match.group(1)) % torch.cuda.device_count() if match else 0
        device = f"cuda:{index}"
    return device


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a resolved dtype name (see :func:`resolve_dtype`)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelLoadError(
            f"unknown dtype {name!r} (expected auto, {', '.join(_DTYPES)})"
        ) from None


def load_model(
    path: Path,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a checkpoint in eval mode; causal LMs keep their LM head, others use AutoModel.

    ``dtype="auto"`` is the checkpoint's config dtype on CUDA and float32 on CPU (bf16
    matmuls are ~40x slower there): :func:`resolve_dtype`, the same function that keys the
    activation cache. ``progress`` receives one status line; without it a rich spinner is shown
    on an interactive stderr outside xdist.
    """
    path = Path(path)
    name = name or path.name
    who = f"model {name!r} at {path}"
    cfg_dict = read_config(path, name=name)
    _check_remote_code(cfg_dict, who=who, trust_remote_code=trust_remote_code)
    files = checkpoint_files(path, allow_pickle=allow_pickle, name=name)
    if files.format == "safetensors":
        _check_safetensors_headers(files.files, who=who)
    dev = pick_device(device)
    dtype_obj = torch_dtype(resolve_dtype(dtype, dev, cfg_dict))

    import pickle

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    with _status(f"loading {name} ({dev}, {str(dtype_obj).removeprefix('torch.')})", progress):
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (ValueError, KeyError, OSError) as exc:
            raise ModelLoadError(f"{who}: transformers cannot read its config: {exc}") from exc
        archs = list(getattr(config, "architectures", None) or [])
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
        auto_cls = AutoModelForCausalLM if causal else AutoModel
        try:
            model: Any = auto_cls.from_pretrained(
                path,
                config=config,
                dtype=dtype_obj,
                trust_remote_code=trust_remote_code,
                use_safetensors=files.format == "safetensors",
                weights_only=True,
            )
        except pickle.UnpicklingError as exc:
            names = ", ".join(f.name for f in files.files)
            raise ModelLoadError(
                f"{who}: refusing pickle weights {names}: they hold more than plain tensors "
                f"(weights_only=True rejected them: {_first_line(exc)}); convert the checkpoint "
                "to safetensors from a trusted copy"
            ) from exc
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            raise ModelLoadError(
                f"{who}: {auto_cls.__name__} cannot load it (architectures {archs or 'unset'}): {exc}"
            ) from exc
        model.to(dev)
        model.eval()
    num_layers = _arch_value(config, _LAYER_KEYS)
    hidden = _arch_value(config, _HIDDEN_KEYS)
    vocab = _arch_value(config, _VOCAB_KEYS)
    if num_layers is None or hidden is None or vocab is None:
        raise ModelLoadError(
            f"{who}: config lacks layer count / hidden size / vocab size "
            f"(got {num_layers}, {hidden}, {vocab})"
        )
    return LoadedModel(
        model=model,
        config=config,
        num_layers=num_layers,
        hidden_size=hidden,
        vocab_size=vocab,
        device=dev,
        dtype=dtype_obj,
        name=name,
        path=path,
    )


def load_tokenizer(path: Path, *, trust_remote_code: bool = False) -> Any | None:
    """The checkpoint's tokenizer, or None when it ships none."""
    path = Path(path)
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer at {path}: {exc}") from exc


@contextlib.contextmanager
def _status(message: str, progress: Callable[[str], None] | None) -> Iterator[None]:
    """Tell the user what is loading: via ``progress``, or a spinner on a real terminal."""
    if progress is not None:
        progress(message)
        yield
        return
    if sys.stderr.isatty() and "PYTEST_XDIST_WORKER" not in os.environ:
        from rich.console import Console

        with Console(stderr=True).status(message):
            yield
        return
    yield
