"""The tolerance policy: a versioned TOML file in suites/, judged the same way for every cell.

For each dtype and metric the policy gives
  abs    a hard ceiling for every subject (the reference too),
  factor how many times worse than the reference at the same dtype a subject may be,
  floor  the limit used instead when factor x the reference's error is smaller than it.
So a subject passes when value <= min(abs, max(floor, factor * reference_value)). The relative
part calibrates the policy on every run: the reference's own float64-vs-dtype error says what a
correct implementation at that dtype reaches on this model and input. NaN/Inf never pass.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from harness.core import SUITES
from harness.core.errors import InputError
from harness.core.store import FAIL, PASS

DEFAULT_POLICY = SUITES / "tolerance.toml"


@dataclass(frozen=True)
class Limit:
    abs: float
    factor: float
    floor: float
    reason: str


@dataclass
class Policy:
    version: str
    path: Path
    limits: dict[tuple[str, str], Limit]   # (dtype, metric) -> Limit

    def limit(self, dtype: str, metric: str) -> Limit:
        try:
            return self.limits[(dtype, metric)]
        except KeyError:
            raise InputError(f"{self.path}: no tolerance for dtype {dtype!r}, metric {metric!r}") from None

    def judge(self, dtype: str, metric: str, value: float, reference_value: float | None) -> tuple[float, str, str]:
        """(tolerance, status, reason) for one value; reference_value None judges the reference itself."""
        lim = self.limit(dtype, metric)
        tol = lim.abs
        if reference_value is not None and math.isfinite(reference_value):
            tol = min(lim.abs, max(lim.floor, lim.factor * reference_value))
        if not math.isfinite(value):
            return tol, FAIL, "non-finite value"
        if value <= tol:
            return tol, PASS, ""
        return tol, FAIL, f"{value:.3g} > {tol:.3g}"


def read_policy_toml(path: Path, arg: str) -> dict:
    """A policy file's table, with its string 'version' checked; errors name the argument or file."""
    if not path.is_file():
        raise InputError(f"{arg}: {path}: file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None
    if not isinstance(data.get("version"), str):
        raise InputError(f"{path}: missing string key 'version'")
    return data


def load_policy(path: str | Path | None = None) -> Policy:
    path = Path(path) if path else DEFAULT_POLICY
    data = read_policy_toml(path, "--policy")
    limits = {}
    for dtype, table in data.items():
        if not isinstance(table, dict) or dtype == "metadata":
            continue
        factor = table.get("factor")
        for metric, spec in table.items():
            if not isinstance(spec, dict):
                continue
            where = f"{path}: [{dtype}.{metric}]"
            try:
                lim = Limit(abs=float(spec["abs"]), factor=float(spec.get("factor", factor)),
                            floor=float(spec["floor"]), reason=str(spec["reason"]))
            except (KeyError, TypeError, ValueError) as e:
                raise InputError(f"{where}: needs numbers abs, floor, factor and a reason ({e})") from None
            limits[(dtype, metric)] = lim
    return Policy(data["version"], path, limits)
