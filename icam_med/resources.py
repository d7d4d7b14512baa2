"""Files that ship with icam-med: the run configs, the demo model, and where samples are cached.

In a checkout these are the top-level ``configs/`` and ``sample_data/`` folders; in a wheel
they are package data (``icam_med/configs/``, ``icam_med/sample_data/``, mapped in
pyproject.toml). Either way they are found through :mod:`importlib.resources`, never through
a path relative to the source tree, so ``pip install icam-med`` works without the checkout.

Example::

    >>> from icam_med.resources import packaged_config
    >>> packaged_config("demo").name
    'demo.yaml'
    >>> resolve_config("demo")            # a packaged name, from any directory
    PosixPath('.../icam_med/configs/demo.yaml')

Sample scans are generated, not shipped (licence: see sample_data/README.md). They are built
on demand (:func:`icam_med.evaluation.samples.ensure_sample_scans`) into
:func:`sample_scans_dir`: ``$ICAM_MED_SAMPLE_DIR`` when set (``make napari`` points it at the
checkout's ``sample_data/scans``), otherwise the per-user cache folder that
:func:`platformdirs.user_cache_path` names for ``icam-med`` (``~/.cache/icam-med/sample_scans``
on Linux).

This module imports nothing else of icam_med, so config loading can use it.
"""

from __future__ import annotations

import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = [
    "CONFIG_PACKAGE",
    "CONFIG_SUFFIXES",
    "DEFAULT_CONFIG",
    "MODEL_PACKAGE",
    "SAMPLE_DIR_ENV",
    "demo_model_card",
    "packaged_config",
    "packaged_configs",
    "resolve_config",
    "sample_scans_dir",
]

#: The package whose data are the run configs (the checkout's ``configs/``).
CONFIG_PACKAGE = "icam_med.configs"
#: The package whose data are the demo model's weights, card and training record
#: (the checkout's ``sample_data/``).
MODEL_PACKAGE = "icam_med.sample_data"
#: The config offered first (the trained demo model).
DEFAULT_CONFIG = "demo"
CONFIG_SUFFIXES: tuple[str, ...] = (".yaml", ".yml")
#: Environment variable naming the folder for the generated sample scans.
SAMPLE_DIR_ENV = "ICAM_MED_SAMPLE_DIR"


def _as_path(entry: Traversable, what: str) -> Path:
    if not isinstance(entry, Path):
        raise RuntimeError(
            f"{what} is not on the file system ({entry!r}); install icam-med as an unpacked "
            "package (pip install), not from a zip file.")
    return entry


def _package_files(package: str) -> list[Path]:
    try:
        root = resources.files(package)
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            f"the package data '{package}' is missing from this installation of icam-med; "
            "reinstall it (pip install icam-med, or pip install -e . in a checkout).") from exc
    return sorted((_as_path(e, package) for e in root.iterdir() if e.is_file()),
                  key=lambda p: p.name)


def packaged_configs() -> list[Path]:
    """The run configs that ship with icam-med, the demo config first, then by name."""
    found = [p for p in _package_files(CONFIG_PACKAGE) if p.suffix in CONFIG_SUFFIXES]
    return sorted(found, key=lambda p: (p.stem != DEFAULT_CONFIG, p.name))


def packaged_config(name: str) -> Path:
    """A packaged config by name (``"demo"`` or ``"demo.yaml"``).

    Raises:
        FileNotFoundError: no packaged config has that name; the message lists them.
    """
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in CONFIG_SUFFIXES else name
    configs = packaged_configs()
    for path in configs:
        if path.stem == stem:
            return path
    raise FileNotFoundError(
        f"there is no packaged config named '{name}'; the packaged configs are "
        f"{[p.stem for p in configs]} (or pass the path of a YAML file).")


def resolve_config(path: str | Path) -> Path:
    """The config file a user named: an existing file, or else a packaged config's name.

    ``configs/demo.yaml`` (a file) is taken as it is; ``demo`` or ``demo.yaml`` with no such
    file in the working directory is the packaged demo config. A file always wins over a
    packaged name.

    Raises:
        FileNotFoundError: neither a file nor a packaged name; the message lists the names.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    configs = packaged_configs()
    if len(p.parts) == 1 and (not p.suffix or p.suffix in CONFIG_SUFFIXES):
        for config in configs:
            if config.stem == p.stem:
                return config
    state = "is not a file" if p.exists() else "does not exist"
    raise FileNotFoundError(
        f"config file {p} {state}; pass the path of a YAML config, or the name of a "
        f"packaged one: {', '.join(c.stem for c in configs)}.")


def demo_model_card() -> Path:
    """The demo model's card (intended use, training data, limitations), a Markdown file."""
    return _as_path(resources.files(MODEL_PACKAGE).joinpath("MODEL_CARD.md"), MODEL_PACKAGE)


def sample_scans_dir() -> Path:
    """Where the generated sample scans live: ``$ICAM_MED_SAMPLE_DIR``, else the user cache.

    The folder is not created here (:func:`icam_med.evaluation.samples.ensure_sample_scans`
    builds it on demand).
    """
    chosen = os.environ.get(SAMPLE_DIR_ENV, "").strip()
    if chosen:
        return Path(chosen).expanduser().resolve()
    import platformdirs

    return platformdirs.user_cache_path("icam-med") / "sample_scans"
