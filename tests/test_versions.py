"""The tested transformers releases are one list (suites/releases.toml): the install, tox and the
untested-release banner all follow it."""
from __future__ import annotations

import configparser
import re
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from harness.core import environment as env_mod
from harness.core import releases
from harness.results import headline

ROOT = Path(__file__).resolve().parent.parent


def _transformers_spec() -> SpecifierSet:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"transformers\b", d))
    return SpecifierSet(spec.removeprefix("transformers"))


def test_the_install_resolves_a_tested_release():
    """pyproject admits every tested release and nothing past the newest one's minor series, so the
    README's `pip install -e .` resolves a release on the list (or an older one the banner names)."""
    spec, tested = _transformers_spec(), [Version(v) for v in releases.tested()]
    assert all(v in spec for v in tested), (spec, tested)
    newest = max(tested)
    assert Version(f"{newest.major}.{newest.minor + 1}.0") not in spec
    assert Version(f"{newest.major + 1}.0.0") not in spec


def test_tox_pins_only_tested_releases():
    """The release matrix ([testenv]'s factor pins); the museum envs (tox -m history) pin the
    releases of old bugs on purpose and are not a claim of support."""
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    pins = set(re.findall(r"transformers==([0-9.]+)", tox["testenv"]["deps"]))
    assert pins and pins <= set(releases.tested()), pins - set(releases.tested())


def test_banner_triggers_from_the_list(monkeypatch):
    real = env_mod._version
    if releases.is_tested(real("transformers")):       # every tox env installs a tested release
        assert headline.banner({"environment": env_mod.environment()}) == ""
    monkeypatch.setattr(env_mod, "_version", lambda m: "5.99.0" if m == "transformers" else real(m))
    env = env_mod.environment()
    assert env["transformers_tested"] is False and env["tested_releases"] == ", ".join(releases.tested())
    said = headline.banner({"environment": env})
    assert "5.99.0 is not a release this harness was tested on" in said and releases.tested()[-1] in said
    monkeypatch.setattr(env_mod, "_version", lambda m: releases.tested()[0] if m == "transformers" else real(m))
    assert headline.banner({"environment": env_mod.environment()}) == ""
