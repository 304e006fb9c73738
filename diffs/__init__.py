"""The finding tests, shipped as ``reasondiff.diffs``: ``pytest --pyargs reasondiff.diffs``
(or ``reasondiff-diff``) runs them from any directory; ``pytest diffs`` runs them here."""
