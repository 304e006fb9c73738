"""The engine's model pool: runtime, checkpoint dirs, fingerprints, configs, models, tokenizers.

One place that knows where a model lives, what dtype it runs in, how much memory it takes
and whether it is loaded. Everything is memoized per process; nothing here computes a
metric or touches the metric cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .records import config_num_layers
from .registry import ModelSpec
from .runlog import RunLog

if TYPE_CHECKING:
    from .engine_config import EngineConfig

#: Bytes per element of the dtypes a checkpoint is stored or run in.
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


class ModelPool:
    """Resolves, fingerprints, loads and evicts models for one engine."""

    def __init__(self, config: EngineConfig, log: RunLog, *, worker_count: int | None) -> None:
        self.config = config
        self.log = log
        self.worker_count = worker_count
        self._models: dict[str, Any] = {}
        self._paths: dict[str, Path] = {}
        self._fingerprints: dict[Path, str] = {}
        self._configs: dict[Path, dict[str, Any]] = {}
        self._checked: dict[tuple[Path, Path], Exception | None] = {}
        self._tokenizers: dict[Path, Any] = {}
        self._torch_ready = False
        self._device: str | None = None

    # ------------------------------------------------------------------ runtime
    def configure_torch(self) -> None:
        """Set torch's CPU threads once: ``torch_threads``, or cores / workers under xdist.

        xdist workers each running torch's default thread count oversubscribe the CPU,
        and OpenMP threads that spin-wait on a busy machine make small matrices many
        times slower than one thread.
        """
        if self._torch_ready:
            return
        self._torch_ready = True
        threads = self.config.torch_threads
        if threads is None and self.worker_count:
            threads = max(1, _cpu_count() // self.worker_count)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)

    @property
    def device(self) -> str:
        """The concrete torch device (``auto`` resolved; worker i -> GPU i mod n)."""
        if self._device is None:
            from .models import pick_device

            self._device = pick_device(self.config.device)
        return self._device

    @property
    def toy_root(self) -> Path:
        """``cache_dir/toy``, or a temporary dir when the cache cannot hold the toy family."""
        from .diskcheck import toy_root

        return toy_root(self.config.cache_dir)

    def memory_budget(self) -> int | None:
        """Bytes of models a pass may add: 80% of the free device memory (CUDA) or of the
        available host memory (CPU), which loaded models are already out of; the other
        20% is for one trace's hidden states and the metric scratch. None when it cannot
        be read (then no limit)."""
        try:
            if self.device.startswith("cuda"):
                import torch

                free, _ = torch.cuda.mem_get_info(torch.device(self.device))
                return int(0.8 * free)
            pages = os.sysconf("SC_AVPHYS_PAGES")
            return int(0.8 * pages * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, RuntimeError, AttributeError):
            return None

    # ------------------------------------------------------------------ checkpoints
    def resolve(self, spec: ModelSpec) -> Path:
        """The local checkpoint dir of a model (toy models built, hub ids downloaded)."""
        if spec.key not in self._paths:
            from .models import resolve_source

            with self.log.stage("resolve"):
                self._paths[spec.key] = Path(resolve_source(spec, toy_root=self.toy_root))
        return self._paths[spec.key]

    def fingerprint(self, path: Path) -> str:
        """Content fingerprint, memoized in-process and on disk (by path, size, mtime)."""
        if path not in self._fingerprints:
            from .fingerprint import fingerprint

            with self.log.stage("resolve"):
                self._fingerprints[path] = fingerprint(
                    path, memo_dir=self.config.cache_dir / "fingerprints"
                )
        return self._fingerprints[path]

    def read_config(self, path: Path, name: str) -> dict[str, Any]:
        """A checkpoint's config.json, ``text_config`` merged in (memoized per dir)."""
        if path not in self._configs:
            self._configs[path] = read_config(path, name)
        return self._configs[path]

    def num_layers(self, path: Path, name: str) -> int:
        """L, the decoder blocks of a checkpoint (hidden-state layers are 0..L)."""
        return config_num_layers(self.read_config(path, name))

    def check_pair(self, base_dir: Path, desc_dir: Path, *, base: str, desc: str) -> None:
        """Refuse a base / descendant whose configs cannot be compared (once per pair)."""
        from .models import check_compatible

        pair = (base_dir, desc_dir)
        if pair not in self._checked:
            try:
                check_compatible(
                    self.read_config(base_dir, base),
                    self.read_config(desc_dir, desc),
                    base_name=base,
                    desc_name=desc,
                )
                self._checked[pair] = None
            except Exception as exc:
                self._checked[pair] = exc
        error = self._checked[pair]
        if error is not None:
            raise error

    def dtype_for(self, model_dir: Path) -> str:
        """The dtype activations of this checkpoint are computed in: one place for the
        cache key and the loader (``auto``: float32 on CPU, the checkpoint's own on CUDA)."""
        from .dtypes import resolve_dtype

        cfg = self.read_config(model_dir, model_dir.name)
        return resolve_dtype(self.config.dtype, self.device, cfg)

    def model_bytes(self, path: Path) -> int:
        """Memory a checkpoint takes once loaded: its weight files, rescaled from the dtype
        it is stored in to the dtype it runs in (an estimate; buffers are small)."""
        from .dtypes import checkpoint_dtype

        files = [p for p in path.glob("*.safetensors")] or list(path.glob("pytorch_model*.bin"))
        stored = sum(p.stat().st_size for p in files)
        src = checkpoint_dtype(self.read_config(path, path.name)) or "float32"
        return int(stored * _ITEMSIZE.get(self.dtype_for(path), 4) / _ITEMSIZE.get(src, 4))

    # ------------------------------------------------------------------ loaded objects
    def is_loaded(self, key: str) -> bool:
        return key in self._models

    @property
    def loaded(self) -> tuple[str, ...]:
        """Keys of the models held now."""
        return tuple(self._models)

    def model(self, spec: ModelSpec, path: Path) -> Any:
        """Load a model at most once (kept until its pair or pass is done)."""
        if spec.key not in self._models:
            from .models import load_model

            with self.log.stage("load"):
                self._models[spec.key] = load_model(
                    path,
                    device=self.device,
                    dtype=self.dtype_for(path),
                    trust_remote_code=self.config.trust_remote_code,
                    allow_pickle=self.config.allow_pickle,
                    name=spec.key,
                )
        return self._models[spec.key]

    def keep_only(self, key: str) -> None:
        """Drop every loaded model but ``key`` (the next pair likely shares its base)."""
        for other in [k for k in self._models if k != key]:
            del self._models[other]

    def release(self) -> None:
        """Drop every loaded model (frees host / device memory)."""
        self._models.clear()

    def tokenizer(self, path: Path) -> Any:
        if path not in self._tokenizers:
            from .tokenizer import load_fast_tokenizer

            with self.log.stage("tokenize"):
                self._tokenizers[path] = load_fast_tokenizer(
                    path, trust_remote_code=self.config.trust_remote_code
                )
        return self._tokenizers[path]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def read_config(path: Path, name: str) -> dict[str, Any]:
    """A checkpoint's config.json, ``text_config`` merged in (multimodal configs)."""
    from .models import read_config as read

    data = read(path, name=name)
    inner = data.get("text_config")
    return {**data, **inner} if isinstance(inner, dict) else data
