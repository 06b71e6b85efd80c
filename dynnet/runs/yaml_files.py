"""YAML read within bounds: a config is a few kilobytes of settings, never a bomb.

PyYAML builds an alias once and shares it, so a "billion laughs" file loads in a moment; whatever walks it
afterwards (parsing, validating, dumping a run's config) meets every copy. These readers count the values a
document holds with its aliases expanded and refuse one that holds more than any config could.
"""

import os
from pathlib import Path
from typing import Any

import yaml

from dynnet.errors import one_line

MAX_BYTES = 1 << 20  # a config of settings is a few kilobytes; a megabyte is generous
MAX_VALUES = 100_000  # values once aliases are expanded: the shipped configs hold about a hundred


def load_yaml(path: str | os.PathLike, what: str = "config file") -> Any:
    """The YAML document in a file, refused in one line if it is too large, invalid, or expands too far."""
    path = Path(path)
    name = f"{what} {path}"
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ValueError(f"{name} is {size} bytes, more than a config's {MAX_BYTES}")
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"{name}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{name} is not a text file") from None
    return parse_yaml(text, name)


def parse_yaml(text: str, name: str) -> Any:
    """A YAML document from text (a file's, or a flag's value), checked like load_yaml."""
    if len(text) > MAX_BYTES:
        raise ValueError(f"{name} holds {len(text)} characters, more than a config's {MAX_BYTES}")
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{name} is not valid YAML: {one_line(err)}") from None
    except RecursionError:
        raise ValueError(f"{name} nests its values too deeply") from None
    if expanded_size(document, {}) > MAX_VALUES:
        raise ValueError(
            f"{name} was refused: with its aliases expanded it holds more than {MAX_VALUES} values "
            "(a YAML bomb, or not a config)"
        )
    return document


def expanded_size(value: Any, sizes: dict[int, int]) -> int:
    """How many values ``value`` holds with shared (aliased) parts counted each time they appear; ``sizes``
    remembers each shared part's count, so the walk visits every part once. A part that contains itself counts
    as unbounded."""
    if not isinstance(value, (dict, list)):
        return 1
    key = id(value)
    if key in sizes:
        return sizes[key]
    sizes[key] = MAX_VALUES + 1  # while it is being counted: a part met again inside itself is a cycle
    children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    total = 1
    for child in children:
        total += expanded_size(child, sizes)
        if total > MAX_VALUES:
            break
    sizes[key] = total
    return total
