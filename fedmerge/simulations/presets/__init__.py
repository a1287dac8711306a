"""Experiment presets shipped inside the package (``fedmerge/simulations/presets/*.toml``)."""

from importlib import resources
from pathlib import Path

from fedmerge.errors import FedmergeError
from fedmerge.simulations.spec import load_toml

PACKAGE = __name__


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(PACKAGE).iterdir() if p.name.endswith(".toml"))


def preset_path(name: str) -> Path:
    path = resources.files(PACKAGE) / f"{name}.toml"
    if not path.is_file():
        raise FedmergeError(f"unknown preset {name!r}; the presets are {', '.join(preset_names())} (or give a .toml file).")
    return Path(str(path))


def load_experiment(source: str | None) -> dict:
    """The nested spec of a preset name or a TOML file path (``None``: the ``default`` preset)."""
    if source is None:
        return load_toml(preset_path("default"))
    if source.endswith(".toml") or Path(source).exists():
        return load_toml(source)
    return load_toml(preset_path(source))
