"""The model registry: which models exist, how they pair up, what is expected of them.

The facts live in ``registry.toml`` (data, not code); this module only parses and
validates them and answers questions (groups, pairs, expectations). It does no I/O
beyond reading the TOML files it is given.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import RegistryError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

METHODS = ("SFT", "RL", "SFT+RL")
FINDINGS = (
    "bathtub",
    "bathtub_explained",
    "final_layer_lowest",
    "weight_distributed",
    "trace_invariant",
)
GROUP_FINDINGS = ("sft_more_than_rl",)
_MODEL_KEYS = {
    "source",
    "base",
    "method",
    "groups",
    "think_token_ids",
    "expect",
    "label",
    "study_dip",
}
_GROUP_KEYS = {"description", "traces", "expect"}


@dataclass(frozen=True)
class ModelSpec:
    """One checkpoint: where it comes from and how it relates to others."""

    key: str
    source: str  # hub id[@rev], local path, or toy:<recipe>
    base: str | None = None
    method: str | None = None
    groups: tuple[str, ...] = ()
    think_token_ids: tuple[int, ...] = ()
    expect: dict[str, bool] = field(default_factory=dict, hash=False, compare=False)
    #: where the study saw the pair's linear-CKA dip: (first layer, recovery layer);
    #: reported beside the bathtub verdict, never failed (the study says "about")
    study_dip: tuple[int, int] | None = field(default=None, compare=False)

    @property
    def is_toy(self) -> bool:
        return self.source.startswith("toy:")

    @property
    def toy_recipe(self) -> str:
        return self.source.removeprefix("toy:")


@dataclass(frozen=True)
class GroupSpec:
    name: str
    description: str = ""
    traces: str | None = None
    expect: dict[str, bool] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class PairSpec:
    """A base/descendant pair as the suite parametrizes it."""

    base: ModelSpec
    descendant: ModelSpec
    group: str | None
    label: str | None = None  # user label: keys the snapshot of an ad-hoc checkpoint

    @property
    def pair_id(self) -> str:
        """Stable ASCII id: names tests and snapshots, so it must never drift."""
        if self.label:
            return slug(self.label)
        return f"{slug(self.base.key)}__{slug(self.descendant.key)}"

    @property
    def expect(self) -> dict[str, bool]:
        return dict(self.descendant.expect)

    @property
    def method(self) -> str | None:
        return self.descendant.method


def slug(text: str) -> str:
    """ASCII slug safe in test ids and file names (``Qwen/Qwen2.5`` -> ``qwen-qwen2.5``)."""
    out = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-")
    if not out:
        raise RegistryError(f"cannot make an id from {text!r}: no letters or digits")
    return out


@dataclass
class Registry:
    models: dict[str, ModelSpec]
    groups: dict[str, GroupSpec]
    files: tuple[str, ...] = ()
    model_files: dict[str, str] = field(default_factory=dict)  # key -> file that defined it

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, extra: list[str | Path] | None = None, *, builtin: bool = True) -> Registry:
        """Load the built-in registry, then each extra file on top (later wins)."""
        models: dict[str, ModelSpec] = {}
        groups: dict[str, GroupSpec] = {}
        files: list[str] = []
        model_files: dict[str, str] = {}
        sources: list[tuple[str, str]] = []
        if builtin:
            text = resources.files("reasondiff").joinpath("registry.toml").read_text("utf-8")
            sources.append(("<builtin registry.toml>", text))
        for path in extra or []:
            p = Path(path)
            try:
                sources.append((str(p), p.read_text("utf-8")))
            except (OSError, UnicodeDecodeError) as exc:
                raise RegistryError(
                    f"cannot read registry file {p}: {getattr(exc, 'strerror', None) or exc}"
                ) from exc
        for name, text in sources:
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise RegistryError(f"registry file {name} is not valid TOML: {exc}") from exc
            _parse_into(name, data, models, groups)
            model_files.update(dict.fromkeys(data.get("models", {}), name))
            files.append(name)
        reg = cls(models=models, groups=groups, files=tuple(files), model_files=model_files)
        reg.validate()
        return reg

    def _where(self, key: str) -> str:
        """``<file>: [models.<key>]``: where a model was (last) defined."""
        return f"{self.model_files.get(key, 'registry')}: [models.{key}]"

    def validate(self) -> None:
        """Refuse a dangling base, a model that is its own base, a cycle of bases and a
        group no file declares, naming the models and the file (issue 15.4)."""
        for m in self.models.values():
            if m.base is not None and m.base not in self.models:
                raise RegistryError(
                    f"{self._where(m.key)}: base {m.base!r} is not in the registry "
                    f"(known: {', '.join(sorted(self.models))})"
                )
            if m.base == m.key:
                raise RegistryError(
                    f"{self._where(m.key)}: the model is its own base; a pair compares a "
                    "descendant with another model (remove 'base', or name its real base)"
                )
            undeclared = [g for g in m.groups if g not in self.groups]
            if undeclared:
                raise RegistryError(
                    f"{self._where(m.key)}: group(s) {', '.join(map(repr, undeclared))} not "
                    f"declared; add a [groups.{undeclared[0]}] table (declared: "
                    f"{', '.join(sorted(self.groups)) or 'none'})"
                )
        for m in self.models.values():
            chain = [m.key]
            base = m.base
            while base is not None:
                if base in chain:
                    cycle = [*chain[chain.index(base) :], base]
                    files = sorted({self.model_files.get(k, "registry") for k in cycle})
                    raise RegistryError(
                        f"{', '.join(files)}: the bases form a cycle: {' -> '.join(cycle)} "
                        "(each model's base must lead to a model without one)"
                    )
                chain.append(base)
                base = self.models[base].base

    # ------------------------------------------------------------------ queries
    def model(self, key: str) -> ModelSpec:
        try:
            return self.models[key]
        except KeyError:
            raise RegistryError(
                f"unknown model {key!r}; known models: {', '.join(sorted(self.models))}"
            ) from None

    def group(self, name: str) -> GroupSpec:
        try:
            return self.groups[name]
        except KeyError:
            raise RegistryError(
                f"unknown model group {name!r}; known groups: {', '.join(sorted(self.groups))}"
            ) from None

    def pairs(self, group: str) -> list[PairSpec]:
        """Pairs of a group in a deterministic order (by base key, then descendant key)."""
        self.group(group)
        out = [
            PairSpec(base=self.model(m.base), descendant=m, group=group)
            for m in self.models.values()
            if group in m.groups and m.base is not None
        ]
        return sorted(out, key=lambda p: (p.base.key, p.descendant.key))

    def find_by_source(self, source: str) -> ModelSpec | None:
        """Match a model named in a bundle produced elsewhere (hub id or key)."""
        for m in self.models.values():
            if source in (m.key, m.source) or source.split("@")[0] == m.source.split("@")[0]:
                return m
        return None


def adhoc_pair(
    base: str, candidate: str, *, label: str | None = None, method: str | None = None
) -> PairSpec:
    """A pair from --base/--candidate: no expectations, so verdicts are only reported."""
    if method is not None and method not in METHODS:
        raise RegistryError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    b = ModelSpec(key=key_from_source(base), source=base)
    d = ModelSpec(key=key_from_source(candidate), source=candidate, base=b.key, method=method)
    return PairSpec(base=b, descendant=d, group=None, label=label)


def key_from_source(source: str) -> str:
    return slug(source.rstrip("/").split("/")[-1].split("@")[0]) if source else slug(source)


def _parse_into(
    name: str, data: dict[str, Any], models: dict[str, ModelSpec], groups: dict[str, GroupSpec]
) -> None:
    unknown_top = set(data) - {"models", "groups"}
    if unknown_top:
        raise RegistryError(
            f"{name}: unknown top-level table(s) {sorted(unknown_top)}; expected [models.*], [groups.*]"
        )
    for gname, g in data.get("groups", {}).items():
        _check_keys(name, f"groups.{gname}", g, _GROUP_KEYS)
        expect = _expect(name, f"groups.{gname}", g.get("expect", {}), GROUP_FINDINGS)
        groups[gname] = GroupSpec(
            name=gname,
            description=str(g.get("description", "")),
            traces=g.get("traces"),
            expect=expect,
        )
    for key, m in data.get("models", {}).items():
        where = f"models.{key}"
        _check_keys(name, where, m, _MODEL_KEYS)
        if "source" not in m:
            raise RegistryError(f"{name}: [{where}] has no 'source' (hub id, path or toy:<recipe>)")
        method = m.get("method")
        if method is not None and method not in METHODS:
            raise RegistryError(
                f"{name}: [{where}] method {method!r} is not one of {', '.join(METHODS)}"
            )
        groups_of = m.get("groups", [])
        if isinstance(groups_of, str):
            groups_of = [groups_of]
        models[key] = ModelSpec(
            key=key,
            source=str(m["source"]),
            base=m.get("base"),
            method=method,
            groups=tuple(groups_of),
            think_token_ids=tuple(int(t) for t in m.get("think_token_ids", ())),
            expect=_expect(name, where, m.get("expect", {}), FINDINGS),
            study_dip=_study_dip(name, where, m.get("study_dip")),
        )


def _check_keys(name: str, where: str, table: Any, allowed: set[str]) -> None:
    if not isinstance(table, dict):
        raise RegistryError(f"{name}: [{where}] must be a table")
    bad = set(table) - allowed
    if bad:
        raise RegistryError(
            f"{name}: [{where}] has unknown key(s) {sorted(bad)}; allowed: {sorted(allowed)}"
        )


def _expect(name: str, where: str, table: Any, allowed: tuple[str, ...]) -> dict[str, bool]:
    if not isinstance(table, dict):
        raise RegistryError(f"{name}: [{where}].expect must be a table")
    out: dict[str, bool] = {}
    for k, v in table.items():
        if k not in allowed:
            raise RegistryError(
                f"{name}: [{where}].expect has unknown finding {k!r}; known: {', '.join(allowed)}"
            )
        if not isinstance(v, bool):
            raise RegistryError(f"{name}: [{where}].expect.{k} must be true or false, got {v!r}")
        out[k] = v
    return out


def _study_dip(name: str, where: str, value: Any) -> tuple[int, int] | None:
    """``study_dip = [start, recover]``: two layer numbers, start before recover."""
    if value is None:
        return None
    ok = (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        and value[0] < value[1]
    )
    if not ok:
        raise RegistryError(
            f"{name}: [{where}].study_dip must be [start, recover], two layer numbers with "
            f"start < recover, got {value!r}"
        )
    return (int(value[0]), int(value[1]))
