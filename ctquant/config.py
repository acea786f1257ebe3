"""Settings files under ``configs/``: loading, defaults and a stable hash for provenance.

The shipped configs and model weights live at the repository root (``configs/``, ``models/``: the one
copy in git). A wheel carries them as package data (``ctquant/configs``, ``ctquant/models``, mapped in
``pyproject.toml``); :func:`data_dir` finds them with :mod:`importlib.resources` in an installed
package and falls back to the source tree (editable install, ``PYTHONPATH``).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.resources
import json
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

#: The package's own folder (its code is hashed for provenance).
PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """The folder of shipped data ``name`` (``configs`` or ``models``).

    Installed from a wheel: the package data ``ctquant/<name>``; from a source tree: ``<repo>/<name>``.
    """
    packaged = importlib.resources.files("ctquant").joinpath(name)
    if packaged.is_dir():
        return Path(str(packaged))
    return PACKAGE_DIR.parent / name


#: The folder of configuration files shipped with the project.
CONFIG_DIR = data_dir("configs")
#: The folder of shipped model weights.
MODEL_DIR = data_dir("models")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is an :class:`InputError` naming it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError("config file not found", path) from None
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read config: {str(exc).splitlines()[0]}", path) from None
    if not isinstance(data, dict):
        raise InputError("config must be a YAML mapping", path)
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base``."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def unknown_keys(base: dict[str, Any], override: dict[str, Any], prefix: str = "") -> list[tuple[str, list[str]]]:
    """Keys of ``override`` that ``base`` does not have, as (dotted key, the valid keys at that level)."""
    found: list[tuple[str, list[str]]] = []
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            found.append((dotted, sorted(base)))
        elif isinstance(value, dict) and isinstance(base[key], dict):
            found.extend(unknown_keys(base[key], value, f"{dotted}."))
    return found


def load_quantify_config(path: str | Path | None = None) -> dict[str, Any]:
    """The shipped ``configs/quantify.yaml``, with the user's file (if any) merged over it.

    Raises:
        InputError: the user's file has a key the shipped file does not (a typo would otherwise be
            ignored silently); the message lists the valid keys at that level.
    """
    config = load_yaml(CONFIG_DIR / "quantify.yaml")
    if path is not None:
        override = load_yaml(path)
        unknown = unknown_keys(config, override)
        if unknown:
            key, valid = unknown[0]
            more = f" (and {len(unknown) - 1} more: {', '.join(k for k, _ in unknown[1:])})" if len(unknown) > 1 else ""
            parent = key.rpartition(".")[0]
            raise InputError(f"unknown config key {key!r}{more}; valid keys{' of ' + repr(parent) if parent else ''}: "
                             f"{', '.join(valid)}", path)
        config = merge(config, override)
    return config


def config_hash(config: dict[str, Any]) -> str:
    """A short, order-independent SHA-256 of a config mapping (for provenance and resumability)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def code_sha256(files: tuple[str, ...] | None = None) -> str:
    """A short SHA-256 of the ctquant package's code (Python files and report templates), or of the
    package ``files`` named (paths relative to the package, e.g. the lung step's modules).

    Results record it, and ``ctquant batch`` recomputes results made by other code even when the
    version number is the same (a development checkout, a patched install).
    """
    digest = hashlib.sha256()
    if files is None:
        files = sorted(p for p in PACKAGE_DIR.rglob("*") if p.is_file() and p.suffix in (".py", ".html", ".css", ".j2"))
    else:
        files = sorted(PACKAGE_DIR / name for name in files)
    for path in files:
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is usable, else ``cpu``."""
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"unknown device {device!r} (auto, cpu or cuda)")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but no CUDA GPU is available")
    return device
