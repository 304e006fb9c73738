"""Command-line and ini options of the reasondiff pytest plugin, and their validation.

This module only declares options and turns what pytest parsed into one frozen
``DiffOptions`` value; it knows nothing about models or metrics. Every option that a
project would set once (cache dir, thresholds, device) is also an ini key; the command
line wins over the ini file, the ini file over the documented default.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pytest

from .metrics.defaults import (
    BATHTUB_BAND,
    BATHTUB_DELTA,
    BOOTSTRAP,
    CURVE_ATOL,
    CURVE_RTOL,
    DOMINANT_K,
    FINAL_LAYER_MARGIN,
    INVARIANCE_ATOL,
    LOCALIZATION_MAX_GINI,
    LOCALIZATION_MAX_SHARE,
    MAX_TOKENS,
    RBF_MEDIAN,
    RBF_MEDIANS,
    SFT_RL_RATIO,
)
from .sharding import Shard, ShardError, parse_shard

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class _Opt:
    """One option: its flag, ini key (if any), default and how to parse a value."""

    flag: str
    dest: str
    help: str
    default: Any = None
    parse: Callable[[str], Any] = str
    ini: bool = False
    metavar: str | None = None


def parse_bytes(text: str) -> int | None:
    """``"50G"`` -> bytes; ``"0"`` / ``"none"`` / ``""`` mean no cap (returns None)."""
    t = text.strip().lower()
    if t in ("", "0", "none", "off"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", t)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 1000000, 512M, 50G, 1.5T)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def parse_layers(text: str) -> tuple[int, ...] | None:
    """``"0,4,8-12"`` -> (0, 4, 8, 9, 10, 11, 12); empty or ``"all"`` -> None (all layers)."""
    t = text.strip().lower()
    if t in ("", "all"):
        return None
    out: set[int] = set()
    for part in t.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise ValueError(f"bad layer item {part!r} in {text!r} (expected e.g. 0,4,8-12)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"bad layer range {part!r} in {text!r}: end before start")
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))


def _parse_band(text: str) -> tuple[float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 2 or not 0.0 <= parts[0] < parts[1] <= 1.0:
        raise ValueError(f"{text!r} is not a band 'lo,hi' with 0 <= lo < hi <= 1")
    return (parts[0], parts[1])


def _nonneg_float(text: str) -> float:
    v = float(text)
    if not v >= 0.0:  # also rejects NaN
        raise ValueError(f"{text!r} must be a number >= 0")
    return v


def _pos_float(text: str) -> float:
    v = float(text)
    if not v > 0.0:  # also rejects NaN
        raise ValueError(f"{text!r} must be a number > 0")
    return v


def _rbf_median(text: str) -> str:
    t = text.strip().lower()
    if t not in RBF_MEDIANS:
        raise ValueError(f"{text!r} is not one of: {', '.join(RBF_MEDIANS)}")
    return t


def rbf_median_note(options: DiffOptions, bundle_config: dict[str, Any] | None) -> str | None:
    """A report note when RBF CKA used a non-default median convention, else None.

    A replayed bundle's own config says how its numbers were computed, so it wins over
    the replaying run's option.
    """
    source = bundle_config if bundle_config is not None else options.to_dict()
    convention = str(source.get("rbf_median", RBF_MEDIAN))
    if convention == RBF_MEDIAN:
        return None
    return (
        f"RBF CKA bandwidth: median over all pairwise distances, diagonal zeros included "
        f"(--rbf-median {convention}, the reference code's convention; default {RBF_MEDIAN})"
    )


def _shard(text: str) -> Shard:
    try:
        return parse_shard(text)
    except ShardError as exc:
        raise ValueError(str(exc)) from None


def _pos_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise ValueError(f"{text!r} must be an integer >= 1")
    return v


def _threads(text: str) -> int | None:
    """``auto`` or 1..4 x the CPU count (torch segfaults at exit on 100000 threads)."""
    if text.strip().lower() == "auto":
        return None
    from .preflight import PreflightError, check_threads

    try:
        return check_threads(_pos_int(text), where="")
    except PreflightError as exc:
        raise ValueError(str(exc)) from None


def _max_tokens(text: str) -> int:
    """The one --max-tokens rule (:func:`reasondiff.preflight.check_max_tokens`)."""
    from .preflight import PreflightError, check_max_tokens

    try:
        return check_max_tokens(int(text), where="")
    except PreflightError as exc:
        raise ValueError(str(exc)) from None


def _opt(
    flag: str,
    help: str,
    default: Any = None,
    parse: Callable[[str], Any] = str,
    *,
    ini: bool = False,
    metavar: str | None = None,
) -> Any:
    """A :class:`DiffOptions` field that is also a command-line option (and ini key)."""
    meta = _Opt(flag, "", help, default, parse, ini, metavar)
    return field(default=default, metadata={"option": meta})


def _flag(flag: str, help: str) -> Any:
    """A :class:`DiffOptions` field that is a store-true command-line flag (default False)."""
    return field(default=False, metadata={"flag": (flag, help)})


@dataclass(frozen=True)
class DiffOptions:
    """Every option value, parsed and validated; one per pytest process.

    The one table of the options: each field gives its flag, help, default, parser and
    ini key (:func:`_opt`, :func:`_flag`); :data:`OPTIONS` and :data:`_FLAGS` are read
    off it, in this (help) order. Defaults shared with the Python API come from
    :mod:`reasondiff.metrics.defaults`.
    """

    model_group: str = _opt(
        "--model-group", "model group from the registry to compare", "toy", ini=True, metavar="NAME"
    )
    registry: tuple[str, ...] = _opt(
        "--registry",
        "extra registry TOML file on top of the built-in one (repeatable)",
        (),
        metavar="PATH",
    )
    base: str | None = _opt(
        "--base",
        "ad-hoc base model (hub id, local dir or toy:<recipe>); needs --candidate",
        metavar="SPEC",
    )
    candidate: str | None = _opt(
        "--candidate", "ad-hoc descendant to compare with --base", metavar="SPEC"
    )
    label: str | None = _opt(
        "--label", "name of an ad-hoc candidate series: keys its curve snapshots", metavar="NAME"
    )
    method: str | None = _opt(
        "--method", "training method of the ad-hoc candidate: SFT, RL or SFT+RL", metavar="METHOD"
    )
    traces: str | None = _opt(
        "--traces",
        "primary trace set (JSONL, or toy); default: the group's traces, the toy set 'a' for toy models only",
        ini=True,
        metavar="PATH",
    )
    traces_alt: str | None = _opt(
        "--traces-alt",
        "second trace set for trace invariance (toy default: set 'b')",
        ini=True,
        metavar="PATH",
    )
    max_tokens: int = _opt(
        "--max-tokens",
        "truncate traces longer than this, with a note (at least 4)",
        MAX_TOKENS,
        _max_tokens,
        ini=True,
        metavar="N",
    )
    layers: tuple[int, ...] | None = _opt(
        "--layers",
        "compare only these hidden-state layers, e.g. 0,4,8-12 (default all)",
        None,
        parse_layers,
        metavar="LIST",
    )
    pass_size: int | None = _opt(
        "--pass-size",
        "descendants scored together (resident beside the base) in one pass, at most "
        "(default: as many as fit in 80%% of the free device memory)",
        None,
        _pos_int,
        ini=True,
        metavar="N",
    )
    device: str = _opt(
        "--device", "auto | cpu | cuda (auto: cuda if available)", "auto", ini=True, metavar="DEV"
    )
    dtype: str = _opt(
        "--dtype",
        "auto | float32 | bfloat16 | float16 (auto: the checkpoint's dtype on CUDA, float32 on CPU)",
        "auto",
        ini=True,
        metavar="DTYPE",
    )
    torch_threads: int | None = _opt(
        "--torch-threads",
        "torch CPU threads: N (1 to 4 x the CPU cores), or auto (default: cores / workers "
        "under xdist, else torch's own)",
        None,
        _threads,
        ini=True,
        metavar="N",
    )
    diff_cache: str | None = _opt(
        "--diff-cache",
        "activation / metric cache dir (default $REASONDIFF_CACHE or ~/.cache/reasondiff)",
        None,
        ini=True,
        metavar="DIR",
    )
    diff_cache_cap: int | None = _opt(
        "--diff-cache-cap",
        "size cap of the activation cache, e.g. 50G; 0 or none: no cap (the default)",
        None,
        parse_bytes,
        ini=True,
        metavar="SIZE",
    )
    report_dir: str | None = _opt(
        "--report-dir", "write the results bundle and figures here at session end", metavar="DIR"
    )
    snapshot_dir: str | None = _opt(
        "--snapshot-dir",
        "curve snapshots live under DIR/<group or labels/LABEL>/ "
        "(default: snapshots/ next to the finding tests)",
        ini=True,
        metavar="DIR",
    )
    from_results: tuple[str, ...] | None = _opt(
        "--from-results",
        "replay results bundles (their directories, not files in them) as one run instead "
        "of loading models; several bundles (e.g. one per --shard) are merged",
        metavar="DIR",
    )
    shard: Shard | None = _opt(  # noqa: RUF009 (a frozen dataclass)
        "--shard",
        "run only shard I of N (1-based) of the selected pairs, e.g. 2/4; merge the "
        "shards' bundles with --from-results DIR DIR ...",
        None,
        _shard,
        metavar="I/N",
    )
    bathtub_delta: float = _opt(
        "--bathtub-delta",
        f"bathtub: minimum drop of the dip below both its sides (default {BATHTUB_DELTA:g})",
        BATHTUB_DELTA,
        _nonneg_float,
        ini=True,
        metavar="X",
    )
    bathtub_band: tuple[float, float] = _opt(
        "--bathtub-band",
        "bathtub: depth band the dip's bottom must lie in, as fractions of L "
        f"(default {BATHTUB_BAND[0]:g},{BATHTUB_BAND[1]:g})",
        BATHTUB_BAND,
        _parse_band,
        ini=True,
        metavar="LO,HI",
    )
    final_layer_margin: float = _opt(
        "--final-layer-margin",
        f"final layer lowest: margin below the runner-up (default {FINAL_LAYER_MARGIN:g})",
        FINAL_LAYER_MARGIN,
        _nonneg_float,
        ini=True,
        metavar="X",
    )
    localization_max_gini: float = _opt(
        "--localization-max-gini",
        f"weight change distributed: max Gini over layers (default {LOCALIZATION_MAX_GINI})",
        LOCALIZATION_MAX_GINI,
        _nonneg_float,
        ini=True,
        metavar="X",
    )
    localization_max_share: float = _opt(
        "--localization-max-share",
        "weight change distributed: max layer share / uniform share "
        f"(default {LOCALIZATION_MAX_SHARE})",
        LOCALIZATION_MAX_SHARE,
        _nonneg_float,
        ini=True,
        metavar="X",
    )
    sft_rl_ratio: float = _opt(
        "--sft-rl-ratio",
        f"SFT vs RL: every SFT median over every RL median, at least (default {SFT_RL_RATIO:g})",
        SFT_RL_RATIO,
        _pos_float,
        ini=True,
        metavar="X",
    )
    rbf_median: str = _opt(
        "--rbf-median",
        f"RBF bandwidth median: offdiag, or all (the reference's, diagonal zeros included) "
        f"(default {RBF_MEDIAN})",
        RBF_MEDIAN,
        _rbf_median,
        ini=True,
        metavar="CONV",
    )
    invariance_atol: float = _opt(
        "--invariance-atol",
        f"trace invariance: max |curve difference| per layer (default {INVARIANCE_ATOL})",
        INVARIANCE_ATOL,
        _nonneg_float,
        ini=True,
        metavar="X",
    )
    dominant_k: int = _opt(
        "--dominant-k",
        f"dominant datapoints: top-k tokens per side (default {DOMINANT_K})",
        DOMINANT_K,
        _pos_int,
        ini=True,
        metavar="K",
    )
    bootstrap: int = _opt(
        "--bootstrap",
        f"bootstrap resamples for curve intervals over traces (default {BOOTSTRAP})",
        BOOTSTRAP,
        _pos_int,
        ini=True,
        metavar="N",
    )
    curve_atol: float = _opt(
        "--curve-atol",
        f"curve snapshots: absolute tolerance per layer (default {CURVE_ATOL})",
        CURVE_ATOL,
        _nonneg_float,
        ini=True,
        metavar="X",
    )
    curve_rtol: float = _opt(
        "--curve-rtol",
        f"curve snapshots: relative tolerance per layer (default {CURVE_RTOL})",
        CURVE_RTOL,
        _nonneg_float,
        ini=True,
        metavar="X",
    )
    require_models: bool = _flag(
        "--require-models", "fail (do not skip) when a registry model's weights are unavailable"
    )
    allow_pickle: bool = _flag(
        "--allow-pickle", "allow loading pytorch_model.bin (pickle) checkpoints (weights_only)"
    )
    trust_remote_code: bool = _flag(
        "--trust-remote-code", "allow checkpoints that need remote code (auto_map)"
    )
    keep_activations: bool = _flag(
        "--keep-activations",
        "also store hidden states in the activation cache (N x D per layer and trace; "
        "default: only metric results are cached)",
    )
    stream_blocks: bool = _flag(
        "--stream-blocks",
        "score passes block by block (one decoder block per model resident, every trace "
        "through it, then the next block); default: only when a pass's models do not fit "
        "the device memory budget",
    )
    model_group_given: bool = field(default=False, compare=False)

    @property
    def adhoc(self) -> bool:
        return self.base is not None

    def cache_dir(self) -> Path:
        """The diff cache root (``--diff-cache`` / ini ``diff_cache`` / the default)."""
        if self.diff_cache:
            return Path(self.diff_cache).expanduser()
        from .cache import default_cache_dir

        return default_cache_dir()

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, stored in the results bundle's config."""
        d = asdict(self)
        d.pop("model_group_given")
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["bathtub_band"] = list(self.bathtub_band)
        d["registry"] = list(self.registry)
        d["from_results"] = list(self.from_results) if self.from_results else None
        d["shard"] = str(self.shard) if self.shard is not None else None
        return d


