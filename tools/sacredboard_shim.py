"""Start sacredboard 0.4.2 with two changes; run by the Python of sacredboard's own
environment as ``MONGO_URI=URL python sacredboard_shim.py HOST PORT DATABASE`` (the URL in the
environment, where other users of the machine cannot read a password), so it imports
nothing from medseg.

1. Its runs page filters RUNNING and "probably dead" runs with a JavaScript ``$where``
   (``new Date() - this.heartbeat > 120000``), which the embedded server (secantusdb) has no
   engine for: every page load answered HTTP 500 and the list stayed empty. The same
   condition is a plain comparison of ``heartbeat`` with a moment two minutes ago, which
   every MongoDB-compatible server answers; its negation is ``$nor`` (sacredboard's top-level
   ``$not`` is not valid MongoDB either).
2. It listens on 0.0.0.0 with no way to change it and has no login; here it listens on HOST.
3. Its runs table writes a run's result as it is: our runs return a dict (best epoch, test
   scores), which the table showed as ``[object Object]``. The list (not a run's detail view,
   which shows the whole document) gets the dict's numbers as ``name=value`` text instead.
"""

import os
import sys
from datetime import datetime, timedelta

from gevent.pywsgi import WSGIServer
from sacredboard.app.data.pymongo.mongocursor import MongoDbCursor
from sacredboard.app.data.pymongo.rundao import MongoRunDAO
from sacredboard.app.webapi import wsgi_server
from sacredboard.bootstrap import run

#: sacredboard's own threshold: a RUNNING run without a heartbeat for this long is dead.
DEAD_AFTER = timedelta(milliseconds=120000)


def status_filter_to_query(clause):
    cutoff = datetime.utcnow() - DEAD_AFTER
    if clause["value"] == "RUNNING":
        query = {"status": "RUNNING", "heartbeat": {"$gt": cutoff}}
    else:  # DEAD; a run that never sent a heartbeat counts as dead, as with $where
        query = {"status": "RUNNING", "$or": [{"heartbeat": {"$lte": cutoff}},
                                              {"heartbeat": None}]}
    return {"$nor": [query]} if clause["operator"] == "!=" else query


def result_text(result):
    """A dict result as ``name=value, ...`` of its numbers (4 significant digits); other
    results unchanged."""
    if not isinstance(result, dict):
        return result
    return ", ".join(f"{name}={value:.4g}" for name, value in result.items()
                     if isinstance(value, (int, float)) and not isinstance(value, bool))


def listed_runs(cursor):
    for run in cursor.mongodb_cursor:
        if "result" in run:
            run["result"] = result_text(run["result"])
        yield run


def main(host, port, database):
    MongoRunDAO._status_filter_to_query = staticmethod(status_filter_to_query)
    MongoDbCursor.__iter__ = listed_runs
    wsgi_server.WSGIServer = lambda address, app: WSGIServer((host, address[1]), app)
    run.main(args=["-mu", os.environ["MONGO_URI"], database, "--port", port, "--no-browser"],
             prog_name="sacredboard")


if __name__ == "__main__":
    main(*sys.argv[1:])
