"""Config files that build on a base: ``base: base/cnn.yaml`` at the top of a config.

A family's base (``configs/base/<family>.yaml``: trainer, model, data, the family's tuned AdamW
and its warm-up) holds everything once; each ``configs/<family>_<optimizer>.yaml`` names it and
states only its optimizer. The base path is relative to the file that names it; bases may have
bases. Merging is a deep merge of the file over its base, except that a ``class_path`` other
than the base's replaces the base's whole entry: an HMAdamW overlay does not inherit AdamW's
``init_args``.

jsonargparse cannot compose files itself (a ``--config`` inside a file is not read), so
:func:`expand_config_bases` resolves the bases before LightningCLI parses, passing the merged
config on as a YAML string (``--config`` takes a path or a YAML string).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["expand_config_bases", "load_with_bases"]

_CONFIG_FLAGS = ("--config", "-c")


def load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The config at ``path`` merged over its ``base`` (recursively); raises ``ValueError`` on a
    missing base or a cycle."""
    path = path.resolve()
    if path in seen:
        raise ValueError(f"config {path}: its bases form a cycle ({' -> '.join(str(p) for p in (*seen, path))})")
    config = yaml.safe_load(path.read_text()) or {}
    base = config.pop("base", None) if isinstance(config, dict) else None
    if base is None:
        return config
    base_path = path.parent / str(base)
    if not base_path.is_file():
        raise ValueError(f"config {path}: base: {base} does not exist (looked for {base_path})")
    return _merge(load_with_bases(base_path, (*seen, path)), config)


def _merge(base: Any, over: Any) -> Any:
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    if "class_path" in over and base.get("class_path", over["class_path"]) != over["class_path"]:
        return over  # another class: its own init_args only
    return {**base, **{key: _merge(base[key], value) if key in base else value for key, value in over.items()}}


def _names_a_base(value: str) -> bool:
    """Whether ``value`` is a config file with a ``base``; a YAML string (already expanded, as
    the DDP launcher passes it to the other ranks) is not a file."""
    try:
        path = Path(value)
        if "\n" in value or not path.is_file():
            return False
    except (OSError, ValueError):  # a name too long for a path, a NUL byte
        return False
    config = yaml.safe_load(path.read_text())
    return isinstance(config, dict) and "base" in config


def expand_config_bases(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config FILE`` whose file names a ``base`` replaced by the merged
    config as a YAML string; other arguments unchanged."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        flag, eq, value = token.partition("=")
        if flag in _CONFIG_FLAGS and eq and _names_a_base(value):
            out.append(f"{flag}={yaml.safe_dump(load_with_bases(Path(value)), sort_keys=False)}")
        elif token in _CONFIG_FLAGS and i + 1 < len(argv) and _names_a_base(argv[i + 1]):
            out += [token, yaml.safe_dump(load_with_bases(Path(argv[i + 1])), sort_keys=False)]
            i += 1
        else:
            out.append(token)
        i += 1
    return out
