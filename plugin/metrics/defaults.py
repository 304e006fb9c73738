"""Default thresholds of the finding tests: the one place both APIs read them from.

The Python API (:mod:`reasondiff.metrics.findings`) and the command line / ini options
(:mod:`reasondiff.options`) both take their defaults from these constants, so a notebook
and ``pytest diffs`` give the same verdict on the same curve. Plain constants, no
imports: the options module reads them at plugin import.
"""

from __future__ import annotations

from typing import Final

#: bathtub: minimum drop of the dip below both its sides (METHODS §8)
BATHTUB_DELTA = 0.25
#: bathtub: the dip's bottom must lie at bottom / L within this band (inclusive)
BATHTUB_BAND = (0.15, 0.85)
#: final layer lowest: margin below the runner-up
FINAL_LAYER_MARGIN = 1e-6
#: weight change distributed: max Gini coefficient over layers
LOCALIZATION_MAX_GINI = 0.5
#: weight change distributed: max (largest layer share / uniform share 1/L)
LOCALIZATION_MAX_SHARE = 3.0
#: trace invariance: max |curve difference| per layer
INVARIANCE_ATOL = 0.05
#: curve snapshots: absolute / relative tolerance per layer
CURVE_ATOL = 0.02
CURVE_RTOL = 0.0
#: SFT vs RL: every SFT median must exceed every RL median by at least this ratio
SFT_RL_RATIO = 2.0
#: tokens per trace at most (longer traces are truncated, with a note)
MAX_TOKENS = 4096
#: top-k tokens per side whose union U is the dominant datapoints (METHODS §5)
DOMINANT_K = 10
#: fewest rows an ablated CKA may be computed on (the unbiased estimator needs N >= 4):
#: the ablation (``metrics.dominant.cka_without``) and the up-front ``--dominant-k`` check
#: (``preflight.check_dominant_k``) both read it here
MIN_ROWS_LEFT = 4
#: bootstrap resamples (curve intervals over traces, medians over matrices)
BOOTSTRAP = 1000
#: massive activations (Sun et al.): |a| above this and above MASSIVE_RATIO x median |a|
MASSIVE_THRESHOLD = 100.0
MASSIVE_RATIO = 1000.0
#: RBF bandwidth median convention: "offdiag" (ours) or "all" (the reference's)
RBF_MEDIAN: Final = "offdiag"
RBF_MEDIANS = ("offdiag", "all")
#: PC1 of a Gram-form layer on a CPU: up to this many tokens by Lanczos (one matrix-vector
#: product per step), above it by block subspace iteration (16 columns per pass over the
#: matrix). Lanczos measured faster at every N up to 8192, the most tokens a layer holds
#: as a Gram (metrics/layer.py GRAM_ROWS_MAX), so today it is that bound; lower it if a
#: machine's memory bandwidth favours the block products. Both give the same PC1 to
#: round-off (tests/metrics/test_metrics_pc1_paths.py). CUDA keeps the block iteration.
PC1_LANCZOS_MAX_N = 8192