#: All options, in help order, read off :class:`DiffOptions` (defaults shown in --help).
OPTIONS: tuple[_Opt, ...] = tuple(
    replace(f.metadata["option"], dest=f.name)
    for f in fields(DiffOptions)
    if "option" in f.metadata
)
#: The store-true flags: (flag, dest, help).
_FLAGS: tuple[tuple[str, str, str], ...] = tuple(
    (f.metadata["flag"][0], f.name, f.metadata["flag"][1])
    for f in fields(DiffOptions)
    if "flag" in f.metadata
)


def add_options(parser: pytest.Parser) -> None:
    """Register every option (and ini key) in the ``reasondiff`` help group."""
    group = parser.getgroup("reasondiff", "reasondiff model diff")
    for opt in OPTIONS:
        kwargs: dict[str, Any] = {"dest": f"rd_{opt.dest}", "default": None, "help": opt.help}
        if opt.metavar:
            kwargs["metavar"] = opt.metavar
        if opt.dest == "registry":
            kwargs["action"] = "append"
        if opt.dest == "from_results":
            kwargs["action"] = "extend"
            kwargs["nargs"] = "+"
        group.addoption(opt.flag, **kwargs)
        if opt.ini:
            # argparse %-formats option help (hence "%%"); ini help is printed as it is
            ini_help = opt.help.replace("%%", "%")
            parser.addini(opt.dest, f"reasondiff: {ini_help}", type="string", default="")
    for flag, dest, text in _FLAGS:
        group.addoption(flag, dest=f"rd_{dest}", action="store_true", default=False, help=text)


