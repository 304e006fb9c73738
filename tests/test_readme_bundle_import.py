"""The README's bundle-import example runs as written and gives a bundle that replays.

The example is the documentation of the import format, so it is executed, not copied:
the code block after the ``<!-- example:bundle-import -->`` marker in README.md.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from reasondiff.bundle import read_bundle

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text("utf-8")
    m = re.search(r"<!-- example:bundle-import -->\n```python\n(.*?)\n```", text, re.S)
    assert m is not None, "README.md lost its example:bundle-import code block"
    return m.group(1)


def test_readme_import_example_converts_a_per_tensor_csv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "other-tool.csv").write_text(
        "model_a,model_b,param,diff\n"
        "Qwen/Qwen2.5-Math-7B,sail/Qwen2.5-Math-7B-Oat-Zero,model.layers.0.mlp.up_proj.weight,0.0021\n"
        "Qwen/Qwen2.5-Math-7B,sail/Qwen2.5-Math-7B-Oat-Zero,model.layers.27.mlp.up_proj.weight,0.0019\n"
        "Qwen/Qwen2.5-Math-7B,sail/Qwen2.5-Math-7B-Oat-Zero,lm_head.weight,0.001\n"
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(_example(), "README.md example:bundle-import", "exec"), {})
    (res,) = read_bundle(tmp_path / "imported").results
    assert res.info.base_source == "Qwen/Qwen2.5-Math-7B" and res.info.num_layers == 28
    assert [(w.block, w.component, w.normalized_diff) for w in res.weights] == [
        (0, "mlp.up_proj.weight", 0.0021),
        (27, "mlp.up_proj.weight", 0.0019),
        (-1, "lm_head.weight", 0.001),
    ]
    assert all(math.isnan(w.relative_diff) for w in res.weights) and res.cka == []
