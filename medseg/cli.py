"""``medseg`` command line: the embedded database and other tools around the experiments.

    medseg db start [--port P]   start the MongoDB-compatible server on 127.0.0.1
    medseg db stop               stop it
    medseg db status             say whether it runs, where, and how many runs it holds
"""

from __future__ import annotations

import argparse
import sys

from medseg import db
from medseg.errors import MedsegError


def _db_start(args: argparse.Namespace) -> int:
    state = db.start(port=args.port)
    print(f"database server running: {state.url} (pid {state.pid}, data in {state.storage})")
    print(f"experiments record their runs there; browse them with "
          f"`npx omniboard -m 127.0.0.1:{state.port}:medseg`")
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
    import pymongo

    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=2000)
    try:
        counts = {name: client[name]["runs"].count_documents({})
                  for name in client.list_database_names() if "runs" in client[name].list_collection_names()}
    finally:
        client.close()
    owner = f" (pid {state.pid}, data in {state.storage})" if state else ""
    print(f"database server answers at {url}{owner}")
    for name, count in sorted(counts.items()):
        print(f"  database {name!r}: {count} runs")
    return 0


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