def _raw_value(config: pytest.Config, opt: _Opt) -> tuple[str | None, str]:
    """(text, where) for one option: the command line first, then the ini file."""
    cli = config.getoption(f"rd_{opt.dest}")
    if cli is not None:
        return str(cli), opt.flag
    if opt.ini:
        ini = config.getini(opt.dest)
        if isinstance(ini, str) and ini.strip():
            return ini.strip(), f"ini option {opt.dest}"
    return None, opt.flag


def options_from_config(config: pytest.Config) -> DiffOptions:
    """Parse and validate every option; a bad value is a ``pytest.UsageError``."""
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        if opt.dest == "registry":
            values["registry"] = tuple(config.getoption("rd_registry") or ())
            continue
        if opt.dest == "from_results":
            dirs = tuple(config.getoption("rd_from_results") or ())
            values["from_results"] = dirs or None
            continue
        text, where = _raw_value(config, opt)
        if text is None:
            values[opt.dest] = opt.default
            continue
        try:
            values[opt.dest] = opt.parse(text)
        except ValueError as exc:
            raise pytest.UsageError(f"{where}: {exc}") from None
        if opt.dest == "model_group":
            values["model_group_given"] = True
        if opt.dest == "snapshot_dir":
            values["snapshot_dir"] = _anchored_dir(config, text, from_ini=where != opt.flag)
            if Path(values["snapshot_dir"]).exists() and not Path(values["snapshot_dir"]).is_dir():
                raise pytest.UsageError(
                    f"{where}: {values['snapshot_dir']} is a file, not a directory; the curve "
                    "snapshots live in a folder (give a new or existing directory)"
                )
    for _flag, dest, _text in _FLAGS:
        values[dest] = bool(config.getoption(f"rd_{dest}"))
    opts = DiffOptions(**values)
    _check_choices(opts)
    return opts


