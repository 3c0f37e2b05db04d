"""Playbooks: named, cumulative rollout stages (YAML + pydantic -> frozen dataclasses).

`load_playbook` is the only function here that reads a file. Everything else is pure:
`resolve_stages` turns a playbook plus a fleet (and its pairs) into the hosts each stage adds.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rollout import model
from rollout.errors import PlaybookError
from rollout.pairing import compute_pairs, matches

OnFailure = Literal["rollback", "pause"]
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")
_DURATION_UNITS = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Size:
    """An absolute count or a percentage of some total (batch sizes, failure budgets)."""

    count: int | None = None
    percent: float | None = None

    def __post_init__(self) -> None:
        if (self.count is None) == (self.percent is None):
            raise ValueError("Size needs exactly one of count or percent")

    def of(self, total: int, *, round_up: bool) -> int:
        """Resolve against `total`: batches round up (at least 1), budgets round down."""
        if self.count is not None:
            return self.count
        exact = (self.percent or 0.0) * total / 100.0
        return max(1, math.ceil(exact - 1e-9)) if round_up else math.floor(exact + 1e-9)

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent:g}%"

    @classmethod
    def parse(cls, value: int | str) -> Size:
        if isinstance(value, int):
            return cls(count=value)
        match = _SIZE_RE.match(value)
        if not match:
            raise ValueError(f"{value!r} is neither a count nor a percentage like '25%'")
        return cls(percent=float(match.group(1)))


@dataclass(frozen=True, kw_only=True)
class Gates:
    """Health gate after every batch: bounded wait, soak with repeated samples, optional rekey."""

    timeout: float = 300.0  # seconds for every expected SA to come up
    soak: float = 60.0  # seconds to keep watching after they are up
    samples: int = 3  # health samples taken during the soak
    rekey: bool = False  # force a CHILD_SA rekey and re-check (PFS mismatches only show then)
    probe: bool = True  # push traffic through each SA and check both byte counters rise


@dataclass(frozen=True, kw_only=True)
class Budgets:
    """Failures tolerated in a stage, counted across its batches, before on_failure triggers."""

    max_unreachable: Size = field(default_factory=lambda: Size(count=0))
    max_ipsec_failures: Size = field(default_factory=lambda: Size(count=0))


@dataclass(frozen=True, kw_only=True)
class StageSelector:
    """Which hosts a stage enables: `criteria`, narrowed by fraction / count, or one `pair`."""

    criteria: model.Selector = field(default_factory=model.Selector)
    fraction: float | None = None
    count: int | None = None
    pair: bool = False
    a: model.Selector | None = None  # with pair: what the first end must also match
    b: model.Selector | None = None


@dataclass(frozen=True, kw_only=True)
class Stage:
    name: str
    description: str = ""
    selector: StageSelector
    batch: Size = field(default_factory=lambda: Size(percent=25.0))
    parallelism: int = 10
    gates: Gates = field(default_factory=Gates)
    budgets: Budgets = field(default_factory=Budgets)
    on_failure: OnFailure = "rollback"
    enforce: bool | None = None  # None: the inventory's ipsec.enforce


@dataclass(frozen=True, kw_only=True)
class Playbook:
    name: str
    description: str = ""
    stages: tuple[Stage, ...]
    source: str = field(default="", compare=False)  # the file it came from (messages only; not digested)


# --------------------------------------------------------------------------------------------
# YAML schema (pydantic); converted to the dataclasses above
# --------------------------------------------------------------------------------------------
class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _HostSelectorSpec(_Spec):
    sites: list[str] = []
    clusters: list[str] = []
    tiers: list[Literal["core", "edge"]] = []
    hosts: list[str] = []


class _SelectSpec(_HostSelectorSpec):
    fraction: float | None = Field(default=None, gt=0, le=1)
    count: int | None = Field(default=None, ge=1)
    pair: bool = False
    a: _HostSelectorSpec | None = None
    b: _HostSelectorSpec | None = None


class _GatesSpec(_Spec):
    timeout: float | str | None = None
    soak: float | str | None = None
    samples: int | None = Field(default=None, ge=1)
    rekey: bool | None = None
    probe: bool | None = None

    @field_validator("timeout", "soak")
    @classmethod
    def _duration(cls, value: float | str | None) -> float | str | None:
        return None if value is None else parse_duration(value)


class _BudgetsSpec(_Spec):
    max_unreachable: int | str | None = None
    max_ipsec_failures: int | str | None = None

    @field_validator("max_unreachable", "max_ipsec_failures")
    @classmethod
    def _size(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 0:
            raise ValueError("a failure budget cannot be negative")
        if value is not None:
            Size.parse(value)
        return value


class _StageSettingsSpec(_Spec):
    batch: int | str | None = None
    parallelism: int | None = Field(default=None, ge=1)
    gates: _GatesSpec | None = None
    budgets: _BudgetsSpec | None = None
    on_failure: OnFailure | None = None
    enforce: bool | None = None

    @field_validator("batch")
    @classmethod
    def _batch(cls, value: int | str | None) -> int | str | None:
        if value is None:
            return None
        size = Size.parse(value)
        if (size.count is not None and size.count < 1) or (
            size.percent is not None and not 0 < size.percent <= 100
        ):
            raise ValueError("a batch is at least 1 host, or a percentage in (0, 100]")
        return value


class _StageSpec(_StageSettingsSpec):
    name: str = Field(min_length=1)
    description: str = ""
    select: _SelectSpec


class _PlaybookSpec(_Spec):
    name: str = Field(min_length=1)
    description: str = ""
    defaults: _StageSettingsSpec = _StageSettingsSpec()
    stages: list[_StageSpec] = Field(min_length=1)


def parse_duration(value: float | str) -> float:
    """Seconds from a number or a string like '90', '30s', '5m', '1h'."""
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    match = _DURATION_RE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration such as 90, '30s', '5m' or '1h'")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _selector(spec: _HostSelectorSpec) -> model.Selector:
    return model.Selector(
        sites=tuple(spec.sites), clusters=tuple(spec.clusters),
        tiers=tuple(model.Tier(t) for t in spec.tiers), hosts=tuple(spec.hosts),
    )


def _stage_selector(spec: _SelectSpec) -> StageSelector:
    return StageSelector(
        criteria=_selector(spec), fraction=spec.fraction, count=spec.count, pair=spec.pair,
        a=_selector(spec.a) if spec.a else None, b=_selector(spec.b) if spec.b else None,
    )


def _pick(name: str, *layers: _Spec | None) -> Any:
    """The first layer (stage, then defaults) that sets `name`."""
    for layer in layers:
        value = getattr(layer, name) if layer is not None else None
        if value is not None:
            return value
    return None


def _gates(*layers: _GatesSpec | None) -> Gates:
    values = {k: _pick(k, *layers) for k in _GatesSpec.model_fields}
    return Gates(**{k: v for k, v in values.items() if v is not None})


def _budgets(*layers: _BudgetsSpec | None) -> Budgets:
    values = {k: _pick(k, *layers) for k in _BudgetsSpec.model_fields}
    return Budgets(**{k: Size.parse(v) for k, v in values.items() if v is not None})


def _stage(spec: _StageSpec, defaults: _StageSettingsSpec) -> Stage:
    layers = (spec, defaults)
    batch, parallelism = _pick("batch", *layers), _pick("parallelism", *layers)
    optional: dict[str, Any] = {
        "batch": Size.parse(batch) if batch is not None else None,
        "parallelism": parallelism, "on_failure": _pick("on_failure", *layers),
    }
    return Stage(
        name=spec.name, description=spec.description, selector=_stage_selector(spec.select),
        gates=_gates(spec.gates, defaults.gates), budgets=_budgets(spec.budgets, defaults.budgets),
        enforce=_pick("enforce", *layers), **{k: v for k, v in optional.items() if v is not None},
    )


def playbook_from_spec(spec: _PlaybookSpec, *, source: str = "") -> Playbook:
    return Playbook(
        name=spec.name, description=spec.description, source=source,
        stages=tuple(_stage(s, spec.defaults) for s in spec.stages),
    )


# --------------------------------------------------------------------------------------------
# Loading (the only I/O) and error messages
# --------------------------------------------------------------------------------------------
def load_playbook(path: Path, fleet: model.Fleet, pairs: Sequence[model.Pair] | None = None) -> Playbook:
    """Read, validate and resolve one playbook against `fleet`. Raises errors.PlaybookError.

    `pairs` (from pairing.compute_pairs) is computed here when a stage asks for a pair and the
    caller did not pass them."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlaybookError(f"cannot read the playbook: {exc.strerror}", file=source,
                            hint="pass a playbook file or a name from --playbooks DIR") from None
    playbook = parse_playbook(text, source=source)
    if pairs is None and any(s.selector.pair for s in playbook.stages):
        pairs = compute_pairs(fleet)
    resolve_stages(playbook, fleet, pairs or ())
    return playbook


