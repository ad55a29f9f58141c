"""`hindsight_cli <cfg> [log_level]` and the daemon `hindsight <cfg> [log_level]`, as upstream, and
`hindsight-py` (the same as hindsight_cli, plus subcommands)."""

from __future__ import annotations

import os
import sys
import time

USAGE = "usage: hindsight_cli <cfg> [loglevel]\n"


def _log_level(text: str) -> int:
    # upstream: anything outside 0-7 means the default, 6
    try:
        level = int(text)
    except ValueError:
        return 6
    return level if 0 <= level <= 7 else 6


def main(argv: list[str] | None = None, *, daemon: bool = False) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        sys.stderr.write(USAGE.replace("hindsight_cli", "hindsight") if daemon else USAGE)
        return 1
    # lua_sandbox runs in UTC: os.date, os.time{} and the matcher's RFC3339 times all depend on it
    os.environ["TZ"] = "UTC"
    time.tzset()
    if daemon:
        from hindsight_py.daemon import run
    else:
        from hindsight_py.daemon import run_once as run

    status = run(args[0], _log_level(args[1]) if len(args) == 2 else 6)
    if argv is None:  # the command itself (sys.argv): the process ends here
        _end_process(status)
    return status


def _end_process(status: int) -> None:
    """Exit with `status` without the interpreter's teardown. By now every plugin process has ended,
    hindsight.cp is written and fsync()ed and the metrics thread is closed; what the teardown would
    still do is free every module, Lua state and object one by one, 10-40 ms of CPU at the end of
    each run for nothing the operating system does not do at exit anyway."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def main_daemon(argv: list[str] | None = None) -> int:
    """`hindsight <cfg> [loglevel]`: runs until SIGINT/SIGTERM, with dynamic loading (daemon.py)."""
    return main(argv, daemon=True)


def main_py(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "create-index":
        from hindsight_py.outputs.index_setup import main as create_index

        return create_index(args[1:])
    if args and args[0] == "check":
        from hindsight_py.check import main as check

        return check(args[1:])
    if args and args[0] == "convert":
        from hindsight_py.convert import main as convert

        return convert(args[1:])
    if args and args[0] == "top":
        from hindsight_py.top import main as top

        return top(args[1:])
    if args and args[0] in ("-h", "--help"):
        sys.stdout.write(
            "usage: hindsight-py <cfg> [loglevel]        run a Hindsight configuration (as hindsight_cli)\n"
            "       hindsight-py create-index --help     create an Elasticsearch/OpenSearch index\n"
            "       hindsight <cfg> [loglevel]           the daemon: runs until signalled, loads plugins from\n"
            "                                            sandbox_load_path (docs/operations.md)\n"
            "       hindsight-py check <cfg>             load every cfg, compile every plugin, run nothing\n"
            "       hindsight-py top <cfg>               a live view of the running daemon's plugins and queues\n"
            "       hindsight-py convert <src> [dest]    a .cfg to YAML, or a .yaml to a Lua cfg\n"
            "\n"
            "A first SIGINT/SIGTERM drains the queues, a second one stops at once (docs/delivery.md).\n"
            "HINDSIGHT_PY_SHUTDOWN_TIMEOUT=<seconds>  how long the drain may take (default 60)\n"
        )
        return 0
    return main(argv)


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
