"""TOML files shipped inside the package: experiment presets (``presets/*.toml``) and study sweeps
(``presets/studies/*.toml``), found by name."""

from importlib import resources
from pathlib import Path

from fedmerge.errors import FedmergeError
from fedmerge.simulations.spec import load_toml
from fedmerge.tasks.suites import search_beside

PACKAGE = __name__
FOLDERS = {"preset": None, "study": "studies"}


def _folder(kind: str):
    root = resources.files(PACKAGE)
    return root / FOLDERS[kind] if FOLDERS[kind] else root


def shipped_names(kind: str = "preset") -> list[str]:
    """The names of the shipped files of ``kind`` ("preset" or "study")."""
    return sorted(p.name[:-5] for p in _folder(kind).iterdir() if p.name.endswith(".toml"))


def shipped_path(name: str, kind: str = "preset") -> Path:
    """The path of the shipped ``kind`` file called ``name``; an unknown name is refused, listing the known."""
    path = _folder(kind) / f"{name}.toml"
    if not path.is_file():
        raise FedmergeError(
            f"unknown {kind} {name!r}; choose one of {', '.join(shipped_names(kind))}, or give a .toml file."
        )
    return Path(str(path))


def load_experiment(source: str | None) -> dict:
    """The nested spec of a preset name or a TOML file path (``None``: the ``default`` preset)."""
    if source is None:
        return load_toml(shipped_path("default"))
    if source.endswith(".toml") or Path(source).exists():
        search_beside(source)
        return load_toml(source)
    return load_toml(shipped_path(source))