def parse_playbook(text: str, *, source: str = "<playbook>") -> Playbook:
    """Parse and schema-check playbook YAML (no fleet checks). Raises errors.PlaybookError."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PlaybookError(f"invalid YAML: {_yaml_problem(exc)}", file=source,
                            hint="fix the YAML syntax (indentation, quoting, ':' after keys)") from None
    except RecursionError:
        raise PlaybookError("invalid YAML: nesting too deep", file=source,
                            hint="a playbook is at most a few levels deep") from None
    if not isinstance(data, dict):
        raise PlaybookError("a playbook is a mapping with 'name' and 'stages'", file=source,
                            hint="see docs/playbooks.md for the schema")
    try:
        spec = _PlaybookSpec.model_validate(data)
    except ValidationError as exc:
        raise _schema_error(exc, data, text, source) from None
    _check_unique_names(spec, source)
    _check_select_combinations(spec, source)
    return playbook_from_spec(spec, source=source)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc)
    text = exc.problem or str(exc)
    if exc.problem_mark is not None:
        text = f"line {exc.problem_mark.line + 1}: {text}"
    if exc.context and exc.context_mark is not None:
        text += f" ({exc.context} at line {exc.context_mark.line + 1})"
    return text


def _check_unique_names(spec: _PlaybookSpec, source: str) -> None:
    seen: set[str] = set()
    for stage in spec.stages:
        if stage.name in seen:
            raise PlaybookError(f"duplicate stage name {stage.name!r}", file=source,
                                key=f"stage {stage.name!r}: name",
                                hint="give every stage a unique name (apply --stage NAME uses it)")
        seen.add(stage.name)


def _check_select_combinations(spec: _PlaybookSpec, source: str) -> None:
    for stage in spec.stages:
        sel, key = stage.select, f"stage {stage.name!r}: select"
        if sel.fraction is not None and sel.count is not None:
            raise PlaybookError("'fraction' and 'count' cannot both be set", file=source, key=key,
                                hint="keep one: fraction: 0.5 (half) or count: 4")
        if sel.pair and (sel.fraction is not None or sel.count is not None):
            raise PlaybookError("'pair: true' selects exactly two hosts; drop fraction/count",
                                file=source, key=key, hint="use pair: true or fraction/count, not both")
        if not sel.pair and (sel.a is not None or sel.b is not None):
            raise PlaybookError("'a:' and 'b:' only make sense with 'pair: true'", file=source,
                                key=key, hint="add pair: true, or move the criteria up into select")


def _allowed_keys(loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the schema model reached by following `loc` (for did-you-mean)."""
    current: type[BaseModel] = _PlaybookSpec
    for part in loc:
        if isinstance(part, int):
            continue
        info = current.model_fields.get(str(part))
        if info is None:
            break
        nested = _model_in(info.annotation)
        if nested is None:
            break
        current = nested
    return list(current.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _where(loc: tuple[int | str, ...], data: Mapping[str, Any]) -> str:
    """'stage "x": select.fraction' from a pydantic location."""
    if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
        stages = data.get("stages")
        name = None
        if isinstance(stages, list) and loc[1] < len(stages) and isinstance(stages[loc[1]], dict):
            name = stages[loc[1]].get("name")
        label = f"stage {name!r}" if name else f"stage #{loc[1] + 1}"
        rest = ".".join(str(p) for p in loc[2:])
        return f"{label}: {rest}" if rest else label
    return ".".join(str(p) for p in loc)


def _line_of(text: str, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the YAML node at `loc` (or its nearest existing parent)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        child = _child(node, part)
        if child is None:
            break
        node, line = child, child.start_mark.line + 1
    return line


def _child(node: yaml.Node | None, part: int | str) -> yaml.Node | None:
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        item: yaml.Node = node.value[part]
        return item
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == part:
                return key if value is None else value
    return None


_UNION_TAGS = frozenset({"int", "str", "float", "bool", "none"})  # pydantic's union-member loc parts
_HINTS = {
    "fraction": "fraction is a share of the hosts the selector matches: 0 < fraction <= 1 (e.g. 0.5)",
    "count": "count is a number of hosts, at least 1",
    "batch": "batch is a host count (e.g. 4) or a percentage of the stage (e.g. '25%')",
    "on_failure": "on_failure is 'rollback' or 'pause'",
    "tiers": "tiers are 'core' or 'edge'",
    "stages": "a playbook needs at least one stage under 'stages:'",
    "timeout": "durations are seconds or strings like '30s', '5m', '1h'",
    "soak": "durations are seconds or strings like '30s', '5m', '1h'",
}


def _schema_error(exc: ValidationError, data: Mapping[str, Any], text: str, source: str) -> PlaybookError:
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])  # typos first
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p)))
    line = _line_of(text, loc)
    file = f"{source}:{line}" if line else source
    key = _where(loc, data)
    last = str(next((p for p in reversed(loc) if isinstance(p, str)), ""))
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(last, allowed, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"allowed keys here: {', '.join(allowed)}"
        return PlaybookError(f"unknown key {last!r}", file=file, key=key, hint=hint)
    if err["type"] == "missing":
        return PlaybookError(f"required key {last!r} is missing", file=file, key=key,
                             hint="see docs/playbooks.md for the schema")
    message = str(err["msg"]).removeprefix("Value error, ")
    return PlaybookError(message, file=file, key=key, hint=_HINTS.get(last, "see docs/playbooks.md"))


# --------------------------------------------------------------------------------------------
# Selection (pure): which hosts each stage adds
# --------------------------------------------------------------------------------------------
def resolve_stages(
    playbook: Playbook, fleet: model.Fleet, pairs: Iterable[model.Pair] = ()
) -> tuple[tuple[str, ...], ...]:
    """The hosts each stage adds (sorted FQDNs). A host appears once, in the first stage
    selecting it. Raises errors.PlaybookError for a selector that selects nothing."""
    pair_list = tuple(pairs)
    enabled: set[str] = set()
    result: list[tuple[str, ...]] = []
    for stage in playbook.stages:
        chosen = _select(stage, fleet, pair_list, enabled, playbook.source)
        added = tuple(sorted(chosen - enabled))
        if not added:
            raise _stage_error(playbook.source, stage, "select",
                               "adds no host: every host it selects was enabled by an earlier stage",
                               "widen the selector, or remove the stage")
        enabled.update(added)
        result.append(added)
    return tuple(result)


def _stage_error(source: str, stage: Stage, key: str, message: str, hint: str) -> PlaybookError:
    return PlaybookError(message, file=source or None, key=f"stage {stage.name!r}: {key}", hint=hint)


def _select(stage: Stage, fleet: model.Fleet, pairs: tuple[model.Pair, ...], enabled: set[str],
            source: str) -> set[str]:
    sel = stage.selector
    for sub_key, sub in (("select", sel.criteria), ("select.a", sel.a), ("select.b", sel.b)):
        if sub is not None:
            _check_names(sub, fleet, stage, sub_key, source)
    matched = [h.fqdn for h in fleet.hosts.values() if matches(sel.criteria, h, fleet)]
    if not matched:
        raise _stage_error(source, stage, "select", f"selects no host ({describe(sel.criteria)})",
                           "check the sites/clusters/tiers/hosts combination against the inventory")
    if sel.pair:
        return _select_pair(stage, fleet, pairs, set(matched), source)
    if sel.count is not None:
        if sel.count > len(matched):
            raise _stage_error(source, stage, "select.count",
                               f"count {sel.count} exceeds the {len(matched)} hosts the selector matches",
                               f"use a count of at most {len(matched)}, or fraction: 1")
        return _prefer_enabled(matched, sel.count, enabled)
    if sel.fraction is not None:
        return _prefer_enabled(matched, max(1, math.ceil(sel.fraction * len(matched) - 1e-9)), enabled)
    return set(matched)


def _prefer_enabled(matched: list[str], k: int, enabled: set[str]) -> set[str]:
    """`k` of `matched` such that hosts already enabled count towards k (cumulative stages:
    'half of eqiad text' means half enabled at the end of the stage), then FQDN order."""
    ordered = [h for h in matched if h in enabled] + [h for h in matched if h not in enabled]
    return set(ordered[:k])


def _select_pair(stage: Stage, fleet: model.Fleet, pairs: tuple[model.Pair, ...], matched: set[str],
                 source: str) -> set[str]:
    sel = stage.selector
    side_a, side_b = sel.a or model.Selector(), sel.b or model.Selector()

    def fits(x: str, y: str) -> bool:
        return (x in matched and y in matched and matches(side_a, fleet.hosts[x], fleet)
                and matches(side_b, fleet.hosts[y], fleet))

    for pair in sorted(pairs):
        if fits(pair.a, pair.b) or fits(pair.b, pair.a):
            return {pair.a, pair.b}
    raise _stage_error(source, stage, "select",
                       f"no pair has one end matching a ({describe(side_a)}) and the other matching "
                       f"b ({describe(side_b)})",
                       "pick sides the pairing rules connect (see `ipsec-rollout inventory pairs`)")


def _check_names(sel: model.Selector, fleet: model.Fleet, stage: Stage, key: str, source: str) -> None:
    for kind, names, known in (("site", sel.sites, fleet.sites), ("cluster", sel.clusters, fleet.clusters)):
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=1)
                hint = (f"did you mean {close[0]!r}?" if close
                        else f"known {kind}s: {', '.join(sorted(known))}")
                raise _stage_error(source, stage, f"{key}.{kind}s", f"unknown {kind} {name!r}", hint)
    for glob in sel.hosts:
        if not any(fnmatch.fnmatchcase(h, glob) for h in fleet.hosts):
            raise _stage_error(source, stage, f"{key}.hosts", f"host pattern {glob!r} matches no host",
                               "patterns are shell globs on the FQDN, e.g. 'cp10*.eqiad.example.net'")