def _anchored_dir(config: pytest.Config, text: str, *, from_ini: bool) -> str:
    """An absolute path: a relative one is taken from the ini file's folder (ini key) or
    the invocation folder (command line), so a test that changes directory moves nothing."""
    path = Path(text).expanduser()
    if not path.is_absolute():
        anchor = (
            config.inipath.parent if from_ini and config.inipath else config.invocation_params.dir
        )
        path = anchor / path
    return str(path)


def _check_choices(opts: DiffOptions) -> None:
    from .errors import RegistryError
    from .methods import check_method

    if opts.device not in DEVICES:
        raise pytest.UsageError(f"--device {opts.device!r} is not one of: {', '.join(DEVICES)}")
    if opts.dtype not in DTYPES:
        raise pytest.UsageError(f"--dtype {opts.dtype!r} is not one of: {', '.join(DTYPES)}")
    try:
        check_method(opts.method, what="--method")
    except RegistryError as exc:
        raise pytest.UsageError(str(exc)) from None
    if (opts.base is None) != (opts.candidate is None):
        raise pytest.UsageError("--base and --candidate go together: give both or neither")
    if opts.adhoc and opts.model_group_given:
        raise pytest.UsageError("--model-group cannot be combined with --base/--candidate")
    if (opts.label or opts.method) and not opts.adhoc:
        raise pytest.UsageError(
            "--label and --method describe an ad-hoc pair: they need --base/--candidate"
        )
    if opts.from_results and opts.adhoc:
        raise pytest.UsageError(
            "--from-results replays a bundle: it cannot be combined with --base/--candidate"
        )
