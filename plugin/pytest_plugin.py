"""reasondiff's pytest plugin: options, pair parametrization, fixtures, xdist merge, report.

This layer is thin on purpose: it parses options (``options.py``), keeps one
``DiffSession`` on ``config.stash`` (``session.py``), parametrizes tests that take a
``pair`` (one test per base/descendant pair, id = ``PairSpec.pair_id``) or a
``base_subject`` (group-level findings, id = ``base:<key>``), and at the end merges the
xdist workers' results, writes the bundle and prints the report. Importing it is cheap:
no torch, no transformers, no metrics until a test asks for a result.

Fixtures for finding tests: ``diff_session``, ``diff_options``, ``pair_result``,
``group_results``, ``finding`` (a :class:`FindingCheck`) and ``curve_snapshot``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest

from .diskcheck import check_report_dir
from .errors import ModelUnavailable, ReasondiffError
from .options import DiffOptions, add_options, options_from_config
from .records import PairResult, Verdict
from .registry import PairSpec
from .session import DiffSession, GroupSubject
from .trace_choice import trace_specs
from .warning_policy import relax_blanket_error
from .xdist_support import (
    apply_loadgroup_on_worker,
    default_to_loadgroup,
    pack_worker_output,
    tell_worker_about_loadgroup,
    unpack_worker_output,
    worker_count,
    worker_id,
)

SESSION_KEY = pytest.StashKey[DiffSession]()
_PREFLIGHT_KEY = pytest.StashKey[list[str]]()
_SHARD_NOTE_KEY = pytest.StashKey[str]()
_WORKER_OUTPUT_KEY = "reasondiff"


# ---------------------------------------------------------------------- options / set-up
def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(wrapper=True)
def pytest_cmdline_main(config: pytest.Config) -> Generator[None, Any, Any]:
    # Before xdist turns "-n N without --dist" into --dist load: keep pairs together.
    default_to_loadgroup(config)
    # Before any pytest_configure: another plugin's warning must not stop the run.
    relax_blanket_error(config)
    return (yield)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    tell_worker_about_loadgroup(node)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "xdist_group(name): keep these tests on one xdist worker")
    apply_loadgroup_on_worker(config)
    if config.option.collectonly and hasattr(config.option, "disable_unused_snapshots"):
        # syrupy 7 counts every curve snapshot as unused under --collect-only (nothing
        # ran) and fails the run; a collection listing must not fail.
        config.option.disable_unused_snapshots = True
    if config.option.help or getattr(config.option, "version", False):
        return
    options = options_from_config(config)
    try:
        bundle = None
        notes: list[str] = []
        if options.from_results:
            from .bundle import read_bundle
            from .preflight import check_replay_options

            dirs = options.from_results
            notes += check_replay_options(_given_flags(config), " ".join(dirs))
            read = [(Path(d), read_bundle(d)) for d in dirs]  # each with its integrity checks
            for _path, one in read:
                notes += [n for n in one.notes if n not in notes]
            if len(read) == 1:
                bundle = read[0][1]
            else:
                from .bundle_merge import merge_bundles

                bundle = merge_bundles(read)
                notes.append(f"--from-results: {len(read)} bundles replayed as one run")
        session = DiffSession.create(
            options, worker=worker_id(config), worker_count=worker_count(config), bundle=bundle
        )
        if not options.from_results and not config.option.collectonly:
            trace_specs(options, session.registry, session.pairs)  # real models need --traces
        if options.report_dir and worker_id(config) is None and not config.option.collectonly:
            check_report_dir(Path(options.report_dir))  # not a traceback after all the work
        if not options.from_results and not config.option.collectonly and worker_id(config) is None:
            # once per run (the controller checks for all), before any model is loaded
            warnings = session.preflight()
            config.stash[_PREFLIGHT_KEY] = warnings
            notes += warnings
        shard_note = session.shard_note()
        if shard_note is not None:
            notes.append(shard_note)
            config.stash[_SHARD_NOTE_KEY] = shard_note
        session.notes.extend(notes)
    except ReasondiffError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SESSION_KEY] = session


def _given_flags(config: pytest.Config) -> list[str]:
    """The reasondiff flags given on the command line (not the ini file)."""
    from .options import _FLAGS, OPTIONS

    given = [o.flag for o in OPTIONS if config.getoption(f"rd_{o.dest}") not in (None, [], ())]
    return given + [flag for flag, dest, _ in _FLAGS if config.getoption(f"rd_{dest}")]


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The up-front warnings (e.g. an RBF kernel beyond budget), before any test runs."""
    lines = [f"reasondiff: {w}" for w in config.stash.get(_PREFLIGHT_KEY, [])]
    if _SHARD_NOTE_KEY in config.stash:
        lines.append(f"reasondiff: {config.stash[_SHARD_NOTE_KEY]}")
    return lines


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Under ``-q`` or ``--no-header`` pytest prints no header: say the warnings anyway,
    before the first test runs (the header shows them otherwise)."""
    config = session.config
    warnings = config.stash.get(_PREFLIGHT_KEY, [])
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if not warnings or reporter is None:
        return
    if reporter.showheader and not reporter.no_header:
        return  # pytest_report_header printed them
    for w in warnings:
        reporter.write_line(f"reasondiff: {w}", yellow=True)


def _session(config: pytest.Config) -> DiffSession:
    try:
        return config.stash[SESSION_KEY]
    except KeyError:
        raise pytest.UsageError("reasondiff: the plugin was not configured for this run") from None


# ---------------------------------------------------------------------- parametrization
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per selected pair (``pair``) or per base (``base_subject``)."""
    if "pair" in metafunc.fixturenames:
        session = _session(metafunc.config)
        metafunc.parametrize(
            "pair",
            [
                pytest.param(p, id=p.pair_id, marks=pytest.mark.xdist_group(p.pair_id))
                for p in session.pairs
            ],
        )
    if "base_subject" in metafunc.fixturenames:
        session = _session(metafunc.config)
        shard = session.options.shard
        marks: list[Any] = []
        if shard is not None and shard.count > 1:
            # A shard holds only some of a base's descendants: the group finding cannot
            # be decided here (skipped, never failed); the merged replay decides it.
            marks.append(
                pytest.mark.skip(
                    reason=f"group finding undecided inside --shard {shard}: it pools every "
                    "descendant of the base; decided when the shards' bundles are merged "
                    "(--from-results DIR DIR ...)"
                )
            )
        metafunc.parametrize(
            "base_subject",
            [
                pytest.param(s, id=s.subject, marks=[pytest.mark.xdist_group(s.subject), *marks])
                for s in session.group_subjects()
            ],
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group-level tests last, so the pairs they pool are usually computed already."""
    items.sort(key=lambda it: "base_subject" in getattr(it, "fixturenames", ()))


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def diff_session(pytestconfig: pytest.Config) -> DiffSession:
    """The process's :class:`DiffSession` (registry, caches, results, verdicts)."""
    return _session(pytestconfig)


@pytest.fixture(scope="session")
def diff_options(diff_session: DiffSession) -> DiffOptions:
    """Parsed reasondiff options (thresholds, tolerances, device, ...)."""
    return diff_session.options


def obtain_result(session: DiffSession, pair: PairSpec) -> PairResult:
    """``session.pair_result`` with missing weights as a skip (or failure) and errors in one line."""
    __tracebackhide__ = True
    try:
        return session.pair_result(pair)
    except ModelUnavailable as exc:
        # Registry models may be absent on this machine; models named on the command
        # line (--base/--candidate) were asked for explicitly, so their absence fails.
        if session.options.require_models or session.options.adhoc:
            why = "--require-models" if session.options.require_models else "--base/--candidate"
            pytest.fail(f"{pair.pair_id}: {_one_line(str(exc))} ({why})", pytrace=False)
        pytest.skip(f"{pair.pair_id}: {_one_line(str(exc))}")
    except ReasondiffError as exc:
        pytest.fail(f"{pair.pair_id}: {type(exc).__name__}: {_one_line(str(exc))}", pytrace=False)


@pytest.fixture
def pair_result(pair: PairSpec, diff_session: DiffSession) -> PairResult:
    """Every measurement of the parametrized pair (computed once per process, cached on disk)."""
    return obtain_result(diff_session, pair)


@pytest.fixture
def group_results(
    base_subject: GroupSubject, diff_session: DiffSession
) -> list[tuple[PairSpec, PairResult]]:
    """(pair, result) for every selected descendant of the parametrized base."""
    return [(p, obtain_result(diff_session, p)) for p in base_subject.pairs]


@pytest.fixture
def finding(diff_session: DiffSession, request: pytest.FixtureRequest) -> FindingCheck:
    """Row checks and the verdict-concluding step shared by the finding tests."""
    # user_properties directly: the record_property fixture warns under junit xunit2.
    return FindingCheck(
        diff_session, lambda name, value: request.node.user_properties.append((name, value))
    )


@pytest.fixture
def curve_snapshot(
    snapshot: Any, diff_session: DiffSession, pair: PairSpec, request: pytest.FixtureRequest
) -> Any:
    """syrupy's ``snapshot`` with the tolerant curve extension (``--curve-atol/--curve-rtol``).

    Snapshots live in ``<snapshot dir>/<scope>/<test file>/`` where scope is the pair's
    model group (``labels/<label>`` for an ad-hoc ``--label`` series), so a run never
    reports or touches another scope's snapshots (``reasondiff.snapshots``). An ad-hoc
    pair without ``--label`` has no scope: the test is skipped.
    """
    extension = diff_session.snapshot_extension(pair)
    if extension is None:
        pytest.skip(
            f"{pair.pair_id}: ad-hoc comparison without --label is measured and reported, "
            "not snapshotted (give --label NAME to track a checkpoint series)"
        )
    if pair.label and diff_session.bundle is None:  # a replay knows only the label's slug
        from .snapshots import DEFAULT_SNAPSHOT_DIRNAME, claim_label_scope

        opts = diff_session.options
        root = (
            Path(opts.snapshot_dir).expanduser()
            if opts.snapshot_dir
            else request.path.parent / DEFAULT_SNAPSHOT_DIRNAME
        )
        try:
            claim_label_scope(
                root,
                pair.label,
                write=bool(getattr(request.config.option, "update_snapshots", False)),
            )
        except ReasondiffError as exc:
            pytest.fail(f"{pair.pair_id}: {_one_line(str(exc))}", pytrace=False)
    return snapshot.use_extension(extension)


# ---------------------------------------------------------------------- snapshot guard
_SNAPSHOTS_AT_RISK = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Remember a curve-snapshot test that failed or errored (issue 15.1)."""
    report = yield
    if report.failed and "curve_snapshot" in getattr(item, "fixturenames", ()):
        item.stash[_SNAPSHOTS_AT_RISK] = True
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """A failed pair's accepted curve snapshots are kept, never judged unused.

    syrupy counts every snapshot of a failed test that the test did not assert as
    unused, and deletes it under ``--snapshot-update``: a pair whose data is damaged
    (a NaN in a bundle, a load error) would lose its accepted curves. Told that the test
    was *skipped*, syrupy keeps them, as it does for any skipped test. The test itself
    still fails; only syrupy's bookkeeping changes. Snapshots it did assert are judged
    as usual, and a non-finite curve is never written (``CurveSnapshotExtension``).
    """
    result = yield
    if item.stash.get(_SNAPSHOTS_AT_RISK, False):
        syrupy_session = getattr(item.config, "_syrupy", None)
        ran_item = getattr(syrupy_session, "ran_item", None)
        if ran_item is not None:
            ran_item(item.nodeid, "skipped")
    return result


# ---------------------------------------------------------------------- finding helper
class FindingCheck:
    """What every finding test does around its :mod:`reasondiff.findings` call.

    ``judge`` calls a finding function with the run's options and turns input it cannot
    judge (NaN or Inf rows, named by model, layer and trace) into a one-line failure;
    ``conclude`` records the verdict (report, bundle, junit property) and
    fails in one line when an expectation is set and not met. The verdict also goes to
    the test's ``user_properties`` (``reasondiff.<finding>``: status and summary), which
    junit XML reports carry.
    """

    def __init__(
        self, session: DiffSession, record_property: Callable[[str, object], None]
    ) -> None:
        self.session = session
        self.options = session.options
        self._record_property = record_property

    def judge(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, options=..., curves=..., **kwargs)``: a :mod:`reasondiff.findings`
        function with this run's thresholds and memoized curves.

        Input it cannot judge fails in one line naming the pair, metric, layer and trace;
        nothing to judge (one trace set) is a skip, and so is a weights-only bundle.
        """
        __tracebackhide__ = True
        from .findings import FindingInputError, FindingNotApplicable, FindingOptions, NoCkaRows

        try:
            return fn(
                *args,
                options=FindingOptions.from_options(self.options),
                curves=self.session.curves,
                **kwargs,
            )
        except NoCkaRows as exc:
            if self.session.bundle is not None:
                # A weights-only bundle (e.g. another tool's per-tensor CSV) has nothing
                # for a CKA finding to judge; a live run or a bundle with rows still fails.
                pytest.skip(
                    f"{exc.pair_id}: the results bundle {' '.join(self.options.from_results or ())} has no "
                    f"CKA rows for this pair (weights only); CKA findings need its cka.csv"
                )
            pytest.fail(_one_line(str(exc)), pytrace=False)
        except FindingNotApplicable as exc:
            pytest.skip(_one_line(str(exc)))
        except FindingInputError as exc:
            pytest.fail(_one_line(str(exc)), pytrace=False)

    def result(self, pair: PairSpec) -> PairResult:
        """The result of any selected pair (group-level findings pool several)."""
        __tracebackhide__ = True
        return obtain_result(self.session, pair)

    def conclude(self, verdict: Verdict) -> None:
        """Record ``verdict``; fail in one line if it contradicts its expectation."""
        __tracebackhide__ = True
        verdict.summary = _one_line(verdict.summary)
        self.session.record_verdict(verdict)
        self._record_property(
            f"reasondiff.{verdict.finding}", f"{verdict.status}: {verdict.summary}"
        )
        if verdict.expected is None or verdict.observed == verdict.expected:
            return
        pytest.fail(
            f"{verdict.subject} {verdict.finding}: expected {_word(verdict.expected)}, "
            f"observed {_word(verdict.observed)}: {verdict.summary}",
            pytrace=False,
        )


def _word(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "undecided"}[value]


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------- xdist / end of session
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    ds = config.stash.get(SESSION_KEY, None)
    if ds is None:
        return
    if (
        ds.options.shard is not None
        and not ds.pairs
        and exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED
    ):
        session.exitstatus = pytest.ExitCode.OK  # an empty shard is not an error (see header)
    from reasondiff.fixtures.toy import drain_notes

    ds.notes.extend(n for n in drain_notes() if n not in ds.notes)  # toy checkpoints rebuilt
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[_WORKER_OUTPUT_KEY] = pack_worker_output(
            results=ds.ordered_results(),
            verdicts=ds.ordered_verdicts(),
            stats=ds.stats,
            stage_seconds=ds.stage_seconds,
            notes=ds.notes,
        )
        return
    if ds.options.report_dir and ds.results:
        _write_outputs(ds, Path(ds.options.report_dir))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """On the xdist controller: fold one worker's results into the controller session."""
    ds = node.config.stash.get(SESSION_KEY, None)
    output = getattr(node, "workeroutput", None) or {}
    if ds is not None and _WORKER_OUTPUT_KEY in output:
        ds.merge(*unpack_worker_output(output[_WORKER_OUTPUT_KEY]))


def _write_outputs(ds: DiffSession, out_dir: Path) -> None:
    from .bundle import write_bundle
    from .dtypes import dtypes_from_notes
    from .traces import generators_from_notes

    config = ds.options.to_dict()
    config["dtype_resolved"] = dtypes_from_notes(n for r in ds.ordered_results() for n in r.notes)
    config["trace_generators"] = generators_from_notes(
        n for r in ds.ordered_results() for n in r.notes
    )
    source = getattr(ds, "bundle", None)
    if source is None:
        engine = getattr(ds, "engine", None)  # what a merge checks the trace sets by
        if engine is not None:
            config["trace_hashes"] = engine.trace_hashes()
    else:
        # A replay measured nothing: how the numbers were made is the bundle's config,
        # never this machine's --device / --dtype (issue 15.3).
        from .preflight import REPLAY_REFUSED

        measured = {flag.lstrip("-").replace("-", "_") for flag in REPLAY_REFUSED}
        for key in measured | {"dtype_resolved", "trace_generators", "trace_hashes"}:
            if key in source.config:
                config[key] = source.config[key]
            else:
                config.pop(key, None)
        config["replayed_from"] = list(ds.options.from_results or ())
    write_bundle(out_dir, ds.ordered_results(), ds.ordered_verdicts(), config=config)
    ds.notes.append(f"results bundle written to {out_dir}")
    try:
        from reasondiff.reports import write_figures, write_index
    except ImportError:
        return
    data = ds.report_data()
    figures = write_figures(data, out_dir)
    write_index(data, out_dir, figures)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    ds = config.stash.get(SESSION_KEY, None)
    if ds is None or getattr(config, "workerinput", None) is not None:
        return
    if not ds.results and not ds.verdicts:
        return
    data = ds.report_data()
    terminalreporter.section("reasondiff")
    from reasondiff.reports import make_console, render_terminal

    tw = terminalreporter._tw
    console = make_console(
        tw._file, color=config.getoption("color", "auto") or "auto", width=tw.fullwidth
    )
    render_terminal(data, console=console)