def describe(sel: model.Selector) -> str:
    """Short human text for a selector, e.g. 'sites=esams clusters=cache_text'."""
    parts = [f"{k}={','.join(str(getattr(v, 'value', v)) for v in vals)}"
             for k, vals in (("sites", sel.sites), ("clusters", sel.clusters), ("tiers", sel.tiers),
                             ("hosts", sel.hosts)) if vals]
    return " ".join(parts) or "any host"


# --------------------------------------------------------------------------------------------
# Canonical JSON form (plan files and digests)
# --------------------------------------------------------------------------------------------
def _selector_json(sel: model.Selector | None) -> dict[str, list[str]] | None:
    if sel is None:
        return None
    return {"sites": list(sel.sites), "clusters": list(sel.clusters),
            "tiers": [t.value for t in sel.tiers], "hosts": list(sel.hosts)}


def _selector_back(data: Mapping[str, Any] | None) -> model.Selector | None:
    if data is None:
        return None
    return model.Selector(sites=tuple(data["sites"]), clusters=tuple(data["clusters"]),
                          tiers=tuple(model.Tier(t) for t in data["tiers"]), hosts=tuple(data["hosts"]))


def stage_to_json(stage: Stage) -> dict[str, Any]:
    sel = stage.selector
    return {
        "name": stage.name, "description": stage.description,
        "select": {"criteria": _selector_json(sel.criteria), "fraction": sel.fraction, "count": sel.count,
                   "pair": sel.pair, "a": _selector_json(sel.a), "b": _selector_json(sel.b)},
        "batch": str(stage.batch), "parallelism": stage.parallelism,
        "gates": {"timeout": stage.gates.timeout, "soak": stage.gates.soak, "samples": stage.gates.samples,
                  "rekey": stage.gates.rekey, "probe": stage.gates.probe},
        "budgets": {"max_unreachable": str(stage.budgets.max_unreachable),
                    "max_ipsec_failures": str(stage.budgets.max_ipsec_failures)},
        "on_failure": stage.on_failure, "enforce": stage.enforce,
    }


