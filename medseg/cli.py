"""``medseg`` command line: the embedded database, recorded runs, and tools around them.

    medseg db start [--port P]        start the MongoDB-compatible server on 127.0.0.1
    medseg db stop                    stop it
    medseg db status                  say whether it runs, where, and how many runs it holds
    medseg db import PATH             load file-observer runs (PATH: a run or a folder of runs)
    medseg db omniboard [--port P]    browse the runs with omniboard (installed with npm once)
    medseg db sacredboard [--port P]  browse them with sacredboard (in its own environment)
    medseg runs compare REF REF ...   config differences and metrics side by side
    medseg runs rerun REF             run a recorded run again with exactly its config

REF is a run id in the database or a file-observer run folder. The database is
--url, else $MEDSEG_MONGO_URL, else the server of `medseg db start`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from medseg import db
from medseg.errors import MedsegError
from medseg.tracking import connection


def _db_start(args: argparse.Namespace) -> int:
    state = db.start(port=args.port)
    print(f"database server running: {state.url} (pid {state.pid}, data in {state.storage})")
    print("experiments record their runs there; browse them with `medseg db omniboard`")
    return 0


def _db_stop(args: argparse.Namespace) -> int:
    print("database server stopped" if db.stop() else "no database server was running")
    return 0


def _db_status(args: argparse.Namespace) -> int:
    state = db.read_state()
    url = state.url if state else db.local_url()
    if not db.ping(url, timeout_s=1.0):
        print(f"no database server answers at {url}; start one with `medseg db start`")
        return 1
    client = connection.client(url, timeout_s=2.0)
    try:
        counts = {name: client[name]["runs"].count_documents({})
                  for name in client.list_database_names()
                  if "runs" in client[name].list_collection_names()}
    finally:
        client.close()
    owner = f" (pid {state.pid}, data in {state.storage})" if state else ""
    print(f"database server answers at {url}{owner}")
    for name, count in sorted(counts.items()):
        print(f"  database {name!r}: {count} runs")
    print(_where_runs_go())
    return 0


def _where_runs_go() -> str:
    url, source = connection.resolve_url()
    db_name, why = connection.resolve_db_name(url, None)
    named = ", named in the URL" if why == "named in the URL" else ""
    return (f"experiments record into database {db_name!r} at {db.redact(url)} (from {source}"
            f"{named}; tracking.db_name=NAME overrides it)")


def _database(args: argparse.Namespace):
    """The database the command works on, checked so that problems read as one line.
    ``args.db_name`` becomes its name (``--db-name``, else the URL's, else medseg)."""
    url, source = connection.resolve_url(args.url)
    if args.url:
        source = "--url"
    args.db_name, _ = connection.resolve_db_name(url, args.db_name)
    try:
        connection.check_database(url, args.db_name, source)
    except connection.DatabaseUnreachable as error:
        raise MedsegError(f"{error}; start it with `medseg db start` or give --url") from None
    return connection.client(url)[args.db_name]


def _db_import(args: argparse.Namespace) -> int:
    from medseg.tracking.importer import import_path
    from medseg.tracking.rundir import find_runs

    find_runs(args.path)  # a wrong path is reported before the database is asked anything
    results = import_path(args.path, _database(args))
    for result in results:
        print(result.line())
    imported = sum(r.action != "skipped" for r in results)
    print(f"{imported} of {len(results)} runs loaded into database {args.db_name!r}")
    return 0


def _viewer_address(name: str, args: argparse.Namespace) -> str:
    """The line saying where a viewer is, and who else can open it."""
    where = f"http://{args.host}:{args.port}"
    if args.host in ("127.0.0.1", "localhost", "::1"):
        return f"{where} (this machine only; --host 0.0.0.0 opens it to the network)"
    return (f"{where} (open to every machine that reaches this one on port {args.port}: "
            f"{name} has no login)")


def _db_omniboard(args: argparse.Namespace) -> int:
    from medseg.tracking import omniboard

    database = _database(args)
    url = connection.resolve_url(args.url)[0]
    plot_metrics = omniboard.headline_metrics(database)
    database.client.close()
    executable = omniboard.install()
    board = omniboard.Omniboard(executable, url, args.db_name, host=args.host, port=args.port,
                                plot_metrics=plot_metrics)
    print(f"omniboard {omniboard.VERSION}: {_viewer_address('omniboard', args)} shows database "
          f"{args.db_name!r} at {db.redact(url)}; plots open on {', '.join(plot_metrics)} "
          "(Ctrl-C stops it)", flush=True)
    try:
        board.serve()
    except KeyboardInterrupt:  # the user stopped it, as the line above says to
        board.close()
    return 0


def _db_sacredboard(args: argparse.Namespace) -> int:
    from medseg.tracking import sacredboard

    _database(args).client.close()
    url = connection.resolve_url(args.url)[0]
    python = sacredboard.install()
    print(f"sacredboard {sacredboard.VERSION}: {_viewer_address('sacredboard', args)} shows "
          f"database {args.db_name!r} at {db.redact(url)} (Ctrl-C stops it)", flush=True)
    process = sacredboard.start(python, url, args.db_name, host=args.host, port=args.port)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait()
        return 0


def _runs_compare(args: argparse.Namespace) -> int:
    from medseg.tracking.compare import compare_table, load_summaries

    summaries = load_summaries(args.runs, lambda: _database(args))
    print(compare_table(summaries, all_config=args.all_config))
    return 0


def _runs_rerun(args: argparse.Namespace) -> int:
    from medseg.tracking.compare import load_summaries
    from medseg.tracking.omniboard import cache_dir
    from medseg.tracking.rerun import config_file_for, plan_rerun

    summary = load_summaries([args.run], lambda: _database(args))[0]
    from_database = not Path(args.run).exists()
    config_file = config_file_for(summary, cache_dir() / "reruns",
                                  args.db_name if from_database else None)
    plan = plan_rerun(summary, config_file)
    what = "the command that re-runs" if args.dry_run else "re-running"
    print(f"{what} {summary.label} ({summary.experiment} {summary.command}) with its stored "
          f"config:\n{plan.describe()}", flush=True)
    if args.dry_run:
        return 0
    return subprocess.run(plan.argv, cwd=plan.cwd).returncode


def _add_database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None,
                        help=f"MongoDB URL (default ${connection.URL_VARIABLE}, then medseg db)")
    parser.add_argument("--db-name", default=None,
                        help="database (default: the one the URL names, else medseg)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    database = commands.add_parser("db", help="the embedded MongoDB-compatible server")
    actions = database.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="start the server in the background")
    start.add_argument("--port", type=int, default=None,
                       help=f"port on 127.0.0.1 (default $MEDSEG_DB_PORT or {db.DEFAULT_PORT})")
    start.set_defaults(handler=_db_start)
    actions.add_parser("stop", help="stop the server").set_defaults(handler=_db_stop)
    actions.add_parser("status", help="is it running, and what does it hold").set_defaults(
        handler=_db_status)
    load = actions.add_parser("import", help="load file-observer runs into the database")
    load.add_argument("path", help="a run folder (with run.json) or a folder of them, "
                                   "e.g. sacred_runs")
    _add_database_options(load)
    load.set_defaults(handler=_db_import)
    for name, port, handler, how in [("omniboard", 9000, _db_omniboard, "installed with npm"),
                                     ("sacredboard", 5000, _db_sacredboard,
                                      "in an environment of its own")]:
        viewer = actions.add_parser(name, help=f"browse the runs with {name} ({how} once)")
        viewer.add_argument("--port", type=int, default=port, help=f"HTTP port (default {port})")
        viewer.add_argument("--host", default="127.0.0.1",
                            help="address to listen on (default 127.0.0.1: this machine only; "
                                 f"0.0.0.0 opens {name}, which has no login, to the network)")
        _add_database_options(viewer)
        viewer.set_defaults(handler=handler)

    runs = commands.add_parser("runs", help="recorded runs")
    run_actions = runs.add_subparsers(dest="action", required=True)
    compare = run_actions.add_parser("compare", help="config differences and metrics of runs")
    compare.add_argument("runs", nargs="+", metavar="REF", help="run id or run folder")
    compare.add_argument("--all-config", action="store_true",
                         help="list every config entry, not only those that differ")
    _add_database_options(compare)
    compare.set_defaults(handler=_runs_compare)
    rerun = run_actions.add_parser("rerun", help="run a recorded run again with its config")
    rerun.add_argument("run", metavar="REF", help="run id or run folder")
    rerun.add_argument("--dry-run", action="store_true", help="print the command only")
    _add_database_options(rerun)
    rerun.set_defaults(handler=_runs_rerun)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except MedsegError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
