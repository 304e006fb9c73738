"""Exception types. Each error says what was expected, what was found, and where."""

from __future__ import annotations


class ReasondiffError(Exception):
    """Base class for every error reasondiff raises on purpose."""


class MetricInputError(ReasondiffError, ValueError):
    """A metric got input it cannot score (wrong shape, too few rows, NaN, ...)."""


class RegistryError(ReasondiffError, ValueError):
    """The model registry, a group, a key or a user-given model spec is wrong."""


class ModelLoadError(ReasondiffError):
    """A checkpoint cannot be found, read, trusted or loaded."""


class ModelUnavailable(ModelLoadError):
    """A registry model's weights are not on this machine (no network, not cached).

    The plugin turns this into a skip with a reason unless --require-models is given.
    """


class ArchitectureMismatch(ReasondiffError, ValueError):
    """Base and descendant cannot be compared layer by layer (layers, hidden size)."""


class TraceError(ReasondiffError, ValueError):
    """A trace set or a single trace is unusable (empty, too short, ids out of vocab)."""


class TokenizerMismatch(TraceError):
    """Base and descendant tokenizers disagree on a trace's token ids."""


class CacheEntryError(ReasondiffError):
    """A cache entry failed validation; callers recompute it (never fatal)."""


class NonFiniteError(ReasondiffError, ValueError):
    """NaN or Inf found in weights or activations; says model, layer and positions."""


class BundleError(ReasondiffError, ValueError):
    """A results bundle (--from-results) is missing files or has wrong columns."""


class RbfBudgetWarning(UserWarning):
    """RBF CKA over the run's longest trace needs more work and memory (N^2 pairs) than the
    budget (``reasondiff.preflight.RBF_BUDGET_BYTES``); warned before the work starts, with
    the estimate and the option that bounds N (``--max-tokens`` / ``max_tokens``)."""
