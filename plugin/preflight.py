"""Up-front checks of a run's options against its inputs: one clear error before the work.

Pure functions, no pytest, no torch: each takes plain values and raises a
:class:`~reasondiff.errors.ReasondiffError` subclass (or returns a note) naming the
option that bounds the problem. They run once per run, from ``DiffSession.create`` (the
pytest plugin) and at the top of ``reasondiff.api.compare``, before any model is
loaded; the engine's own checks stay as the last line of defence.

- :func:`check_replay_options`: options a bundle replay cannot honour (``--layers``,
  ``--max-tokens``, ``--device``, ...) are a usage error; harmless ones get a note.
- :func:`check_dominant_k`: ``--dominant-k`` against the shortest trace.
- :func:`check_layers`: ``--layers`` against the models' depth.
- :func:`check_max_tokens`: the one ``--max-tokens`` rule (an integer >= the minimum).
- :func:`rbf_budget_note`: RBF CKA's N x N kernel work and memory against a budget.
- :func:`check_threads`: ``--torch-threads`` bounded by a multiple of the CPU count.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelUnavailable, ReasondiffError
from .metrics.defaults import MIN_ROWS_LEFT
from .traces import MIN_TRACE_TOKENS

if TYPE_CHECKING:
    from .registry import ModelSpec, PairSpec

__all__ = [
    "MAX_THREADS_PER_CPU",
    "MIN_MAX_TOKENS",
    "RBF_BUDGET_BYTES",
    "REPLAY_IGNORED",
    "REPLAY_REFUSED",
    "PreflightError",
    "check_compare_arguments",
    "check_dominant_k",
    "check_layers",
    "check_max_tokens",
    "check_replay_options",
    "check_run",
    "check_threads",
    "max_threads",
    "rbf_budget_note",
    "rbf_cost",
]


class PreflightError(ReasondiffError):
    """An option that cannot work with this run's inputs (a usage error)."""


#: Options that change what is measured: a replay has the bundle's numbers, so these
#: cannot be honoured and are refused (flag -> why).
REPLAY_REFUSED: dict[str, str] = {
    "--model-group": "the bundle's pairs are replayed, whatever their group",
    "--traces": "the bundle's rows were measured on its own traces",
    "--traces-alt": "the bundle's rows were measured on its own traces",
    "--max-tokens": "the bundle's traces were cut when it was measured",
    "--layers": "the bundle holds the layers it was measured on",
    "--device": "no model is run",
    "--dtype": "no model is run",
    "--pass-size": "no model is run",
    "--dominant-k": "the dominant datapoints were chosen when the bundle was measured",
    "--rbf-median": "the RBF bandwidth was chosen when the bundle was measured",
    "--keep-activations": "no activation is computed",
}

#: Options a replay does not use but that do no harm: a note says they were ignored.
REPLAY_IGNORED = (
    "--torch-threads",
    "--diff-cache",
    "--diff-cache-cap",
    "--require-models",
    "--allow-pickle",
    "--trust-remote-code",
    "--stream-blocks",  # how weights are read, not what is measured; none are read
)


def check_replay_options(given: Iterable[str], bundle: str) -> list[str]:
    """Refuse the command-line flags in ``given`` that a replay of ``bundle`` cannot honour.

    Returns the notes for the flags that are merely ignored. Ini values are not passed
    here: a project's ini file may set ``device`` or ``max_tokens`` for its live runs.
    """
    flags = list(dict.fromkeys(given))
    refused = [f for f in flags if f in REPLAY_REFUSED]
    if refused:
        reasons = "; ".join(f"{f}: {REPLAY_REFUSED[f]}" for f in refused)
        raise PreflightError(
            f"--from-results {bundle} replays measured results: {', '.join(refused)} "
            f"cannot be honoured ({reasons}); drop {'it' if len(refused) == 1 else 'them'}, "
            "or run live to measure with other settings"
        )
    ignored = [f for f in flags if f in REPLAY_IGNORED]
    if not ignored:
        return []
    return [f"{', '.join(ignored)} ignored: --from-results replays {bundle}, no model is loaded"]


#: The smallest --max-tokens: the shortest trace the trace reader accepts (debiased
#: CKA needs N > 3), so that one rule holds for the option and the traces.
MIN_MAX_TOKENS = MIN_TRACE_TOKENS


