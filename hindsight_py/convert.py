"""`hindsight-py convert SOURCE [DEST]`: a Lua cfg to YAML, or YAML to a Lua cfg.

The direction follows SOURCE's name (`.yaml`/`.yml` to Lua, anything else to YAML). A Lua cfg is
evaluated first, so its expressions become their values; comments are not carried over. The
result is written to DEST (refused if it exists) or to stdout.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hindsight_py.config_lua import BareLua, ChunkError, ConfigError, globals_as_python
from hindsight_py.config_yaml import YamlConfigError, assignment_order, is_yaml, values_to_yaml, yaml_to_lua


def convert(source: Path) -> str:
    """SOURCE's configuration in the other form; raises ConfigError or YamlConfigError."""
    text = source.read_text(encoding="utf-8", errors="surrogateescape")
    if is_yaml(source.name):
        return yaml_to_lua(text, str(source))
    try:
        values = globals_as_python(BareLua().run(text, str(source)), str(source), [])
    except ChunkError as e:
        raise ConfigError(str(source), str(e)) from None
    return values_to_yaml(values, assignment_order(text))


def main(args: list[str]) -> int:
    if not 1 <= len(args) <= 2 or args[0] in ("-h", "--help"):
        sys.stderr.write("usage: hindsight-py convert <file.cfg|file.yaml> [destination]\n")
        return 0 if args and args[0] in ("-h", "--help") else 1
    source = Path(args[0])
    try:
        out = convert(source)
    except (ConfigError, YamlConfigError) as e:
        sys.stderr.write(f"{e}\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"cannot read {source}: {e.strerror}\n")
        return 1
    if len(args) == 1:
        sys.stdout.write(out)
        return 0
    dest = Path(args[1])
    try:
        with dest.open("x", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(out)
    except FileExistsError:
        sys.stderr.write(f"{dest} exists: not overwritten\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"cannot write {dest}: {e.strerror}\n")
        return 1
    return 0


__all__ = ["convert", "main"]