def _size_back(value: str) -> Size:
    return Size.parse(value if value.endswith("%") else int(value))


def stage_from_json(data: Mapping[str, Any]) -> Stage:
    sel = data["select"]
    return Stage(
        name=data["name"], description=data["description"],
        selector=StageSelector(criteria=_selector_back(sel["criteria"]) or model.Selector(),
                               fraction=sel["fraction"], count=sel["count"], pair=sel["pair"],
                               a=_selector_back(sel["a"]), b=_selector_back(sel["b"])),
        batch=_size_back(data["batch"]), parallelism=data["parallelism"], gates=Gates(**data["gates"]),
        budgets=Budgets(max_unreachable=_size_back(data["budgets"]["max_unreachable"]),
                        max_ipsec_failures=_size_back(data["budgets"]["max_ipsec_failures"])),
        on_failure=data["on_failure"], enforce=data["enforce"],
    )


def playbook_to_json(playbook: Playbook) -> dict[str, Any]:
    """Canonical, path-free form (the `source` file name is deliberately left out)."""
    return {"name": playbook.name, "description": playbook.description,
            "stages": [stage_to_json(s) for s in playbook.stages]}


def playbook_from_json(data: Mapping[str, Any], *, source: str = "") -> Playbook:
    return Playbook(name=data["name"], description=data["description"], source=source,
                    stages=tuple(stage_from_json(s) for s in data["stages"]))
