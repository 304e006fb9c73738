"""The README's recipes for several machines run as written (issue 17 item 4).

Slurm refuses a batch script without a ``#!`` line and ignores ``#SBATCH`` lines after
the first command; a GitHub Actions job starts on a bare runner, so every job that runs
reasondiff must install it and must get ``traces/`` from somewhere. These are checked
on the README's own text, so a recipe edited into something that cannot run fails here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

README = Path(__file__).resolve().parents[1] / "README.md"


def _section() -> str:
    text = README.read_text("utf-8")
    start = text.index("### Several machines: shards and merged bundles")
    return text[start : text.index("\n## ", start)]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", _section(), flags=re.S)


def _sbatch_scripts() -> list[str]:
    return [b for b in _blocks("bash") if "#SBATCH" in b]


def test_slurm_scripts_have_a_shebang_and_directives_before_commands() -> None:
    scripts = _sbatch_scripts()
    assert len(scripts) == 2  # the array and the merge job
    for script in scripts:
        lines = script.splitlines()
        assert lines[0] == "#!/bin/bash", lines[0]
        first_command = next(i for i, x in enumerate(lines) if x and not x.startswith("#"))
        late = [x for x in lines[first_command:] if x.startswith("#SBATCH")]
        assert not late, f"#SBATCH after the first command is ignored by sbatch: {late}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_scripts_parse_and_the_merge_reads_every_shard(tmp_path: Path) -> None:
    shard, merge = _sbatch_scripts()
    for i, script in enumerate((shard, merge)):
        path = tmp_path / f"s{i}.sbatch"
        path.write_text(script)
        subprocess.run(["bash", "-n", str(path)], check=True)
    tasks = re.search(r"#SBATCH --array=1-(\d+)", shard)
    assert tasks is not None
    n = int(tasks.group(1))
    assert f'--shard "${{SLURM_ARRAY_TASK_ID}}/{n}"' in shard
    assert 'bundles/shard-${SLURM_ARRAY_TASK_ID}"' in shard
    merged = re.search(r"--from-results ((?:bundles/shard-\d+ )+)", merge)
    assert merged is not None
    assert merged.group(1).split() == [f"bundles/shard-{i}" for i in range(1, n + 1)]


def _steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = job["steps"]
    return steps


def test_the_actions_matrix_installs_reasondiff_and_provides_traces() -> None:
    (block,) = _blocks("yaml")
    jobs = yaml.safe_load(block)["jobs"]
    shard = jobs["shard"]
    assert shard["strategy"]["matrix"]["shard"] == [1, 2, 3, 4]
    for name, job in jobs.items():
        runs = [s.get("run", "") for s in _steps(job)]
        uses = [s.get("uses", "") for s in _steps(job)]
        assert uses[0].startswith("actions/checkout@"), name  # the diffs/ tests and snapshots
        work = next(i for i, r in enumerate(runs) if "pytest diffs" in r or "reasondiff-" in r)
        installs = [r for r in runs[:work] if "pip install" in r]
        assert installs, f"job {name} runs reasondiff without installing it"
        assert re.search(r"pip install torch==\S+", installs[0]), installs
        assert "pip install -e ." in installs[0] or "pip install reasondiff" in installs[0]
        if "--traces traces/" in runs[work]:
            provided = [
                s
                for s in _steps(job)[:work]
                if "download-artifact" in s.get("uses", "")
                and s.get("with", {}).get("path") == "traces"
            ]
            assert provided, f"job {name} compares on traces/ that no step provides"
    made = [s for s in _steps(jobs["traces"]) if "upload-artifact" in s.get("uses", "")]
    assert made and made[0]["with"]["name"] == "traces"
    assert "traces" in shard["needs"]
    uploads = [s for s in _steps(shard) if "upload-artifact" in s.get("uses", "")]
    downloads = [s for s in _steps(jobs["merge"]) if "download-artifact" in s.get("uses", "")]
    assert uploads[0]["with"]["name"].startswith("bundle-")
    assert downloads[0]["with"]["pattern"] == "bundle-*"
    merge_run = next(s["run"] for s in _steps(jobs["merge"]) if "pytest" in s.get("run", ""))
    assert f"--from-results {downloads[0]['with']['path']}/bundle-*" in merge_run
