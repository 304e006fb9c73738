"""Trace sets: the token sequences both models of a pair see (METHODS §1).

A trace set is a JSONL file, one trace per line::

    {"reasondiff_traces": 1, "name": "toy-a", "tokenizer": "sha256:..."}   <- optional header
    {"id": "a-000", "text": "<|bos|>user: ...", "token_ids": [1, 52, 6, ...]}

The optional first line names the set and the identity of the tokenizer that produced
``token_ids`` (:func:`tokenizer_identity`, a content hash; ``null`` = unknown). Without
a header the set is named after the file and its tokenizer is unknown. A set written by
``reasondiff-traces`` also records its provenance in the header (``generator``,
``recipe``, ``decoding``, ``dtype``, ``batch_size``, ``backend``, ``reasondiff_version``;
:data:`PROVENANCE_KEYS`); :func:`trace_set_generator` names the generator in one string.

Resumable writing (:class:`TraceAppender`, :func:`read_partial`): the header goes first,
each finished trace is appended, flushed and fsync'd, so a killed run loses at most the
traces in flight; a half-written last line is dropped with a note on resume.
Contract for ``text``: it is the full decoded sequence *including* special tokens
(BOS, ``<think>``), so ``tokenizer(text, add_special_tokens=False)`` reproduces
``token_ids`` -- that is how a set is re-tokenized for a model with another tokenizer.

This module reads, writes, validates, truncates and re-tokenizes; it does not load
models and does not generate traces (``reasondiff.generate`` does).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .diskcheck import file_mode
from .errors import TokenizerMismatch, TraceError

HEADER_KEY = "reasondiff_traces"
FORMAT_VERSION = 1
#: Debiased CKA needs N > 3 tokens (METHODS §2); shorter traces are refused on load.
MIN_TRACE_TOKENS = 4
#: Header keys ``reasondiff-traces`` adds to say how a set was made.
PROVENANCE_KEYS = (
    "generator",
    "recipe",
    "decoding",
    "backend",
    "dtype",
    "batch_size",
    "problems_from",
    "reasondiff_version",
)


@dataclass(frozen=True)
class Trace:
    """One token sequence; ``text`` is for display and re-tokenization."""

    id: str
    text: str
    token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.token_ids, tuple):
            object.__setattr__(self, "token_ids", tuple(self.token_ids))

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class TraceSet:
    """Named, ordered traces plus the identity of the tokenizer behind their ids."""

    name: str
    traces: tuple[Trace, ...]
    tokenizer: str | None = None
    #: the header's provenance keys (:data:`PROVENANCE_KEYS`) when it has any
    provenance: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.traces, tuple):
            object.__setattr__(self, "traces", tuple(self.traces))

    def __len__(self) -> int:
        return len(self.traces)

    def __iter__(self) -> Iterator[Trace]:
        return iter(self.traces)

    @property
    def ids(self) -> list[str]:
        return [t.id for t in self.traces]


# ---------------------------------------------------------------- identity and hash
def tokenizer_identity(tokenizer: Any) -> str:
    """A content hash of what maps text to ids (not the chat template, not the path).

    Two tokenizers with the same identity produce the same ids for every text, so a
    trace set made with one needs no re-tokenization for the other.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    elif hasattr(tokenizer, "get_vocab"):
        payload = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    else:
        raise TraceError(
            f"cannot identify tokenizer of type {type(tokenizer).__name__}: "
            "it has neither a backend_tokenizer nor get_vocab()"
        )
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def trace_set_hash(trace_set: TraceSet) -> str:
    """Content hash of the trace ids and token ids, in order (for cache keys).

    The name, text and tokenizer identity are left out: two sets with the same tokens
    give the same activations.
    """
    h = hashlib.sha256()
    for t in trace_set.traces:
        h.update(t.id.encode("utf-8"))
        h.update(b"\0")
        h.update(",".join(map(str, t.token_ids)).encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- load / save
def iter_jsonl_objects(
    path: str | os.PathLike[str], *, what: str
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """``(where, lineno, object)`` for each non-blank line of a JSONL file of objects.

    Shared by every JSONL reader (trace sets, problem files) so that each error names
    the file and line the same way; ``what`` names the kind of file in messages.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TraceError(f"{what} file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read {what} file {p}: {exc}") from exc
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, lineno, obj


def load_trace_set(path: str | os.PathLike[str], *, name: str | None = None) -> TraceSet:
    """Read and validate a JSONL trace set; every error names the file and line."""
    p = Path(path)
    set_name, tokenizer = p.stem, None
    provenance: dict[str, Any] | None = None
    traces: list[Trace] = []
    seen: dict[str, int] = {}
    for where, lineno, obj in iter_jsonl_objects(p, what="trace set"):
        if HEADER_KEY in obj:
            if traces or seen:
                raise TraceError(f"{where}: the header line ({HEADER_KEY!r}) must come first")
            set_name, tokenizer = _parse_header(obj, where, default_name=set_name)
            provenance = {k: obj[k] for k in PROVENANCE_KEYS if k in obj} or None
            continue
        trace = _parse_trace(obj, where)
        if trace.id in seen:
            raise TraceError(
                f"{where}: duplicate trace id {trace.id!r} (first on line {seen[trace.id]})"
            )
        seen[trace.id] = lineno
        traces.append(trace)
    if not traces:
        raise TraceError(f"trace set file {p} contains no traces")
    return TraceSet(
        name=name or set_name, traces=tuple(traces), tokenizer=tokenizer, provenance=provenance
    )


def trace_set_generator(trace_set: TraceSet) -> str:
    """The model that generated the set, for reports: ``key (source, fingerprint 1a2b..)``."""
    gen = (trace_set.provenance or {}).get("generator")
    if not isinstance(gen, dict):
        return "unknown (no provenance in the trace set's header)"
    key, source = gen.get("key"), gen.get("source")
    fp = str(gen.get("fingerprint") or "")[:12]
    who = str(key or source or "unknown")
    details = [str(source)] if source and source != key else []
    if fp:
        details.append(f"fingerprint {fp}")
    return f"{who} ({', '.join(details)})" if details else who


#: How a pair's notes say which model generated a trace set (read back by
#: :func:`generators_from_notes` for the bundle's config).
_GENERATOR_NOTE = re.compile(r"^trace set (?P<name>[^:]+): generated by (?P<gen>.+)$")


def generator_note(name: str, trace_set: TraceSet) -> str:
    """The pair note naming the set's generator: ``trace set a: generated by ...``."""
    return f"trace set {name}: generated by {trace_set_generator(trace_set)}"


def generators_from_notes(notes: Iterable[str]) -> dict[str, str]:
    """``{trace set: generator}`` from :func:`generator_note` lines (bundle config)."""
    found: dict[str, str] = {}
    for note in notes:
        m = _GENERATOR_NOTE.match(note)
        if m is not None:
            found.setdefault(m.group("name"), m.group("gen"))
    return found


def _parse_header(obj: dict[str, Any], where: str, *, default_name: str) -> tuple[str, str | None]:
    version = obj[HEADER_KEY]
    if version != FORMAT_VERSION:
        raise TraceError(
            f"{where}: trace set format version {version!r} is not supported (expected {FORMAT_VERSION})"
        )
    name = obj.get("name", default_name)
    tokenizer = obj.get("tokenizer")
    if not isinstance(name, str) or not name:
        raise TraceError(f"{where}: header 'name' must be a non-empty string, got {name!r}")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise TraceError(f"{where}: header 'tokenizer' must be a string or null, got {tokenizer!r}")
    return name, tokenizer


def _parse_trace(obj: dict[str, Any], where: str) -> Trace:
    missing = [k for k in ("id", "text", "token_ids") if k not in obj]
    if missing:
        raise TraceError(
            f"{where}: trace is missing key(s) {', '.join(missing)} "
            f"(expected id, text, token_ids; found {', '.join(sorted(obj)) or 'none'})"
        )
    tid, text, ids = obj["id"], obj["text"], obj["token_ids"]
    if not isinstance(tid, str) or not tid:
        raise TraceError(f"{where}: trace 'id' must be a non-empty string, got {tid!r}")
    if not isinstance(text, str):
        raise TraceError(
            f"{where}: trace {tid!r}: 'text' must be a string, got {type(text).__name__}"
        )
    if not isinstance(ids, list):
        raise TraceError(
            f"{where}: trace {tid!r}: 'token_ids' must be a list, got {type(ids).__name__}"
        )
    for pos, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise TraceError(
                f"{where}: trace {tid!r}: token_ids[{pos}] = {t!r} is not a non-negative integer"
            )
    if not ids:
        raise TraceError(f"{where}: trace {tid!r} is empty (no token_ids)")
    if len(ids) < MIN_TRACE_TOKENS:
        raise TraceError(
            f"{where}: trace {tid!r} has {len(ids)} tokens; at least {MIN_TRACE_TOKENS} are needed "
            "(debiased CKA needs N > 3)"
        )
    return Trace(id=tid, text=text, token_ids=tuple(ids))


def make_header(trace_set: TraceSet) -> dict[str, Any]:
    """The header line of ``trace_set``: format, name, tokenizer, then its provenance."""
    header: dict[str, Any] = {
        HEADER_KEY: FORMAT_VERSION,
        "name": trace_set.name,
        "tokenizer": trace_set.tokenizer,
    }
    header.update(trace_set.provenance or {})
    return header


def _trace_line(t: Trace) -> str:
    row = {"id": t.id, "text": t.text, "token_ids": list(t.token_ids)}
    return json.dumps(row, ensure_ascii=False) + "\n"


def save_trace_set(path: str | os.PathLike[str], trace_set: TraceSet) -> None:
    """Write ``trace_set`` (with a header line) atomically: temp file, then ``os.replace``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    header = make_header(trace_set)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(header, ensure_ascii=False) + "\n")
            for t in trace_set.traces:
                fh.write(_trace_line(t))
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; a shared cache's users read it
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- resumable writing
@dataclass(frozen=True)
class PartialSet:
    """What an interrupted (or finished) run left in its output file."""

    header: dict[str, Any]
    traces: tuple[Trace, ...]
    #: byte length of the intact part (a half-written last line is not in it)
    good_bytes: int
    notes: tuple[str, ...] = ()


def read_partial(path: str | os.PathLike[str]) -> PartialSet | None:
    """The header and intact traces of an output file; ``None`` if it does not exist.

    Only the *last* line may be broken (no newline, or not JSON): that is what a kill
    during a write leaves, and it is dropped with a note. Any other damage, or a file
    without a ``reasondiff-traces`` header, is a :class:`TraceError` -- resuming onto it
    could mix two runs.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TraceError(f"cannot read trace set file {p}: {exc}") from exc
    lines = data.split(b"\n")
    tail = lines.pop()  # bytes after the last newline: b"" unless a write was cut short
    notes: list[str] = []
    good = len(data) - len(tail)
    if tail:
        notes.append(
            f"{p}: dropped a half-written last line ({len(tail)} bytes, no newline): "
            "that trace is generated again"
        )
    header: dict[str, Any] | None = None
    traces: list[Trace] = []
    offset = 0
    for lineno, raw in enumerate(lines, start=1):
        where = f"{p}:{lineno}"
        end = offset + len(raw) + 1
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None
        if obj is None and lineno == len(lines) and header is not None:
            notes.append(f"{where}: dropped a half-written last line ({len(raw)} bytes)")
            good = offset
            break
        if not isinstance(obj, dict):
            raise TraceError(
                f"{where}: not a trace set line; cannot resume onto this file "
                "(remove it or choose another --out)"
            )
        if header is None:
            if HEADER_KEY not in obj or "generator" not in obj:
                raise TraceError(
                    f"{p} exists but was not written by reasondiff-traces (its first line is "
                    "not a header with provenance); remove it or choose another --out"
                )
            _parse_header(obj, where, default_name=p.stem)
            header = obj
        else:
            traces.append(_parse_trace(obj, where))
        offset = end
    if header is None:
        if good == 0:  # killed before the header was complete: nothing to keep
            return PartialSet(header={}, traces=(), good_bytes=0, notes=tuple(notes))
        raise TraceError(f"{p} has no header line; remove it or choose another --out")
    return PartialSet(header=header, traces=tuple(traces), good_bytes=good, notes=tuple(notes))


def header_mismatch(
    found: dict[str, Any], wanted: dict[str, Any], keys: Sequence[str]
) -> str | None:
    """The first of ``keys`` whose value differs, as ``key: file has X, this run Y``."""
    for key in keys:
        if found.get(key) != wanted.get(key):
            a = json.dumps(found.get(key), sort_keys=True)
            b = json.dumps(wanted.get(key), sort_keys=True)
            return f"{key}: the file has {a}, this run has {b}"
    return None


class TraceAppender:
    """Appends traces to an output file, each flushed and fsync'd when written.

    The first ``keep_bytes`` of an existing file are kept (0: start afresh with ``header``);
    anything after them (a half-written line) is cut off first.
    """

    def __init__(
        self, path: str | os.PathLike[str], header: dict[str, Any], *, keep_bytes: int = 0
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_bytes > 0:
            self._fh = open(self.path, "r+b")  # noqa: SIM115 -- closed in close()
            self._fh.truncate(keep_bytes)
            self._fh.seek(keep_bytes)
        else:
            self._fh = open(self.path, "w+b")  # noqa: SIM115
            os.chmod(self.path, file_mode())
            self._write(json.dumps(header, ensure_ascii=False) + "\n")

    def _write(self, line: str) -> None:
        self._fh.write(line.encode("utf-8"))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def append(self, trace: Trace) -> None:
        self._write(_trace_line(trace))

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> TraceAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- transforms
def truncate(trace_set: TraceSet, max_tokens: int) -> tuple[TraceSet, list[str]]:
    """Cut every trace to its first ``max_tokens`` ids; one visible note per cut trace.

    ``text`` is kept whole (it is for display); only ``token_ids`` are cut.
    """
    if max_tokens < MIN_TRACE_TOKENS:
        raise TraceError(
            f"--max-tokens {max_tokens} is too small; at least {MIN_TRACE_TOKENS} tokens are needed"
        )
    notes: list[str] = []
    out: list[Trace] = []
    for t in trace_set.traces:
        if len(t.token_ids) > max_tokens:
            notes.append(
                f"trace {t.id!r} of set {trace_set.name!r} has {len(t.token_ids)} tokens; "
                f"truncated to the first {max_tokens} (--max-tokens)"
            )
            t = replace(t, token_ids=t.token_ids[:max_tokens])
        out.append(t)
    return replace(trace_set, traces=tuple(out)), notes


def token_ids_for_pair(
    trace_set: TraceSet,
    base_tokenizer: Any,
    desc_tokenizer: Any,
    *,
    base_name: str,
    desc_name: str,
    vocab_size_base: int | None,
    vocab_size_desc: int | None,
) -> tuple[TraceSet, list[str]]:
    """The token ids both models of a pair will see, checked, and a note per change.

    The stored ``token_ids`` are authoritative (METHODS §1): they are what the trace was
    generated as, and re-encoding the text may split it differently. They are kept when
    the set's tokenizer identity is the base's, or when the base's tokenizer maps them to
    tokens that spell the trace's text (``decode(ids) == text``, or encoding the text
    gives these very ids). Only when the base maps the stored ids to other tokens is the
    text re-tokenized with the base's tokenizer, with one note per re-tokenized trace. A
    trace without text cannot be checked: its ids are used as stored, with a note.

    Agreement with the descendant is checked on the ids actually used: base and
    descendant tokenizers must map each used id to the same token string, else
    :class:`TokenizerMismatch` naming both models, the trace, the first position and
    both tokens. Tokenizer files that differ only in bytes, or in tokens the traces do
    not use, therefore agree. Ids outside either model's embedding table raise
    :class:`TraceError` (a vocab size of ``None`` skips that check).
    ``desc_tokenizer=None`` means the descendant uses the base's tokenizer.
    """
    base_ident = tokenizer_identity(base_tokenizer)
    desc_ident = base_ident if desc_tokenizer is None else tokenizer_identity(desc_tokenizer)
    out: list[Trace] = []
    notes: list[str] = []
    base_pieces: dict[int, Any] = {}
    desc_pieces: dict[int, Any] = {}
    for t in trace_set.traces:
        ids = t.token_ids
        if trace_set.tokenizer != base_ident:
            if not t.text:
                notes.append(
                    f"trace {t.id!r} of set {trace_set.name!r} has no text, so its stored "
                    f"token ids could not be checked against the tokens of base {base_name!r}; "
                    "used as stored"
                )
            elif not _spells_text(base_tokenizer, t):
                ids = _encode(base_tokenizer, t, model=base_name)
                notes.append(
                    f"trace {t.id!r} of set {trace_set.name!r}: its stored token ids are not "
                    f"tokens of base {base_name!r} (they do not spell its text), so the text "
                    f"was re-tokenized with the base's tokenizer ({len(t.token_ids)} -> "
                    f"{len(ids)} tokens)"
                )
        if desc_ident != base_ident:
            _check_same_tokens(
                t,
                ids,
                base_tokenizer,
                desc_tokenizer,
                base_name,
                desc_name,
                base_pieces,
                desc_pieces,
            )
        _check_vocab(t.id, ids, base_name, vocab_size_base)
        _check_vocab(t.id, ids, desc_name, vocab_size_desc)
        out.append(t if ids == t.token_ids else replace(t, token_ids=ids))
    return TraceSet(name=trace_set.name, traces=tuple(out), tokenizer=base_ident), notes


def _spells_text(tokenizer: Any, trace: Trace) -> bool:
    """Do the stored ids, read with this tokenizer, give the trace's text back?"""
    ids = list(trace.token_ids)
    try:
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    except (IndexError, KeyError, OverflowError, TypeError, ValueError):
        text = None  # an id the tokenizer does not know
    if text == trace.text:
        return True
    encoded = tokenizer(trace.text, add_special_tokens=False)["input_ids"]
    return [int(i) for i in encoded] == ids


def _pieces(tokenizer: Any, ids: Sequence[int], memo: dict[int, Any]) -> list[Any]:
    """Token string of each id (None for an id the tokenizer does not know), memoized."""
    todo = sorted({int(i) for i in ids if int(i) not in memo})
    if todo:
        got = tokenizer.convert_ids_to_tokens(todo)
        memo.update(zip(todo, got, strict=True))
    return [memo[int(i)] for i in ids]


def _check_same_tokens(
    trace: Trace,
    ids: Sequence[int],
    base_tok: Any,
    desc_tok: Any,
    base_name: str,
    desc_name: str,
    base_memo: dict[int, Any],
    desc_memo: dict[int, Any],
) -> None:
    """Both tokenizers map every used id to the same token string, else a named mismatch."""
    base_pieces = _pieces(base_tok, ids, base_memo)
    desc_pieces = _pieces(desc_tok, ids, desc_memo)
    for pos, (a, b) in enumerate(zip(base_pieces, desc_pieces, strict=True)):
        if a != b:
            raise TokenizerMismatch(
                f"tokenizers of base {base_name!r} and descendant {desc_name!r} disagree on "
                f"trace {trace.id!r} at position {pos}: token id {ids[pos]} is {a!r} for the "
                f"base and {b!r} for the descendant; both models must read the trace's ids "
                "as the same tokens"
            )


def _encode(tokenizer: Any, trace: Trace, *, model: str) -> tuple[int, ...]:
    if not trace.text:
        raise TraceError(
            f"trace {trace.id!r} has no text, so it cannot be re-tokenized for model {model!r}"
        )
    ids = tuple(int(i) for i in tokenizer(trace.text, add_special_tokens=False)["input_ids"])
    if len(ids) < MIN_TRACE_TOKENS:
        raise TraceError(
            f"trace {trace.id!r} re-tokenized for model {model!r} has {len(ids)} tokens; "
            f"at least {MIN_TRACE_TOKENS} are needed"
        )
    return ids


def _check_vocab(trace_id: str, ids: Sequence[int], model: str, vocab_size: int | None) -> None:
    if vocab_size is None:
        return
    for pos, tok in enumerate(ids):
        if tok >= vocab_size:
            raise TraceError(
                f"trace {trace_id!r}: token id {tok} at position {pos} is outside the "
                f"vocabulary of model {model!r} (vocab size {vocab_size})"
            )
