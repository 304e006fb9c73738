"""Where a weight tensor sits in a model, read from its checkpoint name.

The one parser of tensor names (``model.layers.3.mlp.up_proj.weight`` -> block 3,
component ``mlp.up_proj.weight``). It lives apart from :mod:`reasondiff.weightdiff`
because that module imports torch, and replaying a results bundle (which derives a
row's block and component from its tensor name when another tool left them out) must
not. Nothing here reads a checkpoint.
"""

from __future__ import annotations

import re

__all__ = ["parse_tensor_name"]

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.(.+)$")


def parse_tensor_name(name: str) -> tuple[int, str]:
    """(block index, name inside the block); (-1, full name) outside the blocks."""
    m = _BLOCK.search(name)
    if m is None:
        return -1, name
    return int(m.group(1)), m.group(2)
