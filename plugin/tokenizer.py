"""Loading a checkpoint's tokenizer in milliseconds, without importing transformers.

``AutoTokenizer.from_pretrained`` imports transformers, and with it torch: ~4 s on a
2-core machine and ~10 s on a GPU box, charged to whichever stage loads the first
tokenizer (a report once blamed "tokenize" for 11.6 s of one 4k-token trace). The suite
only needs ids <-> tokens and plain encoding, which ``tokenizers.Tokenizer.from_file``
gives from ``tokenizer.json`` alone. :class:`FastTokenizer` exposes the few
``PreTrainedTokenizerFast`` methods the suite calls, with the same results.
Checkpoints without a ``tokenizer.json`` (sentencepiece-only, remote code) fall back to
``AutoTokenizer`` through :func:`reasondiff.models.load_tokenizer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ModelLoadError


class FastTokenizer:
    """A ``tokenizers.Tokenizer`` with the slice of the transformers API the suite uses."""

    def __init__(self, backend: Any, *, name_or_path: str) -> None:
        self.backend_tokenizer = backend
        self.name_or_path = name_or_path

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(
            self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        )

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> Any:
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> Any:
        if isinstance(tokens, str):
            return self.backend_tokenizer.token_to_id(tokens)
        return [self.backend_tokenizer.token_to_id(t) for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        return dict(self.backend_tokenizer.get_vocab(with_added_tokens=True))

    def __len__(self) -> int:
        return int(self.backend_tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def vocab_size(self) -> int:
        return int(self.backend_tokenizer.get_vocab_size(with_added_tokens=False))

    def __repr__(self) -> str:
        return f"FastTokenizer({self.name_or_path!r})"


def load_fast_tokenizer(path: Path | str, *, trust_remote_code: bool = False) -> Any | None:
    """The checkpoint's tokenizer: from ``tokenizer.json`` when there is one, else
    ``AutoTokenizer`` (None when the checkpoint ships no tokenizer at all)."""
    path = Path(path)
    file = path / "tokenizer.json"
    if file.is_file():
        from tokenizers import Tokenizer

        try:
            return FastTokenizer(Tokenizer.from_file(str(file)), name_or_path=str(path))
        except Exception as exc:  # the Rust library raises plain Exception subclasses
            raise ModelLoadError(f"cannot load the tokenizer {file}: {exc}") from exc
    from .models import load_tokenizer

    return load_tokenizer(path, trust_remote_code=trust_remote_code)
