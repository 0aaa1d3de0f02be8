"""Hydra's sweep syntax as an Optuna search space, the way Hydra's Optuna sweeper reads it.

    optim.lr='tag(log, interval(1e-4, 1e-2))'   FloatDistribution(1e-4, 1e-2, log=True)
    model.dropout='interval(0, 0.2)'            FloatDistribution(0, 0.2)
    model.n_layer='int(interval(2, 8))'         IntDistribution(2, 8)    (ints: IntDistribution)
    train.micro_batch='choice(4, 8, 16)'        CategoricalDistribution((4, 8, 16))
    model.n_layer='range(2, 9, 2)'              IntDistribution(2, 8, step=2): range's stop is
                                                exclusive, as everywhere in Hydra
    'shuffle(range(...))'                       CategoricalDistribution of the values
    optim.beta2=0.99                            fixed: passed to every trial as it is

`interval` is continuous, `choice` and `range` are finite: only the finite ones can make a grid
(`grid_values`). Errors name the override and the fix in one line (`SweepError`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from hydra.errors import CompactHydraException, OverrideParseException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)


class SweepError(CompactHydraException):
    """A sweep that cannot run as asked; Hydra prints the message alone, in one line."""


def _choices(override: Override) -> list[Any]:
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    for v in values:
        if not isinstance(v, (str, int, float, bool, type(None))):
            raise SweepError(
                f"error: {override.input_line}: a choice must be a number, string, bool or null, "
                f"not {type(v).__name__}"
            )
    return values


def distribution(override: Override) -> BaseDistribution | None:
    """The distribution a sweep override describes; None for a fixed value."""
    if not override.is_sweep_override():
        return None
    value = override.value()
    try:
        if override.is_choice_sweep():
            assert isinstance(value, ChoiceSweep)
            return CategoricalDistribution(_choices(override))
        if override.is_range_sweep():
            assert isinstance(value, RangeSweep)
            values = _choices(override)
            if value.shuffle or not values:
                return CategoricalDistribution(values)
            step = value.step if value.step is not None else 1
            if all(isinstance(v, int) for v in (value.start, value.stop, step)):
                return IntDistribution(int(values[0]), int(values[-1]), step=int(step))
            return FloatDistribution(float(values[0]), float(values[-1]), step=float(step))
        if override.is_interval_sweep():
            assert isinstance(value, IntervalSweep)
            log = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):
                return IntDistribution(int(value.start), int(value.end), log=log)
            return FloatDistribution(float(value.start), float(value.end), log=log)  # type: ignore[arg-type]
    except ValueError as e:  # Optuna's own checks: low > high, log of a non-positive bound, ...
        raise SweepError(f"error: {override.input_line}: {e}") from None
    raise SweepError(f"error: {override.input_line}: this kind of sweep is not supported")


def parse(arguments: Sequence[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """(search space, fixed overrides) from overrides in Hydra's syntax; a fixed override is
    kept as it was written (`+key=value`, `~key` and all)."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(arguments))
    except OverrideParseException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SweepError(f"error: cannot parse a sweep override: {first}") from None
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in parsed:
        key = override.get_key_element()
        dist = distribution(override)
        if dist is None:
            fixed[key] = override.input_line or f"{key}={override.get_value_element_as_str()}"
            space.pop(key, None)  # a later fixed value wins, as on Hydra's command line
        else:
            space[key] = dist
            fixed.pop(key, None)
    return space, fixed


def grid_values(space: dict[str, BaseDistribution]) -> dict[str, list[Any]]:
    """Every value of each parameter, for the grid sampler; continuous ones are refused."""
    grid: dict[str, list[Any]] = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            grid[key] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            grid[key] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            n = int(round((dist.high - dist.low) / dist.step)) + 1
            grid[key] = [dist.low + i * dist.step for i in range(n)]
        else:
            raise SweepError(
                f"error: hydra.sweeper.sampler=grid needs a finite set of values, but {key} is "
                f"continuous ({describe(dist)}): give it as choice(...) or range(...), or use "
                "another sampler (tpe, random)"
            )
    return grid


def describe(dist: BaseDistribution) -> str:
    """A distribution in the sweep syntax it came from (for messages and the study's record)."""
    if isinstance(dist, CategoricalDistribution):
        return f"choice({', '.join(str(c) for c in dist.choices)})"
    if isinstance(dist, IntDistribution) and dist.step != 1:
        return f"range({dist.low}, {dist.high + dist.step}, {dist.step})"
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        return f"range({dist.low}, {dist.high + dist.step}, {dist.step})"
    if isinstance(dist, (IntDistribution, FloatDistribution)):
        body = f"interval({dist.low}, {dist.high})"
        if isinstance(dist, IntDistribution):
            body = f"int({body})"
        return f"tag(log, {body})" if dist.log else body
    return repr(dist)


# An override value Hydra reads back as the same value without quotes.
_PLAIN = re.compile(r"^[A-Za-z0-9_./:+\-]+$")


def override_value(value: Any) -> str:
    """`value` written so that Hydra's override parser reads it back as the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.match(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
