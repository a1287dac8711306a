"""Dotted configuration keys, shared by the spec, ``--set`` and Flower run configs.

``training.lr = 0.1`` in a flat config is ``[training] lr = 0.1`` in TOML. A string value is read as a
TOML value when it is one (``[0.01, 0.1]``, ``{geometric = [50, 800]}``, ``true``), else as JSON, else
kept as text.
"""

import copy
import json
import math
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib
from collections.abc import Mapping
from typing import Any

from fedmerge.errors import FedmergeError


def parse_value(value: Any) -> Any:
    """A flat-config value as data: TOML if it parses as one, else JSON, else the text itself. ``nan`` and ``inf``
    stay text (a corruption named "nan"): no spec value is a non-finite number."""
    if not isinstance(value, str):
        return value
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
        return value if isinstance(parsed, float) and not math.isfinite(parsed) else parsed
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(value)
    except ValueError:
        return value


def unflatten(flat: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict:
    """Nested tables from dotted keys, laid over a copy of ``base``."""
    nested = copy.deepcopy(dict(base or {}))
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FedmergeError(f"'{key}': '{part}' is not a table of options.")
        node[parts[-1]] = parse_value(value)
    return nested
