"""The versions tuner runs with, read from package metadata (nothing is imported)."""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from tuner import __version__

# The Optuna releases tuner runs on; pyproject.toml's `optuna` dependency says the same
# (tests/test_startup.py checks that the two agree).
OPTUNA_REQUIREMENT = ">=5.0,<5.2"


@cache
def installed_version(dist: str) -> str | None:
    """The installed version of distribution `dist`, read from its metadata (nothing is imported)."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def optuna_problem(found: str | None) -> str | None:
    """Why Optuna version `found` (None: not installed) cannot run tuner, as one line; None if it can.
    Development and pre-releases inside the range are accepted (5.1.0.dev0), those of its ends are not."""
    if found is not None:
        try:
            if SpecifierSet(OPTUNA_REQUIREMENT).contains(Version(found), prereleases=True):
                return None
        except InvalidVersion:
            pass
    return (f"tuner needs optuna{OPTUNA_REQUIREMENT}, found {found or 'none'} "
            f"(pip install 'optuna{OPTUNA_REQUIREMENT}')")


def versions() -> dict[str, str]:
    """tuner's, Optuna's and torch's versions (from package metadata: torch is not imported)."""
    return {"tuner": __version__, "optuna": installed_version("optuna") or "not installed",
            "torch": installed_version("torch") or "not installed"}