def check_max_tokens(max_tokens: int, *, where: str = "--max-tokens") -> int:
    """The one ``--max-tokens`` rule: an integer >= :data:`MIN_MAX_TOKENS`."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise PreflightError(f"{where} must be an integer, got {max_tokens!r}".lstrip())
    if max_tokens < MIN_MAX_TOKENS:
        raise PreflightError(
            f"{where} {max_tokens} is below {MIN_MAX_TOKENS}: debiased CKA needs at least "
            f"{MIN_MAX_TOKENS} tokens per trace (give {MIN_MAX_TOKENS} or more)".lstrip()
        )
    return max_tokens


def check_dominant_k(
    k: int,
    trace_lengths: Mapping[str, int],
    *,
    where: str = "--dominant-k",
    tokens_name: str = "--max-tokens",
) -> None:
    """``k`` dominant tokens must leave tokens to compare in the shortest trace.

    ``trace_lengths`` maps a trace id to its token count (after ``--max-tokens``). The
    ablation removes up to 2k rows (the union of each side's top k) and CKA needs at
    least :data:`~reasondiff.metrics.defaults.MIN_ROWS_LEFT` rows left (the same
    constant ``metrics.dominant.cka_without`` checks), so 2k <= shortest - that minimum.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise PreflightError(f"{where} must be an integer >= 1, got {k!r}")
    if not trace_lengths:
        return
    trace, shortest = min(trace_lengths.items(), key=lambda kv: (kv[1], kv[0]))
    if 2 * k > shortest - MIN_ROWS_LEFT:
        fit = (shortest - MIN_ROWS_LEFT) // 2
        advice = (
            f"give {where} {fit} or less"
            if fit >= 1
            else f"no {where} fits: give traces of at least {MIN_ROWS_LEFT + 2} tokens"
        )
        raise PreflightError(
            f"{where} {k} is too large for trace {trace!r} ({shortest} tokens, after "
            f"{tokens_name}): removing up to 2k = {2 * k} dominant tokens (the top {k} of "
            f"each side) must leave at least {MIN_ROWS_LEFT} for CKA; {advice}"
        )


def check_layers(
    layers: Sequence[int] | None, depths: Mapping[str, int], *, where: str = "--layers"
) -> None:
    """Every layer in ``layers`` must exist in every model (hidden states 0..L).

    ``depths`` maps a model name to its number of decoder blocks L.
    """
    if layers is None or not depths:
        return
    model, depth = min(depths.items(), key=lambda kv: (kv[1], kv[0]))
    beyond = sorted(x for x in layers if x > depth)
    if beyond:
        raise PreflightError(
            f"{where}: layer(s) {', '.join(map(str, beyond))} beyond the depth of {model} "
            f"({depth} decoder blocks: hidden-state layers 0..{depth})"
        )


#: The default budget for RBF CKA's N x N kernels of one (trace, layer): 4 GiB.
RBF_BUDGET_BYTES = 4 << 30
#: float64 N x N matrices alive at once in one RBF CKA (distances, two kernels, a copy).
_RBF_MATRICES = 4


def rbf_cost(n_tokens: int) -> tuple[int, int]:
    """(pairs, bytes) of RBF CKA over ``n_tokens`` rows: N^2 pairs, a few float64 N x N."""
    pairs = n_tokens * n_tokens
    return pairs, pairs * 8 * _RBF_MATRICES


def rbf_budget_note(
    n_tokens: int, *, budget_bytes: int = RBF_BUDGET_BYTES, bound: str = "--max-tokens"
) -> str | None:
    """A warning (None: within budget) when RBF CKA over ``n_tokens`` rows exceeds the budget.

    RBF CKA needs every pairwise distance: N^2 pairs per trace and layer. Said before
    the run starts, with the estimate and the option that bounds N.
    """
    pairs, nbytes = rbf_cost(n_tokens)
    if nbytes <= budget_bytes:
        return None
    fit = int((budget_bytes / (8 * _RBF_MATRICES)) ** 0.5)
    return (
        f"RBF CKA over a trace of {n_tokens} tokens needs N^2 = {pairs:.2g} pairs and about "
        f"{nbytes / (1 << 30):.1f} GiB per layer (budget {budget_bytes / (1 << 30):.1f} GiB): "
        f"expect a long, memory-hungry run; {bound} {fit} keeps it within budget"
    )


#: ``--torch-threads`` above this many per CPU core is refused (oversubscription crashes).
MAX_THREADS_PER_CPU = 4


def max_threads(cpu_count: int | None = None) -> int:
    """The largest ``--torch-threads`` accepted: :data:`MAX_THREADS_PER_CPU` x the CPU count."""
    cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return MAX_THREADS_PER_CPU * max(cpus, 1)


def check_threads(
    n: int,
    *,
    cpu_count: int | None = None,
    where: str = "--torch-threads",
    auto: str = "auto",
) -> int:
    """``n`` within 1..:func:`max_threads` (torch segfaults at exit with 100000 threads).

    The one bound of the option (``--torch-threads``) and of ``compare(torch_threads=)``;
    ``auto`` is how the caller spells "let torch choose" in the message.
    """
    limit = max_threads(cpu_count)
    if not 1 <= n <= limit:
        cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
        raise PreflightError(
            f"{where} {n} is out of range: give 1..{limit} ({MAX_THREADS_PER_CPU} x the "
            f"{cpus} CPU cores), or {auto}".lstrip()
        )
    return n


# --------------------------------------------------------------------------- one run
def model_depth(spec: ModelSpec, toy_root: Callable[[], Path]) -> int | None:
    """L of a toy or local checkpoint from its config.json (None: not known without a download)."""
    from .models import read_config, resolve_source

    source = str(spec.source)
    try:
        if source.startswith("toy:"):
            path = resolve_source(spec, toy_root=toy_root())
        elif Path(source).expanduser().is_dir():
            path = Path(source).expanduser()
        else:
            return None  # a hub id: its depth is checked when it is loaded
        cfg = read_config(path, name=spec.key)
    except (ModelUnavailable, ReasondiffError):
        return None  # the run names this model's problem where it always did
    inner = cfg.get("text_config")
    merged = {**cfg, **inner} if isinstance(inner, dict) else cfg
    depth = merged.get("num_hidden_layers", merged.get("n_layer"))
    return int(depth) if isinstance(depth, int) else None


def check_run(
    *,
    layers: Sequence[int] | None,
    dominant_k: int,
    max_tokens: int,
    pairs: Sequence[PairSpec],
    trace_paths: Callable[[], list[Path]],
    toy_root: Callable[[], Path],
    names: tuple[str, str, str] = ("--layers", "--dominant-k", "--max-tokens"),
) -> list[str]:
    """Every up-front check of a live run; returns the warnings to show before it starts.

    Called once per run (the plugin's configure hook, ``compare()``): ``--max-tokens``,
    ``--layers`` against the models' depth, ``--dominant-k`` against the traces, and the
    RBF kernel budget of the longest trace. ``names`` are how the caller spells the
    layers, dominant-k and max-tokens settings in errors (``compare()``: its arguments).
    """
    from .traces import load_trace_set

    layers_name, k_name, tokens_name = names
    check_max_tokens(max_tokens, where=tokens_name)
    if layers is not None:
        models = {p.base.key: p.base for p in pairs} | {
            p.descendant.key: p.descendant for p in pairs
        }
        depths = {
            key: d for key, spec in sorted(models.items()) if (d := model_depth(spec, toy_root))
        }
        check_layers(layers, depths, where=layers_name)
    lengths: dict[str, int] = {}
    for path in trace_paths():
        try:
            trace_set = load_trace_set(path)
        except (OSError, ReasondiffError):
            continue  # the engine names an unreadable trace file with its line
        for t in trace_set.traces:
            lengths[f"{trace_set.name}:{t.id}"] = min(len(t.token_ids), max_tokens)
    check_dominant_k(dominant_k, lengths, where=k_name, tokens_name=tokens_name)
    note = rbf_budget_note(max(lengths.values(), default=0), bound=tokens_name)
    return [note] if note else []


def check_compare_arguments(descendants: object, method: str | None) -> None:
    """``compare()``'s arguments, before the registry is read or a model is touched."""
    from .methods import METHODS

    if isinstance(descendants, str | bytes | os.PathLike):
        raise TypeError(
            f"compare(descendants=...) takes a list of models, got the single value "
            f"{descendants!r}; write descendants=[{descendants!r}]"
        )
    if not descendants:
        raise PreflightError(
            "compare(descendants=[]) has nothing to compare: give at least one descendant"
        )
    if method is not None and method not in METHODS:
        raise PreflightError(f"compare(method={method!r}): not one of {', '.join(METHODS)}")
