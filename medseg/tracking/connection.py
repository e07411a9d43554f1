"""Which MongoDB a run or a command talks to, and what is wrong when it cannot.

Two kinds of trouble are told apart, because they call for different reactions: nothing
answers (:class:`DatabaseUnreachable`: a run goes on recording to files) and the URL or the
account is wrong (:class:`~medseg.errors.ConfigError`: stop before anything starts).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from medseg import db
from medseg.errors import ConfigError, MedsegError

URL_VARIABLE = "MEDSEG_MONGO_URL"
DEFAULT_DB_NAME = "medseg"
_SCHEMES = ("mongodb://", "mongodb+srv://")
_AUTHENTICATION_FAILED = 18
_UNAUTHORIZED = 13


class DatabaseUnreachable(MedsegError):
    """No MongoDB server answered (a wrong host or port, a stopped server, a network problem)."""


def resolve_url(configured: str | None = None) -> tuple[str, str]:
    """``(url, where it came from)``: the given URL, else ``$MEDSEG_MONGO_URL``, else the
    server of ``medseg db start``."""
    if configured:
        return configured, "tracking.url"
    if os.environ.get(URL_VARIABLE):
        return os.environ[URL_VARIABLE], URL_VARIABLE
    state = db.read_state()
    return (state.url if state else db.local_url()), "medseg db"


def database_in_url(url: str) -> str | None:
    """The database a URL names in its path (``mongodb://host:port/DB?options``), if any."""
    rest = url.split("://", 1)[-1]
    authority_end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=-1)
    if authority_end < 0 or rest[authority_end] != "/":
        return None
    name = rest[authority_end + 1:].split("?", 1)[0]
    return name or None


def resolve_db_name(url: str, configured: str | None) -> tuple[str, str]:
    """``(database, why)``: the one given (``tracking.db_name``, ``--db-name``) wins, else
    the one the URL names, else ``medseg``."""
    if configured:
        return configured, "given"
    if database_in_url(url):
        return database_in_url(url), "named in the URL"
    return DEFAULT_DB_NAME, "default"


def check_url(url: str, source: str) -> None:
    """Raise ConfigError unless ``url`` is a well-formed MongoDB URL."""
    if not url.startswith(_SCHEMES):
        raise ConfigError(f"{source} must start with mongodb:// or mongodb+srv://, "
                          f"got {db.redact(url)!r}")
    if url.startswith("mongodb+srv://"):
        return  # checking an SRV URL means a DNS lookup; leave that to the connection
    from pymongo import uri_parser

    try:
        uri_parser.parse_uri(url)
    except Exception as error:  # pymongo raises ValueError, InvalidURI or ConfigurationError
        raise ConfigError(f"{source}={db.redact(url)!r} is not a valid MongoDB URL: "
                          f"{_first_sentence(error)}") from None


def has_password(url: str) -> bool:
    return db.redact(url) != url


def server_address(url: str) -> str:
    """``host:port[,host:port]`` of a URL, without credentials: what identifies a server."""
    if url.startswith("mongodb+srv://"):
        return db.redact(url).split("://", 1)[1].split("@")[-1].split("/")[0]
    from pymongo import uri_parser

    nodes = uri_parser.parse_uri(url)["nodelist"]
    return ",".join(sorted(f"{host}:{port}" for host, port in nodes))


def client(url: str, timeout_s: float = 5.0, **options: Any):
    """A MongoClient that gives up on an unanswering server after ``timeout_s``."""
    import pymongo

    milliseconds = int(timeout_s * 1000)
    return pymongo.MongoClient(url, serverSelectionTimeoutMS=milliseconds,
                               connectTimeoutMS=milliseconds,
                               socketTimeoutMS=max(milliseconds, 20000), **options)


def check_database(url: str, db_name: str, source: str, timeout_s: float = 5.0) -> None:
    """Make sure runs can be written to ``db_name`` at ``url``.

    Raises :class:`DatabaseUnreachable` when nothing answers and ConfigError when the
    account is wrong or may not write.
    """
    from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

    check_url(url, source)
    if not _anything_listens(url, timeout_s):
        raise DatabaseUnreachable(f"no MongoDB answers at {db.redact(url)} (from {source})")
    where = f"MongoDB at {db.redact(url)} (from {source})"
    mongo = client(url, timeout_s)
    try:
        mongo.admin.command("ping")
        # Matches no document, so it writes nothing; the server still checks the right to write.
        mongo[db_name]["runs"].update_one({"_id": "medseg-write-check"}, {"$set": {"checked": 1}})
    except (OperationFailure, ConnectionFailure) as error:
        if _is_authentication_failure(error):
            raise ConfigError(f"{where} rejected the user and password: authentication failed; "
                              f"correct them in {source}") from None
        if isinstance(error, OperationFailure) and error.code == _UNAUTHORIZED:
            if "requires authentication" in str(error):
                raise ConfigError(f"{where} requires a user and password; give them in "
                                  f"{URL_VARIABLE} as mongodb://USER:PASSWORD@HOST:PORT/"
                                  "?authSource=admin") from None
            raise ConfigError(f"{where}: the user may not write to database {db_name!r} "
                              "(read-only); grant it the readWrite role or choose another "
                              "tracking.db_name") from None
        if isinstance(error, ConnectionFailure):
            raise DatabaseUnreachable(f"no MongoDB answers at {db.redact(url)} "
                                      f"(from {source})") from None
        raise ConfigError(f"{where} refused the check that runs can be written: "
                          f"{_first_sentence(error)}") from None
    except PyMongoError as error:
        raise ConfigError(f"{where}: {_first_sentence(error)}") from None
    finally:
        mongo.close()


def _anything_listens(url: str, timeout_s: float) -> bool:
    """Whether any host of the URL accepts a TCP connection. A refused connection is known at
    once, where the driver would keep trying for the whole timeout."""
    if url.startswith("mongodb+srv://"):
        return True
    from pymongo import uri_parser

    for host, port in uri_parser.parse_uri(url)["nodelist"]:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            return True
        except OSError:
            continue
    return False


def _is_authentication_failure(error: Exception) -> bool:
    if getattr(error, "code", None) == _AUTHENTICATION_FAILED:
        return True
    # Server selection wraps the handshake's failure in a timeout error.
    return "authentication failed" in str(error).lower()


def _first_sentence(error: Exception) -> str:
    return str(error).split(", full error")[0].split("\n")[0]
