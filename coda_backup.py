#!/usr/bin/env python3
"""coda-backup: back up a whole Coda workspace to disk, one complete snapshot per run.

What it saves. Every doc you own (--include-shared: also docs shared with you;
--workspace-id: one workspace) with its metadata (doc.json, pages.json,
tables.json; formulas.json, controls.json and permissions.json unless
--no-extras), every page as Markdown or HTML through Coda's asynchronous
page-export API, and every table and view as CSV with .columns.json and
.table.json beside it (--rows-json adds NDJSON). Images and attachments that
pages and image/attachment cells link to are saved once per doc in assets/
(fetched without the token), and the page files link to them (--no-assets:
the original URLs only).

Where. Each run writes DIR/<UTC start, e.g. 2026-03-07T101530Z>/ with
summary.json (status, counts, failures, request figures) and manifest.json
(every object and file with size and sha256). DIR/latest (a symlink, and
latest.txt) names the newest snapshot that finished; a failed or cancelled run
never moves it. DIR/last-run.json says how the last run ended, whatever
happened. Names are made safe on Windows, macOS and Linux and always end in
the object's id. index.html at each snapshot root browses it offline
(--no-index skips it).

Run a backup (standard library only, Python 3.9+)::

    export CODA_API_TOKEN=...                 # or --token-file token.txt
    python3 coda_backup.py --output ./coda-backups

Run the tests::

    python3 -m unittest discover -s tests -v

Nightly use. --incremental hard-links what did not change from the newest
earlier snapshot that holds it intact (so a cancelled or failed run is resumed;
each snapshot stays complete on its own; saved files are read-only, 0400, as
snapshots share them), re-reading what --max-age says is too old and tables
with formulas whose doc moved; --keep-last/-daily/-weekly/
-monthly/-within prune old ones like restic (--prune: without a backup); every
summary says what changed, --diff shows it down to rows, --find finds the last
copy of an object; --verify re-hashes a snapshot; --list-runs, --retry-failed,
--dry-run, --zip and --config manage runs. One run at a time holds DIR/.lock. Every file is
written to a temporary name and renamed; Ctrl+C or SIGTERM ends the run as
`cancelled`. Requests are paced to Coda's published limits per category, with
up to --concurrency requests in flight. --ping-url tells a monitoring service
(healthchecks.io style) when a run starts and how it ended.

Exit codes: 0 everything saved; 1 the run finished but some objects failed
(see summary.json); 2 usage or configuration error; 3 fatal (the token was
refused, the API unreachable, the disk unwritable); 4 another run holds the
output folder's lock; 130 / 143 interrupted by SIGINT / SIGTERM.

The token is read from CODA_API_TOKEN or the first line of --token-file. It is
sent only to the API base URL, never to the download host, and never written
to a log line or a file. README.md is the full manual.

Contents (the `# --- ... ---` banners below, in the order data flows):

    Constants                     API base, limits, layout names, exit codes and the one
                                  outcome -> exit code table, every default
    Errors                        BackupError and its kinds: ConfigError (exit 2), FatalError,
                                  ApiError (status and body; 0: no answer), MalformedAnswer,
                                  RefusedRequest, DeadlineReached, listing, export and asset errors
    Options and records           the frozen Options (everything a run was asked to do, below the
                                  CLI), RetentionPolicy, Credentials; typed records of what
                                  becomes JSON, each serialised in one place: Failure (summary.json
                                  `failures`), Skipped and Vanished (its `skipped` and `vanished`),
                                  Summary (summary.json), LastRun (DIR/last-run.json), Manifest
                                  (manifest.json's top level) and its DocEntry, PageEntry and
                                  TableEntry (also the lines of manifest.partial.jsonl), with their
                                  FileRecord and AssetRecord
    HTTP client                   HttpClient (retries, backoff, Retry-After, keep-alive, the
                                  token only to the API base), RateLimiter (its Slots, the probe,
                                  replans), RequestStats, ConnectionBreaker (an API lost for
                                  good); read_answer and gunzip bound an answer's time and size
    Coda API                      CodaApi: paginating listers and fetchers, bounded listings;
                                  no file I/O
    Names and paths               safe_component and the layout of docs, pages and tables
                                  (pure); PathAllocator; inside() keeps every path in --output
    Writers                       atomic files hashed while written, JSON, CSV and NDJSON
                                  encoding, hard links, Coda's updatedAt as mtime
    Previous snapshots and reuse  SnapshotIndex (earlier manifests), Journal
                                  (manifest.partial.jsonl), ReusePolicy: the one pure reuse
                                  policy for the run and --dry-run
    Exporters                     RunRecorder (counts, failures, warnings), Job; the
                                  ExportScheduler (page exports started as soon as
                                  pages are listed, polled without holding a thread); pages,
                                  tables and views, doc extras, a doc linked whole
    Assets                        images and attachments: which URLs, AssetStore (its own
                                  download pool, no token), link rewriting, reuse of assets
    Snapshots and manifest        snapshot folders, latest, RunLock, --list-runs, abandoned
                                  runs, --zip, --verify
    Vanished objects              what Coda no longer lists, the deletion guard,
                                  DIR/vanished.json and the snapshots --keep-vanished protects
    History: changes, diff, retention, find
                                  the change report, --diff (rows in a scratch SQLite file),
                                  the pure retention planner and pruning, --find
    Snapshot index (index.html)   the offline index.html and browse/ pages of a snapshot
    Run: progress and monitoring  the progress line, the periodic running summary (Monitor),
                                  --ping-url (Pinger)
    Run: outcome and exit codes   the one outcome path: RunFacts -> decide_outcome -> Outcome,
                                  RunState, end_run (summary.json, manifest.json, latest, zip,
                                  pruning), last-run.json, the change report
    Run: lifecycle                one backup from start to end: signals, the token check,
                                  listing and selecting docs, run_backup, --dry-run
    CLI                           build_parser (its own table of flags for --config), reading
                                  the token, options_from_args,
                                  --verify/--list-runs/--prune/--diff/--find, --config, logging,
                                  main()
"""

import sys

# First, before anything newer runs (argparse.BooleanOptionalAction, below, is 3.9): one line, not a
# traceback. That is also why there is no `from __future__ import annotations` (Python 3.6 cannot
# compile it, so it would never get here): an annotation that names a class defined further down
# is a string.
if sys.version_info < (3, 9):  # noqa: UP036 (the point is to run on older Pythons)
    sys.stderr.write(f"coda-backup needs Python 3.9 or newer (this is Python {sys.version.split()[0]})\n")
    raise SystemExit(2)

import argparse
import concurrent.futures
import contextlib
import csv
import datetime as dt
import email.utils
import enum
import errno
import fnmatch
import functools
import hashlib
import heapq
import html
import http.client
import io
import itertools
import json
import logging
import operator
import os
import posixpath
import random
import re
import select
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import tempfile
import threading
import time
import unicodedata
import urllib.parse
import zipfile
import zlib
from collections import Counter, deque
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import (
    IO,
    Any,
    Callable,
    Collection,
    Deque,
    Dict,
    Iterator,
    List,
    NamedTuple,
    NoReturn,
    Optional,
    Set,
    Tuple,
    TypeVar,
    Union,
)

__version__ = "0.1.0"

# --- Constants ----------------------------------------------------------------

DEFAULT_API_URL = "https://coda.io/apis/v1"
USER_AGENT = f"coda-backup/{__version__} Python/{sys.version_info[0]}.{sys.version_info[1]}"

# Coda silently clamps `limit` to its own maximum, so asking for more is free.
LIST_LIMIT = 200
ROW_LIMIT = 500
SMALL_ROW_LIMIT = 50  # after a 504: Coda's advice for tables too large to page quickly
COLUMN_LIMIT = 100  # the documented maximum for the columns endpoint
# Listings end where the API's own counts say they should: a table's rowCount, a doc's docSize
# (pageCount, tableAndViewCount), with slack, as counts move while a run goes on. Where the API
# gives no count, a listing ends after a number of pages no real workspace reaches. Either way a
# server that hands out a fresh page token forever costs minutes, not days, and the listing cut
# short is a recorded failure.
LIST_SLACK_FACTOR = 2
LIST_SLACK_ITEMS = 100
MAX_DOC_LIST_PAGES = 500  # /docs: 100,000 docs at 200 a page; about 13 min at the list-docs rate
MAX_LIST_PAGES = 1_000  # pages, tables, formulas, controls, permissions: 200,000 items each
MAX_COLUMN_PAGES = 100  # 10,000 columns at the documented 100 a page
MAX_ROW_PAGES = 20_000  # rows of a table whose rowCount is unknown: millions of rows
MAX_STALE_PAGES = 3  # pages in a row that bring no item not seen before: the server goes round in circles

# Published per-user limits: (requests, window seconds) per category.
DEFAULT_RATE_LIMITS: Dict[str, Tuple[int, float]] = {
    "read": (100, 6.0),
    "write": (10, 6.0),
    "list_docs": (4, 6.0),
}
RATE_WINDOW_MARGIN = 1.02  # pace against a slightly longer window: transit times differ
RATE_RECOVERY_WINDOWS = 5.0  # after a 429, climb back to the full rate over this many windows
PROBE_LEAD = 0.5  # the probe (see pacing_after_answer) goes this part of a window before the window allows it
# Paced as a token bucket, this much refill (seconds) is kept back: a request may reach the server
# this much earlier than planned, next to one that came late, and still find a token.
BUCKET_RESERVE = 0.25
REPLAN_CHECK = 0.1  # a worker waiting for its rate-limit slot looks this often whether the slot still holds
MAX_RETRY_AFTER = 120.0
BACKOFF_CAP = 60.0
SIGNAL_POLL = 0.05  # how soon a signal turns into a cancel

# Every default a flag has, in one place: the parser, `Options`, the HTTP client and --help all read
# these names, so a default cannot differ between them.
# The most requests in flight at once, whichever thread sends them. Reaching the read limit (about
# 17 a second) takes 17 x the latency in flight: 8 was enough up to about 0.45 s a request, 16 is
# up to about 0.9 s (measured at 0.8 s: 1.60 x the floor with 8, 1.16 x with 16).
DEFAULT_CONCURRENCY = 16
DEFAULT_MAX_RETRIES = 5  # retries per request after the first attempt
DEFAULT_RETRY_DELAY = 1.0  # seconds; the first backoff, doubled on each retry, with jitter
DEFAULT_TIMEOUT = 60.0  # seconds a request may take, its whole answer included
# The most one answer (a page of JSON, decoded, or a page's export) may hold: far above any real one
# (Coda stops serving a doc over the API at about 125 MB), far below what an endless body would cost.
MAX_ANSWER_BYTES = 128 << 20
DEFAULT_POLL_INTERVAL = 1.0  # seconds between status polls of a rendering page export
DEFAULT_EXPORT_TIMEOUT = 120.0  # seconds one page export (start, polls, download) may take in all
DEFAULT_PAGE_FORMAT = "markdown"
DEFAULT_LOG_LEVEL = "INFO"
# Page exports run as single steps (start, poll, download) on threads of their own, and a rendering
# export holds none of them (see ExportScheduler); docs are listed a few at once, so that listing one
# doc never holds up the exports of the docs listed before it.
EXPORT_WORKERS = 4
DOC_LISTERS = 4
ITEM_WORKERS = 4  # formulas and controls are fetched one request each: in parallel, not as one long chain
RENDER_SAMPLES = 15  # recent render times that time an export's first status poll
FIRST_MISS_SHARE = 0.25  # a first poll that finds the export rendering polls again after this share of --poll-interval
IDLE_WAKE = 0.25  # an idle export worker looks at the cancel flag at least this often
POLL_READ_WAIT = 1.0  # while exports wait to start, a due status poll waits for its read at most this long

# --ping-url: a monitoring ping may cost a run a few seconds at most, and never fail it.
PING_TIMEOUT = 5.0
PING_ATTEMPTS = 2  # a refused or 5xx ping is tried once more; a ping that timed out is not
PING_RETRY_PAUSE = 1.0
PING_MAX_FAILURES = 20  # failures listed in a ping's body

MAX_EXPORT_STARTS = 4  # an export whose request expires (404) is started again this often
MAX_LINK_REFRESHES = 4  # an expired download link is fetched again this often

# Images and attachments. codahosted.io serves them without any credential (coda-api.md section 8).
DEFAULT_ASSET_HOSTS = ("https://codahosted.io/",)
DEFAULT_MAX_ASSET_MB = 200
ASSET_WORKERS = 4  # downloads are not rate limited by Coda; a small pool of its own keeps them off the API workers
ASSET_CHUNK = 1 << 16  # streamed to disk this much at a time: memory stays flat whatever the file size
ANSWER_CHUNK = 1 << 16  # an answer is read this much at a time at most, its deadline checked between
MAX_REDIRECTS = 5

# A bad night's odd reset is ridden through; an API that only ever fails to connect (refused, reset,
# DNS, TLS, timeouts; any HTTP answer, even a 503, shows it is there) is gone: the run stops, `failed`.
API_LOST_SECONDS = 60.0  # nothing but connection failures for this long ...
API_LOST_FAILURES = 50  # ... or this many in a row, across all workers (a few rounds of every worker's retries)

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_FATAL = 3
EXIT_LOCKED = 4
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

# How a run ended -> its exit code: the one table (see decide_outcome for the causes).
EXIT_CODES = {
    "completed": EXIT_OK,
    "completed_with_errors": EXIT_FAILURES,
    "nothing_selected": EXIT_FAILURES,  # --doc matched nothing: the run failed, but not the API
    "fatal": EXIT_FATAL,  # token refused, API unreachable, a bug
    "api_lost": EXIT_FATAL,
    "disk": EXIT_FATAL,
    "sigint": EXIT_SIGINT,
    "sigterm": EXIT_SIGTERM,
}
# Errors that fail every later write too: the run stops at the first one.
DISK_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS) if code)

MAX_COMPONENT_CHARS = 120
MAX_COMPONENT_BYTES = 240  # ext4 and friends allow 255 bytes; leave room for temp-file affixes
MAX_ID_CHARS = 60
LONGEST_SUFFIX = ".columns.json"
FORBIDDEN_CHARS = frozenset('<>:"/\\|?*')
RESERVED_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"COM{i}" for i in range(1, 10)]
    + [f"LPT{i}" for i in range(1, 10)]
)

CSV_NEEDS_QUOTES = re.compile('[",\r\n\x00]')
CSV_META_HEADER = ["_row_id", "_row_name", "_row_index", "_created_at", "_updated_at", "_browser_link"]

SNAPSHOT_TIME_FORMAT = "%Y-%m-%dT%H%M%SZ"
SNAPSHOT_NAME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{6}Z(-\d+)?$")
LOCK_NAME = ".lock"
WINDOWS_LOCK_OFFSET = 1 << 20  # the byte Windows locks, far past the holder's JSON
LATEST_LINK = "latest"
LATEST_TXT = "latest.txt"
SUMMARY_NAME = "summary.json"
LAST_RUN_NAME = "last-run.json"  # DIR/last-run.json: how the last run ended, whatever happened
INCOMPLETE_STATUSES = ("running", "cancelled", "abandoned", "failed")
MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = "manifest.partial.jsonl"  # what a run saved so far, until manifest.json replaces it
MANIFEST_VERSION = 1
REUSABLE_STATUSES = ("ok", "unchanged")
VANISHED_NAME = "vanished.json"
VANISHED_VERSION = 1
# The deletion guard, like rclone's --max-delete: a run that finds more than this share of the
# previous snapshot's docs gone, or of one doc's pages, tables and views (and at least
# VANISHED_MIN_OBJECTS of them: one page deleted from a small doc is a normal day), does not
# become latest.
DEFAULT_MAX_VANISHED = 25.0
VANISHED_MIN_OBJECTS = 5
DEFAULT_KEEP_VANISHED = 90  # days retention keeps the last snapshot holding a vanished object
FINISHED_STATUSES = ("completed", "completed_with_errors")  # every doc such a run listed was seen to the end
READ_ONLY_MODE = 0o400  # saved content; summary.json, manifest.json and DIR's own files stay 0600
DEFAULT_MAX_AGE_DAYS = 7.0
MAX_DAYS = 36500  # the most any day count may say (100 years): far more overflows a timedelta
# Objects first saved on the same night would all pass --max-age on the same later night, and
# that night would be a full download. Each copy is therefore refreshed at a point drawn
# from its id and download time between (1 - spread) and 1 times --max-age: never later than
# --max-age, and spread over nights from the first cycle on.
MAX_AGE_SPREAD = 0.5

LOG = logging.getLogger("coda_backup")
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


# --- Errors -------------------------------------------------------------------


class BackupError(Exception):
    """Base of every error this tool raises on purpose."""


class ConfigError(BackupError):
    """A user mistake: bad flag, missing token. One line on stderr, exit 2."""


class FatalError(BackupError):
    """The run cannot go on at all (bad token, API unreachable). Exit 3."""


class LockedError(BackupError):
    """Another run holds the output folder. Exit 4."""


class Cancelled(BackupError):
    """SIGINT/SIGTERM arrived: stop starting work and unwind."""


class ApiError(BackupError):
    """An API call failed for good; `status` is 0 only when no HTTP answer came (refused, reset,
    DNS, TLS, timed out: what ConnectionBreaker counts), else the status of the last answer."""

    def __init__(self, status: int, message: str, url: str = "") -> None:
        self.status = status
        self.message = message
        self.url = url
        where = f" ({url})" if url else ""
        super().__init__(f"HTTP {status}: {message}{where}" if status else f"{message}{where}")


class MalformedAnswer(ApiError):
    """The API answered with success but not in the documented shape: a body that is not a JSON
    object, an export answer without a request id, a row whose values are not an object.

    An answer came, so this is that object's failure and never a sign of a lost API; `status` is
    200 (the answer said success). Its text is the problem alone, without "HTTP 200".
    """

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(200, message, url)
        self.args = (f"{message} ({url})" if url else message,)


class RefusedRequest(BackupError):
    """A request our own rules will not send: credentials to a host other than the API, a URL
    scheme other than http and https. Nothing went out, so no answer was missed either."""


class DeadlineReached(BackupError):
    """The caller's deadline (a page export's --export-timeout) passed before a request could go
    out: nothing was asked, so nothing failed to answer."""


class ListingIncomplete(BackupError):
    """A list ended early (a page token repeated, items of the wrong shape).

    Raised only after every good item was yielded, so callers keep what was
    read and record the failure.
    """


class ExportError(BackupError):
    """A page export failed, expired too often or timed out."""


class ExpiredLink(BackupError):
    """The storage host refused a download link: ask the API for a fresh one."""


class AssetGone(BackupError):
    """The asset host answered 404 or 410: the file was deleted at Coda's end (a skip, not a failure)."""


class AssetTooLarge(BackupError):
    """An asset is larger than --max-asset-mb (a skip, never a half-written file)."""


class AssetDiskError(BackupError):
    """Writing an asset failed on our side; kept apart from network errors so it is not retried."""


# --- Options and records ------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """Everything a run was asked to do. The token is kept apart so no repr can leak it."""

    output: Path
    api_url: str = DEFAULT_API_URL
    include_shared: bool = False
    workspace_id: Optional[str] = None
    skip_hidden_pages: bool = False
    no_views: bool = False
    incremental: bool = False
    strict_latest: bool = False
    page_formats: Tuple[str, ...] = (DEFAULT_PAGE_FORMAT,)
    max_retries: int = DEFAULT_MAX_RETRIES
    concurrency: int = DEFAULT_CONCURRENCY
    timeout: float = DEFAULT_TIMEOUT
    poll_interval: float = DEFAULT_POLL_INTERVAL
    export_timeout: float = DEFAULT_EXPORT_TIMEOUT
    retry_delay: float = DEFAULT_RETRY_DELAY
    rate_limits: Optional[Dict[str, Tuple[int, float]]] = field(default_factory=lambda: dict(DEFAULT_RATE_LIMITS))
    rows_json: bool = False
    extras: bool = True
    docs: Tuple[str, ...] = ()
    exclude_docs: Tuple[str, ...] = ()
    exclude_tables: Tuple[str, ...] = ()
    retry_failed: bool = False
    retention: "Optional[RetentionPolicy]" = None  # after a clean run; None: keep every snapshot
    zip: bool = False
    max_vanished: float = DEFAULT_MAX_VANISHED
    allow_vanished: bool = False
    keep_vanished: int = DEFAULT_KEEP_VANISHED
    assets: bool = True
    asset_hosts: Tuple[str, ...] = DEFAULT_ASSET_HOSTS  # the allowed URL prefixes, default included
    max_asset_mb: int = DEFAULT_MAX_ASSET_MB
    max_age_days: float = DEFAULT_MAX_AGE_DAYS
    csv_bom: bool = False
    index: bool = True
    ping_url: Optional[str] = None

    def layout_key(self) -> Dict[str, Any]:
        """The choices that change which files a doc has, or their bytes; a doc is reused only
        when they match. A choice added later enters only when set, so manifests written before
        it existed still match a run that does not use it."""
        key: Dict[str, Any] = {
            "page_formats": list(self.page_formats),
            "skip_hidden_pages": self.skip_hidden_pages,
            "no_views": self.no_views,
            "rows_json": self.rows_json,
            "extras": self.extras,
            "exclude_tables": list(self.exclude_tables),
            "assets": list(self.asset_hosts) if self.assets else None,
        }
        if self.csv_bom:
            key["csv_bom"] = True
        return key

    @property
    def reuses_previous(self) -> bool:
        return self.incremental or self.retry_failed


@dataclass(frozen=True)
class RetentionPolicy:
    """restic-style keep rules; None leaves a rule out. Days, weeks and months are UTC."""

    last: Optional[int] = None
    daily: Optional[int] = None
    weekly: Optional[int] = None
    monthly: Optional[int] = None
    within_days: Optional[int] = None

    def __bool__(self) -> bool:
        return any(value is not None for value in (self.last, self.daily, self.weekly, self.monthly,
                                                   self.within_days))


@dataclass(frozen=True)
class Credentials:
    """The API token, where it came from (for messages) and what a run should warn about it."""

    token: str = field(repr=False)
    source: str  # "CODA_API_TOKEN" or "--token-file PATH"
    warnings: Tuple[str, ...] = ()
    file_ignored: bool = False  # --token-file was given too, and CODA_API_TOKEN won

    def describe(self) -> str:
        return self.source + (" (--token-file was ignored)" if self.file_ignored else "")


class Omitted(enum.Enum):
    """The value of a key that a record's JSON leaves out altogether, where None is written as
    null. Readers can tell the two apart: a table whose GET failed has no `rowCount` or
    `parentTableId` at all, a base table's `parentTableId` is null; a page that failed has no
    `fetchedAt`, one linked from a copy of unknown age has `"fetchedAt": null`; a skipped extra
    has no `url`."""

    KEY = "omitted"


OMITTED = Omitted.KEY
_T = TypeVar("_T")
Omittable = Union[_T, Omitted]  # Omittable[str]: a str, or the key left out


@dataclass(frozen=True)
class Failure:
    """One thing the run could not save, as summary.json `failures` lists it (and a ping tells it).

    `kind` says what failed (page, table, view, doc, formulas, asset, filter, vanished, run: the
    README lists them); the ids are None where no doc or object is concerned (a --doc that matched
    nothing, the run itself); `name` is the object's name as the API gave it, or the step or role
    that failed; `error` is one line of text, never an exception (a traceback kept alive for the
    whole run would hold on to whatever its frames held).
    """

    kind: str
    doc_id: Optional[str]
    object_id: Optional[str]
    name: Optional[str]
    error: str

    def as_json(self) -> Dict[str, Any]:
        """The summary.json form; its keys and their order are what monitors and the README know."""
        return {"kind": self.kind, "doc_id": self.doc_id, "id": self.object_id, "name": self.name,
                "error": self.error}


@dataclass(frozen=True)
class Skipped:
    """One optional thing the run left out without failing, as summary.json `skipped` lists it: an
    extra the API refused to this token (`kind` formulas, controls or permissions), or an asset
    that is gone at the source or too large (`kind` asset, with the page or table that links to it,
    `id` and `name`, and its `url`; an extra has none of these three keys)."""

    kind: str
    doc_id: str
    reason: str
    object_id: Omittable[str] = OMITTED
    name: Omittable[Any] = OMITTED
    url: Omittable[str] = OMITTED

    def as_json(self) -> Dict[str, Any]:
        """The summary.json form, keys in the order the README lists them."""
        record = {"kind": self.kind, "doc_id": self.doc_id, "reason": self.reason, "id": self.object_id,
                  "name": self.name, "url": self.url}
        return {key: value for key, value in record.items() if value is not OMITTED}


@dataclass(frozen=True)
class Vanished:
    """One object the snapshot a run compares with holds and Coda no longer lists, as summary.json
    `vanished` lists it (DIR/vanished.json adds `vanished_at`): `kind` is doc, page, table or
    view; `name` is the one that snapshot knew (None if it had none)."""

    kind: str
    doc_id: str
    object_id: str
    name: Optional[str]
    last_snapshot: str

    def as_json(self) -> Dict[str, Any]:
        """The summary.json form; its keys and their order are what monitors and the README know."""
        return {"kind": self.kind, "doc_id": self.doc_id, "id": self.object_id, "name": self.name,
                "last_snapshot": self.last_snapshot}


@dataclass(frozen=True)
class Summary:
    """summary.json, the file a monitor reads: its fields, declared here once in the order they are
    written (the README's table lists them in this order; fields are only ever added).

    `exit_code` and `error` are None while the run goes on (status `running`), `finished_at` too;
    `changes` is None for a run that did not finish. Failures, skipped and vanished items are
    records of their own; the other inner objects (counts, requests, changes) are built by the
    RunRecorder and RequestStats that count them.
    """

    tool: str
    snapshot: str
    status: str
    exit_code: Optional[int]
    error: Optional[str]
    started_at: str
    finished_at: Optional[str]
    duration_s: float
    counts: Dict[str, Any]
    failures: List[Failure]
    skipped: List[Skipped]
    vanished: List[Vanished]
    warnings: List[str]
    requests: Dict[str, Any]
    changes: Optional[Dict[str, Any]]

    def as_json(self) -> Dict[str, Any]:
        """The JSON object, keys in field order."""
        record = {spec.name: getattr(self, spec.name) for spec in fields(self)}
        record["failures"] = [failure.as_json() for failure in self.failures]
        record["skipped"] = [item.as_json() for item in self.skipped]
        record["vanished"] = [item.as_json() for item in self.vanished]
        return record


@dataclass(frozen=True)
class LastRun:
    """DIR/last-run.json, the one small file a monitor reads (the README's "Bad nights" shows it):
    how the last backup run ended, whatever happened, even before it took the lock.

    `snapshot` is None when the run has no snapshot folder; `counts` is summary.json's; `vanished`
    counts the entries of summary.json's `vanished` list.
    """

    snapshot: Optional[str]
    status: str
    exit_code: int
    error: Optional[str]
    started_at: str
    finished_at: str
    counts: Dict[str, Any]
    vanished: int

    def as_json(self) -> Dict[str, Any]:
        """The JSON object, keys in field order."""
        return {spec.name: getattr(self, spec.name) for spec in fields(self)}


@dataclass(frozen=True)
class FileRecord:
    """One file of a snapshot as manifest.json lists it (an object's `files`, the `index`): its
    path from the snapshot root, size and sha256 (hashed while it was written), and its role
    (markdown, html, csv, columns, table, rows; doc, pages, tables, formulas, controls,
    permissions; index)."""

    path: str
    size: int
    sha256: str
    role: str

    def as_json(self) -> Dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "role": self.role}

    @classmethod
    def from_json(cls, saved: Dict[str, Any]) -> "FileRecord":
        """A record as a manifest on disk has it (read_manifest checked its types)."""
        return cls(saved["path"], saved["size"], saved["sha256"], saved["role"])


@dataclass(frozen=True)
class AssetRecord:
    """An image or attachment saved in a doc's assets/, as a page's or table's `assets` lists it:
    the URL it came from, its path from the snapshot root, size, sha256, and the content type
    the asset host gave (which chose its file name's extension)."""

    url: str
    path: str
    size: int
    sha256: str
    content_type: str

    def as_json(self) -> Dict[str, Any]:
        return {"url": self.url, "path": self.path, "size": self.size, "sha256": self.sha256,
                "contentType": self.content_type}

    @classmethod
    def from_json(cls, saved: Dict[str, Any]) -> "AssetRecord":
        """A record as a manifest on disk has it (valid_asset_record checked it)."""
        return cls(saved["url"], saved["path"], saved["size"], saved["sha256"], saved["contentType"])


def json_key(name: str) -> str:
    """A manifest key from a record's field name: `parent_table_id` -> `parentTableId`."""
    first, *rest = name.split("_")
    return first + "".join(part.capitalize() for part in rest)


@dataclass
class ManifestEntry:
    """What a doc's, page's and table's entry in manifest.json share: one as_json for all three.

    The entries are mutable, unlike the other records: an object's entry is filled in as it goes
    (its files as they are written, then `status`, `fetchedAt` ...) by its exporter, and its
    `assets` by the asset finisher when its downloads end. Only writing goes through them: what
    reuse, --verify and --diff read from disk (this version's manifests, or any older one's)
    stays plain JSON.
    """

    def as_json(self) -> Dict[str, Any]:
        """The JSON object: keys in field order, spelt camelCase; an OMITTED field is left out,
        None is written as null. Lists are copied (a journal line is written while the asset
        finisher may still add to an entry); the records in them (a doc's pages and tables, the
        files and assets) become their JSON too."""
        record: Dict[str, Any] = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if value is OMITTED:
                continue
            if isinstance(value, list):
                value = [item.as_json() if isinstance(item, (ManifestEntry, FileRecord, AssetRecord)) else item
                         for item in value]
            record[json_key(spec.name)] = value
        return record


@dataclass
class PageEntry(ManifestEntry):
    """A page in manifest.json (and in a line of manifest.partial.jsonl): what the page listing
    said, where its files are, and what became of it. `status` is ok, unchanged (linked),
    skipped (the API cannot export it: `reason` says why) or failed (`error`); `fetchedAt` is
    set once its bytes are downloaded (or carried over when it is linked), `reusedFrom` only for
    a linked page, `reason` only when a run could reuse (see Job.fetched)."""

    id: str
    name: Any
    parent_id: Optional[str]
    browser_link: Any
    updated_at: Any
    content_type: Any
    is_hidden: Any
    path: str
    formats: List[str]
    status: str = "ok"
    files: List[FileRecord] = field(default_factory=list)
    fetched_at: Omittable[Optional[str]] = OMITTED
    reused_from: Omittable[str] = OMITTED
    reason: Omittable[str] = OMITTED
    assets: Omittable[List[AssetRecord]] = OMITTED
    asset_errors: Omittable[List[str]] = OMITTED
    error: Omittable[str] = OMITTED

    @classmethod
    def from_json(cls, saved: Dict[str, Any]) -> "PageEntry":
        """A page entry as an earlier manifest holds it (a doc linked whole carries its pages
        over): the keys it has, none it lacks; keys this version does not know are dropped."""
        return cls(**_fields_from_json(cls, saved))


@dataclass
class TableEntry(ManifestEntry):
    """A table or view in manifest.json (and in manifest.partial.jsonl), like a PageEntry.
    `updatedAt`, `rowCount` and `parentTableId` come from the table's own GET (left out when
    that failed); `calculatedColumns` once its columns are read (or carried over, null when the
    copy did not say)."""

    id: str
    name: Any
    table_type: str
    parent_page_id: Optional[str]
    parent_page_name: Optional[str]
    browser_link: Any
    path: str
    status: str = "ok"
    files: List[FileRecord] = field(default_factory=list)
    updated_at: Omittable[Any] = OMITTED
    row_count: Omittable[Optional[int]] = OMITTED
    parent_table_id: Omittable[Optional[str]] = OMITTED
    calculated_columns: Omittable[Optional[int]] = OMITTED
    fetched_at: Omittable[Optional[str]] = OMITTED
    reused_from: Omittable[str] = OMITTED
    reason: Omittable[str] = OMITTED
    assets: Omittable[List[AssetRecord]] = OMITTED
    asset_errors: Omittable[List[str]] = OMITTED
    error: Omittable[str] = OMITTED

    @classmethod
    def from_json(cls, saved: Dict[str, Any]) -> "TableEntry":
        """See PageEntry.from_json."""
        return cls(**_fields_from_json(cls, saved))


@dataclass
class DocEntry(ManifestEntry):
    """A doc in manifest.json: its facts, its own files (doc.json, pages.json, tables.json and
    the extras), and its pages and tables. `status` is ok, unchanged (linked whole) or failed
    (`error`: a listing or an extra that failed); manifest.partial.jsonl has a line of its
    id, name, path, updatedAt and fetchedAt."""

    id: str
    name: Any
    browser_link: Any
    updated_at: Any
    path: str
    status: str = "ok"
    files: List[FileRecord] = field(default_factory=list)
    pages: List[PageEntry] = field(default_factory=list)
    tables: List[TableEntry] = field(default_factory=list)
    fetched_at: Omittable[Optional[str]] = OMITTED
    reused_from: Omittable[str] = OMITTED
    reason: Omittable[str] = OMITTED
    error: Omittable[str] = OMITTED


def _fields_from_json(cls: type[ManifestEntry], saved: Dict[str, Any]) -> Dict[str, Any]:
    """A page's or table's fields from a saved entry whose files read_manifest checked and whose
    assets assets_intact did (a key missing stays OMITTED, or None where the field cannot be left
    out)."""
    values: Dict[str, Any] = {}
    for spec in fields(cls):
        key = json_key(spec.name)
        if key in saved:
            values[spec.name] = saved[key]
        elif spec.default is MISSING and spec.default_factory is MISSING:
            values[spec.name] = None
    values["files"] = [FileRecord.from_json(record) for record in saved["files"]]
    if "assets" in saved:
        values["assets"] = [AssetRecord.from_json(record) for record in saved["assets"]]
    if "assetErrors" in saved:
        values["asset_errors"] = list(saved["assetErrors"])
    return values


@dataclass(frozen=True)
class Manifest:
    """manifest.json's top level, what --incremental, --verify and --diff read back: the run's
    status and times, the options that shape its files, then every doc's entry (a DocEntry with
    its pages and tables, as the exporters filled them in) and the files of the browsable index.

    `index` is empty until index.html is written, once the outcome is known.
    """

    version: int
    tool: str
    snapshot: str
    status: str
    started_at: str
    finished_at: str
    options: Dict[str, Any]
    docs: List[DocEntry]
    index: List[FileRecord]

    def as_json(self) -> Dict[str, Any]:
        """The JSON object, keys in field order."""
        record = {spec.name: getattr(self, spec.name) for spec in fields(self)}
        record["docs"] = [doc.as_json() for doc in self.docs]
        record["index"] = [file.as_json() for file in self.index]
        return record


# --- HTTP client --------------------------------------------------------------


def pacing_after_answer(model: str, probe: bool, status: Optional[int]) -> Tuple[str, bool]:
    """How a category is paced after one of its requests is answered (`status` None: no HTTP
    answer), and whether the answer slows the category down: returns (model, slow_down).

    Coda does not say whether it counts a limit as a sliding window (at most N in any W) or as a
    token bucket (a burst of N, then N per W continuously). Pacing starts "unknown", which paces
    to the window (a bucket accepts that too). The probe, one request sent half a window before
    the window would let it go, tells them apart: a window server must refuse it, a bucket
    accepts it. Its 429 is the answer asked for, so it slows nothing down. Any other 429 means the
    server is stricter than the pacing: slow down, pace to the window and probe no more (the probe's
    late acceptance does not undo that: it went out before the 429, and a bucket model would
    ignore the slow-down). An answer that proves nothing (no answer, a 5xx) leaves the model as it was.
    """
    if status == 429:
        return "window", not probe
    if probe and model == "unknown" and status is not None and status < 500:
        return "bucket", False
    return model, False


class Slot(NamedTuple):
    """A start slot from RateLimiter.take: when the request may go, how long that is from the
    moment it was taken, the plan it belongs to (see RateLimiter._replan), and its number. Two
    slots often share a time (every worker queued behind the same start gets it), never a number:
    the probe is known by its number, so another request's answer is never taken for the probe's."""

    at: float
    wait: float
    plan: int
    number: int


class RateLimiter:
    """Paces one Coda limit category to `limit` requests per `window`.

    It keeps the start times it handed out (some in the future) and gives the next caller the
    earliest moment the server's model allows, which lets concurrent workers run right at the
    ceiling without bursting past it. Until the server has shown how it counts, that is a sliding
    window (at most `limit` starts in any window); once a window is full, one probe goes early
    (pacing_after_answer). A server that accepts it is a token bucket, paced from then on as one
    (GCRA: one request every window / limit, a burst of `limit` less BUCKET_RESERVE's worth: a
    bucket paced to empty has no room for two requests the network delivers together), which
    spreads the requests instead of sending them in window-sized bursts: the last ones go up to a
    window earlier.
    Any 429 but the probe's halves the allowed rate and paces the category to the window for good;
    every 429's Retry-After pauses the category. The rate then climbs back linearly over a few
    windows. The switch to the bucket, a slow-down and a pause each replan: slots handed out for
    later are void (`current` says so), and their holders take new ones under the new pacing.
    """

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("a rate limit needs at least one request per positive window")
        self.limit = limit
        self.window = window * RATE_WINDOW_MARGIN
        self.allowed = float(limit)
        self.model = "unknown"  # "window" or "bucket" once the server has shown it (pacing_after_answer)
        self._clock = clock
        self._starts: Deque[float] = deque()
        self._paused_until = 0.0
        self._adjusted_at = clock()
        # The bucket's refill time per request: the published rate itself. The window's margin is for
        # arrival times that differ; a bucket absorbs those in BUCKET_RESERVE, and a margin here would
        # only slow every bucket-paced run down by as much.
        self._interval = window / limit
        self._due = 0.0  # GCRA's theoretical arrival time: the bucket, had it been paced to, is empty then
        self._tolerance = max(0.0, (limit - 1) * self._interval - BUCKET_RESERVE)  # GCRA's burst, less the reserve
        self._numbers = itertools.count()
        self._pending: Dict[int, float] = {}  # slots handed out and not yet answered: number -> start
        self._probe: Optional[int] = None  # the number of the probe's slot while it is in flight ...
        self._probe_start = 0.0  # ... and when it went out ...
        self._probe_by = 0.0  # ... and the last moment its answer proves anything
        self._given_up: Set[int] = set()  # probes that could not go in time: their slots are void
        self._replans: List[float] = []  # when each replan was: a slot's plan is how many came before it
        self._lock = threading.Lock()

    def take(self) -> Slot:
        """Claim the next start slot: when to send, how long that is from now, and the plan it is of."""
        with self._lock:
            now = self._clock()
            at, probe_by = self._next_slot(now)
            number = next(self._numbers)
            if probe_by is not None:
                self._probe, self._probe_start, self._probe_by = number, at, probe_by
            self._pending[number] = at
            self._starts.append(at)
            self._due = max(self._due, at) + self._interval
            return Slot(at, max(0.0, at - now), len(self._replans), number)

    def current(self, slot: Slot) -> bool:
        """Whether a slot still holds: the first replan after it was handed out (see _replan)
        voided it if it was then still to come, and a probe given up (see ready) is void."""
        with self._lock:
            if slot.number in self._given_up:
                return False
            return slot.plan == len(self._replans) or slot.at <= self._replans[slot.plan]

    def ready(self, slot: Slot) -> bool:
        """Whether a request may go once its slot has come. Any may, but the probe only once every
        request slotted before it in the last window has been answered: the server must have
        counted them all when the probe arrives. One still on its way could arrive after the probe
        and be refused in its place, and the probe's acceptance would pass a window server off as
        a bucket (requests queued behind one start all get its time, so the probe often shares its
        moment with the last requests that fill the window). A probe that could no longer prove
        anything if it went now (past `_probe_by`, whether it waited for those answers or its
        holder came late) is given up: its slot is void, and a later request probes."""
        with self._lock:
            if slot.number != self._probe:
                return True
            now = self._clock()
            if now > self._probe_by:
                self._probe = None
                self._pending.pop(slot.number, None)
                self._given_up.add(slot.number)
                with contextlib.suppress(ValueError):
                    self._starts.remove(self._probe_start)
                return False
            return not any(number < slot.number and at > now - self.window for number, at in self._pending.items())

    def started(self, slot: Slot, at: float) -> None:
        """The request given `slot` went out only at `at` (it waited for a connection, or for the
        CPU): count it from then, so that the windows the server sees hold what pacing thinks, and
        the margin need only cover the network."""
        if at <= slot.at:
            return
        with self._lock:
            self._due = max(self._due, at + self._interval)
            if slot.number in self._pending:
                self._pending[slot.number] = at
            if slot.number == self._probe:
                self._probe_start = at
            with contextlib.suppress(ValueError):  # gone if it waited a window or more: it counts from `at` anyway
                self._starts.remove(slot.at)  # one start of that time; which one does not matter
            index = len(self._starts)
            while index > 0 and self._starts[index - 1] > at:
                index -= 1
            self._starts.insert(index, at)

    def answered(self, slot: Slot, status: Optional[int], retry_after: Optional[float] = None) -> None:
        """The request given `slot` was answered with `status` (None: no HTTP answer)."""
        with self._lock:
            self._pending.pop(slot.number, None)
            probe = slot.number == self._probe
            if probe:
                self._probe = None
            # A probe that went out only after `_probe_by` (it waited for a connection once ready)
            # may have reached a window server after the window's first start left: its acceptance
            # proves nothing. Its 429 still does (a bucket has refilled most of its burst by then).
            proof = probe and (status == 429 or self._probe_start <= self._probe_by)
            was = self.model
            self.model, slow_down = pacing_after_answer(self.model, proof, status)
            if probe and status == 429:
                with contextlib.suppress(ValueError):  # a refused request does not count in a window
                    self._starts.remove(self._probe_start)
            if status == 429:
                self._rate_limited(slow_down, retry_after)
            elif self.model == "bucket" != was:
                self._replan(self._clock())

    def delay(self) -> float:
        """How long a take() now would wait, claiming nothing: 0 while the budget has room."""
        with self._lock:
            now = self._clock()
            return max(0.0, self._next_slot(now)[0] - now)

    def _next_slot(self, now: float) -> Tuple[float, Optional[float]]:
        """The next start slot, and if it is the probe, the last moment its answer proves anything."""
        self._recover(now)
        while self._starts and self._starts[0] <= now - self.window:
            self._starts.popleft()
        if len(self._pending) > 2 * self.limit:  # slots whose answer never came (a thread that ended): forgotten
            self._pending = {number: at for number, at in self._pending.items() if at > now - self.window}
        earliest = max(now, self._paused_until, self._starts[-1] if self._starts else now)
        bucket_at = self._due - self._tolerance
        if self.model == "bucket":
            return max(earliest, bucket_at), None
        allowed = max(1, int(self.allowed))
        if len(self._starts) < allowed:
            return earliest, None
        oldest = self._starts[-allowed]
        at = max(earliest, oldest + self.window)
        if self.model == "unknown" and self._probe is None and allowed == self.limit:
            # Half a window early: a bucket has refilled half its burst by then, and every start of
            # the full window is still in it, so a window server must refuse it whatever the
            # network did to the arrival times (up to a quarter of a window).
            probe_at = max(earliest, oldest + PROBE_LEAD * self.window, bucket_at)
            probe_by = oldest + (1 - PROBE_LEAD / 2) * self.window
            if probe_at <= probe_by:
                return probe_at, probe_by
        return at, None

    def _rate_limited(self, slow_down: bool, retry_after: Optional[float]) -> None:
        now = self._clock()
        self._recover(now)
        if slow_down:
            self.allowed = max(1.0, self.allowed / 2)
        if retry_after:
            self._paused_until = max(self._paused_until, now + retry_after)
        if slow_down or retry_after:
            self._replan(now)

    def _replan(self, now: float) -> None:
        """The pacing changed under slots already handed out for later: the server proved a bucket
        (they may go sooner) or refused one (slower, or not before a Retry-After). Those slots are
        void and their holders, who check `current` while they wait, take new ones; otherwise
        workers asleep on window-paced slots would waste the bucket's room for seconds, or send
        during the pause the server asked for."""
        self._replans.append(now)
        while self._starts and self._starts[-1] > now:
            self._starts.pop()
        self._pending = {number: at for number, at in self._pending.items() if at <= now}
        self._due = 0.0
        for start in self._starts:
            self._due = max(self._due, start) + self._interval

    def _recover(self, now: float) -> None:
        if self.allowed < self.limit:
            regained = self.limit * (now - self._adjusted_at) / (RATE_RECOVERY_WINDOWS * self.window)
            self.allowed = min(float(self.limit), self.allowed + regained)
        self._adjusted_at = now


class RequestStats:
    """Thread-safe request counters for summary.json."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0
        self.retries = 0
        self.rate_limited = 0
        self.by_category: Dict[str, int] = {}
        self._pacing: Dict[str, int] = {}  # workers sleeping for a rate limit now, per category

    @contextlib.contextmanager
    def pacing(self, category: str) -> Iterator[None]:
        """Mark a worker as sleeping for its category's rate limit, for the progress line."""
        with self._lock:
            self._pacing[category] = self._pacing.get(category, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._pacing[category] -= 1

    def waiting(self) -> List[str]:
        """Categories some worker is sleeping for right now, the most waited-for first."""
        with self._lock:
            busy = [(count, name) for name, count in self._pacing.items() if count > 0]
        return [name for _, name in sorted(busy, key=lambda item: (-item[0], item[1]))]

    def count_request(self, category: str) -> None:
        with self._lock:
            self.total += 1
            self.by_category[category] = self.by_category.get(category, 0) + 1

    def count_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def count_rate_limited(self) -> None:
        with self._lock:
            self.rate_limited += 1

    def as_dict(self) -> Dict[str, Any]:
        with self._lock:
            return {
                "total": self.total,
                "retries": self.retries,
                "rate_limited": self.rate_limited,
                "by_category": dict(sorted(self.by_category.items())),
            }


class ConnectionBreaker:
    """Tells an API that is gone from a bad night's odd reset.

    Only failures without an HTTP answer count (refused, reset, DNS, TLS, timeouts), from every
    worker together; an answer, even a 503, to a request sent after the streak began shows the API
    is back and ends the streak (a late answer to one sent before does not: see answered). The API
    counts as lost after `max_failures` in a row, or when the streak has lasted `max_seconds`,
    and only when they came from at least two different requests: one endpoint that keeps
    resetting is that object's failure, not a lost API.
    """

    def __init__(self, max_failures: int = API_LOST_FAILURES, max_seconds: float = API_LOST_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.max_seconds = max_seconds
        self._clock = clock
        self._failures = 0
        self._since = 0.0
        self._requests: Set[str] = set()  # which requests failed in this streak (two are enough)
        self._lock = threading.Lock()

    def now(self) -> float:
        """The breaker's clock: when a request goes out, for `answered`."""
        return self._clock()

    def answered(self, sent: float) -> None:
        """An HTTP answer came to a request sent at `sent` (self.now()). It ends the streak only
        if the request went out after the streak began: a late answer to a request sent before
        the first failure says the API was there then, not that it is back (an API gone for good
        would otherwise go unnoticed whenever such an answer came last)."""
        with self._lock:
            if self._failures and sent < self._since:
                return
            self._failures = 0
            self._requests.clear()

    def unanswered(self) -> int:
        """Connection failures since the API last answered, if they came from two requests or
        more: above 0 at the end of a run, the API went away and the run ran out of work before
        the bounds were reached."""
        with self._lock:
            return self._failures if len(self._requests) > 1 else 0

    def failed(self, request: str) -> Optional[str]:
        """Count one connection failure of `request` (method and path); return why the API is
        lost, or None while it may come back."""
        with self._lock:
            now = self._clock()
            if self._failures == 0:
                self._since = now
            self._failures += 1
            if len(self._requests) < 2:
                self._requests.add(request)
            lasted = now - self._since
            if len(self._requests) > 1 and (self._failures >= self.max_failures or lasted >= self.max_seconds):
                return f"{self._failures} connection failures in a row over {lasted:.0f}s and no answer"
            return None


@dataclass(frozen=True)
class Halt:
    """Why a run stopped at once, though nobody cancelled it: `kind` is a cause of EXIT_CODES."""

    kind: str  # "api_lost" or "disk"
    reason: str


@dataclass(frozen=True)
class ClientSettings:
    """How the HTTP client talks: retries, timeouts and pacing."""

    api_url: str
    max_retries: int = DEFAULT_MAX_RETRIES
    timeout: float = DEFAULT_TIMEOUT
    retry_delay: float = DEFAULT_RETRY_DELAY
    rate_limits: Optional[Dict[str, Tuple[int, float]]] = None
    strict_latest: bool = False
    max_in_flight: int = DEFAULT_CONCURRENCY


@dataclass
class Response:
    status: int
    headers: Dict[str, str]
    body: bytes


class _Transient(Exception):
    """One attempt failed in a way a retry may cure."""

    def __init__(self, message: str, status: int = 0, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class HttpClient:
    """The only place that talks HTTP: retries, backoff, pacing, keep-alive.

    Each worker thread keeps its own persistent connection per host. The
    Authorization header is added only to requests for the API base URL;
    downloads go out without it, as the storage host rejects it and must
    never see the token.
    """

    def __init__(
        self,
        settings: ClientSettings,
        token: str,
        cancel: threading.Event,
        stats: Optional[RequestStats] = None,
    ) -> None:
        self.settings = settings
        self._token = token
        self._cancel = cancel
        self.stats = stats or RequestStats()
        self._api = urllib.parse.urlsplit(settings.api_url)
        self._limiters = {
            name: RateLimiter(limit, window) for name, (limit, window) in (settings.rate_limits or {}).items()
        }
        self._local = threading.local()
        self._opened: List[http.client.HTTPConnection] = []  # every thread's, for close()
        self._opened_lock = threading.Lock()
        # Held only while a request is on the wire, never while pacing or backing off.
        self._in_flight = threading.BoundedSemaphore(settings.max_in_flight)
        self._rng = random.Random()
        self._ssl: Optional[ssl.SSLContext] = None  # made on first https use (~50 ms)
        self.breaker = ConnectionBreaker()
        self.halted: Optional[Halt] = None  # set once by halt()

    # Public calls -------------------------------------------------------------

    def get_json(self, path: str, params: Optional[Dict[str, str]] = None, *, category: str = "read",
                 doc_scoped: bool = False, final: Tuple[int, ...] = (), deadline: Optional[float] = None) -> Any:
        """GET an API path and return its JSON, retrying what a retry may cure (but no status in `final`)
        until the `deadline` (time.monotonic()), if any. The flags are keyword-only: a call says
        which it sets."""
        return self._call_api("GET", path, params, None, category=category, doc_scoped=doc_scoped, final=final,
                              deadline=deadline)

    def post_json(self, path: str, body: Dict[str, Any], *, doc_scoped: bool = False,
                  deadline: Optional[float] = None, claimed: bool = False) -> Any:
        """POST to an API path (a write); `claimed`: the caller already holds the first attempt's
        write slot (see claim_slot), so it is not paced again."""
        return self._call_api("POST", path, None, body, category="write", doc_scoped=doc_scoped, final=(),
                              deadline=deadline, claimed=claimed)

    def budget_delay(self, category: str) -> float:
        """How long a request of this category would wait for its rate budget now (0: it has room)."""
        limiter = self._limiters.get(category)
        return limiter.delay() if limiter else 0.0

    def claim_slot(self, category: str) -> None:
        """Take the next start slot of a category for the request this thread sends next (with
        `claimed=True`), so that a caller deciding under its own lock takes the slot it saw."""
        limiter = self._limiters.get(category)
        if limiter is not None:
            self._unsent()
            self._local.slot = (limiter, limiter.take())

    def download(self, url: str, deadline: Optional[float] = None) -> bytes:
        """GET a presigned storage URL without credentials, following redirects.

        Raises ExpiredLink when storage refuses the link (403/404 or an XML
        error document), so the caller can ask the API for a fresh one. A host
        that never answers is given up at the deadline, not after every retry.
        """
        def attempt(timeout: float) -> bytes:
            response = self._follow_redirects(url, timeout, deadline)
            if response.status in (401, 403, 404, 410) or _looks_like_storage_error(response.body):
                raise ExpiredLink(f"storage refused the download link (HTTP {response.status})")
            if response.status == 429 or response.status >= 500:
                raise _Transient(f"HTTP {response.status} from the download host", response.status)
            if response.status >= 300:
                raise ApiError(response.status, "unexpected answer from the download host", _redact_url(url))
            return response.body

        body: bytes = self._with_retries(attempt, "download", _redact_url(url), deadline)
        return body

    def get_streamed(self, url: str, accept: Callable[[http.client.HTTPResponse], Any],
                     may_follow: Callable[[str], bool], category: str = "asset") -> Any:
        """GET a URL taken from a response body, without any credential, and hand the response,
        body unread, to `accept` (which streams it somewhere and returns what it made).

        Redirects are followed only to URLs `may_follow` allows; 429 and 5xx are retried like
        every request, and so is a connection lost while `accept` reads (a _Transient).
        """
        redacted = _redact_url(url)

        def attempt(timeout: float) -> Any:
            current, status = url, 0
            for _ in range(MAX_REDIRECTS + 1):
                with self._stream(current, timeout) as raw:
                    location = raw.getheader("location")
                    if raw.status in (301, 302, 303, 307, 308) and location:
                        raw.read(65536)  # a redirect's small body; a longer one drops the connection
                        target = urllib.parse.urljoin(current, location.strip())
                        if not may_follow(target):
                            raise ApiError(raw.status, f"refused a redirect to {_redact_url(target)}", redacted)
                        current, status = target, raw.status
                        continue
                    if raw.status == 429 or raw.status >= 500:
                        raise _Transient(f"HTTP {raw.status} from {urllib.parse.urlsplit(current).netloc}",
                                         raw.status, _retry_after(raw.getheader("retry-after")))
                    return accept(raw)
            raise ApiError(status, "too many redirects", redacted)

        return self._with_retries(attempt, category, redacted)

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("cancelled")

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def abort(self) -> None:
        """Cut every open connection after a cancel: blocked reads end at once and the workers,
        seeing the cancel flag, stop.

        The plain socket shutdown is used on purpose: SSLSocket.shutdown first drops the TLS
        layer, and a worker writing in that instant would send its request in clear text.
        """
        with self._opened_lock:
            opened = list(self._opened)
        for conn in opened:
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def halt(self, kind: str, reason: str) -> None:
        """Stop the whole run for a cause other than a signal (the API is lost, the disk is full).

        The first cause is kept (unless a signal came first); every worker, also one sleeping in a
        backoff, raises Cancelled at its next request or sleep, and requests in flight are cut.
        """
        with self._opened_lock:
            if self.halted is None and not self._cancel.is_set():
                self.halted = Halt(kind, reason)
                LOG.error("stopping the run: %s", reason)
        self._cancel.set()
        self.abort()

    def close(self) -> None:
        """Close every keep-alive connection; call once the workers are done."""
        with self._opened_lock:
            opened, self._opened = self._opened, []
        for conn in opened:
            conn.close()

    # Retry loop ---------------------------------------------------------------

    def _call_api(self, method: str, path: str, params: Optional[Dict[str, str]], body: Optional[Dict[str, Any]],
                  *, category: str, doc_scoped: bool, final: Tuple[int, ...], deadline: Optional[float],
                  claimed: bool = False) -> Any:
        url = self.settings.api_url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        strict = self.settings.strict_latest and doc_scoped
        if strict:
            headers["X-Coda-Doc-Version"] = "latest"
        payload = None
        if body is not None:
            payload = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"

        def attempt(timeout: float) -> Any:
            response = self._send(method, url, headers, payload, timeout, deadline)
            if response.status in final:
                raise ApiError(response.status, _error_message(response.body, self._token), url)
            return _interpret_api_response(response, url, strict, self._token)

        return self._with_retries(attempt, category, url, deadline, claimed)

    def _with_retries(self, attempt: Callable[[float], Any], category: str, url: str,
                      deadline: Optional[float] = None, claimed: bool = False) -> Any:
        """Run `attempt(socket timeout)` until it succeeds or a retry cannot help.

        With a deadline (time.monotonic()), no attempt waits on the network past it and no
        retry starts after it.
        """
        failure: Optional[_Transient] = None
        attempts = 0
        for number in range(self.settings.max_retries + 1):
            self.check_cancelled()
            self._pace(category, claimed and number == 0)
            timeout = self.settings.timeout
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    self._unsent()  # now, not at this thread's next request: were it the probe, none could go
                    break
            self.stats.count_request(category)
            attempts += 1
            try:
                return attempt(timeout)
            except _Transient as exc:
                failure = exc
            except (OSError, http.client.HTTPException) as exc:
                failure = _Transient(f"connection error: {exc.__class__.__name__}: {exc}")
            if failure.status == 429:
                self.stats.count_rate_limited()  # the limiter heard of it from _send
            if number == self.settings.max_retries:
                break
            delay = failure.retry_after if failure.retry_after is not None else self._backoff(number)
            if deadline is not None and time.monotonic() + delay >= deadline:
                break
            self.stats.count_retry()
            LOG.debug("retrying %s in %.2fs after: %s", url, delay, failure)
            self.sleep(delay)
        if failure is None:
            raise DeadlineReached(f"no time left before the deadline ({url})")
        late = " (deadline reached)" if deadline is not None and attempts <= self.settings.max_retries else ""
        raise ApiError(failure.status, f"gave up after {attempts} attempt(s){late}: {failure}", url)

    def _backoff(self, number: int) -> float:
        """Exponential backoff with jitter: base * 2^n, scaled by 0.5-1.0, capped."""
        delay = min(BACKOFF_CAP, self.settings.retry_delay * 2.0 ** number)
        return float(delay * (0.5 + self._rng.random() / 2))

    def _pace(self, category: str, claimed: bool = False) -> None:
        """Wait for this thread's start slot in its category's budget: a new one, or (`claimed`)
        the one claim_slot took. A slot voided while waiting (the limiter replanned) is replaced;
        the probe also waits until the limiter says it is ready (RateLimiter.ready)."""
        held = self._local.__dict__.get("slot") if claimed else None
        if held is None:
            self._unsent()
            limiter = self._limiters.get(category)
            if limiter is None:
                return
            held = self._local.slot = (limiter, limiter.take())
        limiter, slot = held
        if slot.wait <= 0 and limiter.ready(slot):
            return
        with self.stats.pacing(category):
            while True:
                left = slot.at - time.monotonic()
                if not limiter.current(slot):
                    slot = limiter.take()
                    self._local.slot = (limiter, slot)
                elif left > 0:
                    self.sleep(min(left, REPLAN_CHECK))
                elif not limiter.ready(slot):
                    self.sleep(REPLAN_CHECK)
                else:
                    return

    def _unsent(self) -> None:
        """Give back the slot of a request this thread was paced for but never sent (its deadline
        came during the wait, it was refused or cancelled), when that is known or at the latest
        before the thread's next request: were it the probe, no other request could probe while it
        is held, unanswered it holds a later probe back (RateLimiter.ready), and left here it
        would pass for the slot of this thread's next request, an unpaced download, whose answer
        would then tell the API's limiter how the API counts."""
        paced = self._local.__dict__.pop("slot", None)
        if paced is not None:
            limiter, slot = paced
            limiter.answered(slot, None)

    def _sending(self) -> None:
        """Tell the limiter when the request this thread was paced for really goes out."""
        paced = self._local.__dict__.pop("slot", None)
        self._local.sent = paced
        if paced is not None:
            limiter, slot = paced
            limiter.started(slot, time.monotonic())

    def _answered(self, status: Optional[int], retry_after: Optional[str] = None) -> None:
        """Tell the limiter how the request this thread sent was answered (None: not at all):
        a 429 slows its category down, and the probe's answer says how the server counts."""
        paced = self._local.__dict__.pop("sent", None)
        if paced is not None:
            limiter, slot = paced
            limiter.answered(slot, status, _retry_after(retry_after) if status == 429 else None)

    def sleep(self, seconds: float) -> None:
        """Sleep that ends early, with Cancelled, when the run is cancelled."""
        if seconds > 0 and self._cancel.wait(seconds):
            raise Cancelled("cancelled")

    # Transport ----------------------------------------------------------------

    def _follow_redirects(self, url: str, timeout: float, deadline: Optional[float]) -> Response:
        started = time.monotonic()
        for _ in range(5):
            left = timeout - (time.monotonic() - started)
            if left <= 0:
                raise socket.timeout("no time left to follow the redirect")
            response = self._send("GET", url, {"Accept": "*/*"}, None, left, deadline)
            location = response.headers.get("location")
            if response.status not in (301, 302, 303, 307, 308) or not location:
                return response
            url = urllib.parse.urljoin(url, location)
        raise ApiError(response.status, "too many redirects from the download host", _redact_url(url))

    def _send(self, method: str, url: str, headers: Dict[str, str], body: Optional[bytes],
              timeout: float, deadline: Optional[float] = None) -> Response:
        """One request on this thread's connection; `timeout` bounds the whole exchange, connecting
        and the last byte of the answer included (see read_answer), but not the wait for a place
        in flight (other requests being slow is not this one's server being slow: counted, such
        waits would time out answers that came in time and feed the breaker); the exchange ends by
        `deadline` (time.monotonic()) all the same."""
        parts = urllib.parse.urlsplit(url)
        if "Authorization" in headers and (parts.scheme, parts.netloc) != (self._api.scheme, self._api.netloc):
            raise RefusedRequest(f"refusing to send credentials to a host other than the API ({_redact_url(url)})")
        headers = dict(headers, **{"User-Agent": USER_AGENT, "Accept-Encoding": "gzip"})
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        LOG.debug("%s %s", method, _redact_url(url))
        to_api = (parts.scheme, parts.netloc) == (self._api.scheme, self._api.netloc)
        conn = self._connection(parts.scheme, parts.netloc)
        conn.timeout = timeout  # read at connect; a kept-alive socket is set below
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        try:
            with self._in_flight:
                until = time.monotonic() + timeout
                if deadline is not None:
                    until = min(until, deadline)
                self.check_cancelled()
                self._sending()
                sent = self.breaker.now()
                conn.request(method, target, body=body, headers=headers)
                sock = conn.sock  # the answer is read from it even once `conn` lets go of it (will_close)
                raw = conn.getresponse()
                data = read_answer(raw, sock, until, _redact_url(url))
        except (OSError, http.client.HTTPException) as exc:
            self._answered(None)
            self._drop_connection(parts.scheme, parts.netloc)
            if to_api:
                self._connection_failed(exc, f"{method} {parts.path}")
            raise
        except BaseException:
            self._answered(None)
            self._drop_connection(parts.scheme, parts.netloc)
            raise
        self._answered(raw.status, raw.getheader("retry-after"))
        if to_api:
            self.breaker.answered(sent)
        reply = Response(raw.status, {k.lower(): v for k, v in raw.getheaders()}, data)
        if raw.will_close:
            self._drop_connection(parts.scheme, parts.netloc)
        if reply.headers.get("content-encoding", "").lower() == "gzip":
            reply.body = gunzip(reply.body, reply.status, _redact_url(url))
        return reply

    @contextlib.contextmanager
    def _stream(self, url: str, timeout: float) -> Iterator[http.client.HTTPResponse]:
        """One GET whose body the caller reads (no Authorization, no cookies, no gzip: the bytes
        are the file); `timeout` bounds connecting and each read. A connection whose body was not
        read to the end is not reused."""
        parts = urllib.parse.urlsplit(url)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        headers = {"User-Agent": USER_AGENT, "Accept": "*/*", "Accept-Encoding": "identity"}
        LOG.debug("GET %s", _redact_url(url))
        conn = self._connection(parts.scheme, parts.netloc)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        try:
            with self._in_flight:
                self.check_cancelled()
                conn.request("GET", target, headers=headers)
                raw = conn.getresponse()
                yield raw
        except BaseException:
            self._drop_connection(parts.scheme, parts.netloc)
            raise
        if raw.will_close or not raw.isclosed():
            self._drop_connection(parts.scheme, parts.netloc)

    def _connection_failed(self, exc: BaseException, request: str) -> None:
        """Feed the breaker; a failure caused by our own cancel (connections cut) does not count."""
        if self._cancel.is_set():
            return
        lost = self.breaker.failed(request)
        if lost is not None:
            self.halt("api_lost", f"lost the API: {lost} (last: {exc.__class__.__name__}: {exc})")

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        """This thread's connection to a host: the kept-alive one unless the server closed it.

        Servers close idle keep-alive connections; a closed one reads as ready (end of file),
        so it is replaced before a request is sent on it, and no request is ever sent twice.
        """
        connections: Dict[Tuple[str, str], http.client.HTTPConnection]
        connections = self._local.__dict__.setdefault("connections", {})
        conn = connections.get((scheme, netloc))
        if conn is not None:
            sock = conn.sock
            if sock is None or not select.select([sock], [], [], 0)[0]:
                return conn
            self._drop_connection(scheme, netloc)
        if scheme == "https":
            with self._opened_lock:
                self._ssl = self._ssl or ssl.create_default_context()
            conn = http.client.HTTPSConnection(netloc, timeout=self.settings.timeout, context=self._ssl)
        elif scheme == "http":
            conn = http.client.HTTPConnection(netloc, timeout=self.settings.timeout)
        else:
            raise RefusedRequest(f"unsupported URL scheme {scheme!r}")
        connections[(scheme, netloc)] = conn
        with self._opened_lock:
            self._opened.append(conn)
        return conn

    def _drop_connection(self, scheme: str, netloc: str) -> None:
        conn = self._local.__dict__.get("connections", {}).pop((scheme, netloc), None)
        if conn is not None:
            conn.close()
            with self._opened_lock, contextlib.suppress(ValueError):
                self._opened.remove(conn)


def _interpret_api_response(response: Response, url: str, strict: bool, secret: str) -> Any:
    """Turn one API answer into JSON, a _Transient to retry, or an ApiError.

    Error text is kept for the summary, so the token is cut out of it first: a
    proxy's error page may echo the request headers.
    """
    status = response.status
    if 200 <= status < 300:
        try:
            return json.loads(response.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Transient(f"HTTP {status} with a body that is not valid JSON", status) from exc
    message = _error_message(response.body, secret)
    if status == 429:
        raise _Transient("HTTP 429: rate limited", 429, _retry_after(response.headers.get("retry-after")))
    if status >= 500:
        raise _Transient(f"HTTP {status}: {message}", status)
    if status == 400 and strict and _is_stale_doc_message(message):
        raise _Transient(f"HTTP 400: {message}", status)
    raise ApiError(status, message, url)


def _error_message(body: bytes, secret: str) -> str:
    """Coda's error bodies are {statusCode, statusMessage, message}; fall back to text.

    The token is cut out of the whole body before anything is shortened, so no piece of it
    survives into the summary.
    """
    text = body[:65536].decode("utf-8", "replace")
    if secret:
        text = text.replace(secret, "[redacted]")
    try:
        payload = json.loads(text)
    except ValueError:
        return text.strip()[:200] or "no message"
    if isinstance(payload, dict):
        return str(payload.get("message") or payload.get("statusMessage") or "no message")[:500]
    return text.strip()[:200]


def _is_stale_doc_message(message: str) -> bool:
    lowered = message.lower()
    return "up to date" in lowered or "not latest" in lowered


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Parse Retry-After (seconds or an HTTP date), capped so a bad value cannot stall a night."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        seconds = (when - dt.datetime.now(dt.timezone.utc)).total_seconds()
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


def _looks_like_storage_error(body: bytes) -> bool:
    """S3-style `<Error><Code>AccessDenied</Code>...`, which storage may even send with HTTP 200."""
    head = body[:300].lstrip()
    return head.startswith((b"<?xml", b"<Error>")) and b"<Error>" in head and b"<Code>" in head


def read_answer(raw: http.client.HTTPResponse, sock: Optional[socket.socket], until: float, url: str) -> bytes:
    """The body of an answer, whole, by `until` (time.monotonic()) and in at most MAX_ANSWER_BYTES.

    A read timeout alone ends only silence: a server that sends a byte now and then, or a body
    that never ends, would hold a worker for hours or fill memory. So the body is read a piece at a
    time, each wait bounded by what is left until `until` (socket.timeout past it, retried like
    any timeout), and one over the limit is refused (MalformedAnswer: a retry would bring it again).
    `sock` is the connection's socket as the request went out: an answer that ends with its
    connection (will_close) leaves the connection without one (conn.sock None), yet its body
    still comes through that socket, and unbounded by `until`, each wait could take a whole
    socket timeout.
    """
    pieces: List[bytes] = []
    size = 0
    while True:
        left = until - time.monotonic()
        try:
            if left <= 0:
                raise socket.timeout
            if sock is not None:
                sock.settimeout(left)
            piece = raw.read1(ANSWER_CHUNK)
        except socket.timeout as exc:
            raise socket.timeout("the answer did not arrive whole in time") from exc
        if not piece:
            break
        size += len(piece)
        if size > MAX_ANSWER_BYTES:
            raise MalformedAnswer(f"answer larger than {MAX_ANSWER_BYTES >> 20} MiB", url)
        pieces.append(piece)
    if raw.length:  # the connection closed before Content-Length bytes came
        raise http.client.IncompleteRead(b"".join(pieces), raw.length)
    raw.read()  # b"": marks the answer read, so the connection can carry the next request
    return b"".join(pieces)


def gunzip(body: bytes, status: int, url: str) -> bytes:
    """A gzip body decoded, in at most MAX_ANSWER_BYTES: a few kilobytes of gzip can decode to
    gigabytes. Every member is decoded, and zero padding after one skipped, as gzip.decompress
    does. A corrupt or cut body is a transient fault (a retry usually brings it whole)."""
    pieces: List[bytes] = []
    size = 0
    while body:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # one gzip member
        try:
            piece = inflater.decompress(body, MAX_ANSWER_BYTES - size + 1)
        except zlib.error as exc:
            raise _Transient(f"corrupt gzip body: {exc}", status) from exc
        size += len(piece)
        if size > MAX_ANSWER_BYTES:
            raise MalformedAnswer(f"answer larger than {MAX_ANSWER_BYTES >> 20} MiB once decoded", url)
        if not inflater.eof:
            raise _Transient("corrupt gzip body: it ends early", status)
        pieces.append(piece)
        body = inflater.unused_data.lstrip(b"\0")  # zero padding after a member, skipped as gzip.decompress does
    return b"".join(pieces)


def _redact_url(url: str) -> str:
    """Drop the query of a URL for logs: presigned links carry signatures there."""
    parts = urllib.parse.urlsplit(url)
    if "/blobs/" in parts.path or "X-Amz" in parts.query or "Signature" in parts.query:
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return url


# --- Coda API -----------------------------------------------------------------


def _quote(segment: str) -> str:
    """Percent-encode an id for a URL path: ids come from the API and are not trusted."""
    return urllib.parse.quote(str(segment), safe="")


class CodaApi:
    """Coda API v1 calls as plain dicts and iterators; no file I/O here."""

    def __init__(self, http: HttpClient, warn: Optional[Callable[[str], None]] = None) -> None:
        self.http = http
        # Where a listing's warnings go: a run's RunRecorder.warn puts them in summary.json too.
        self.warn = warn or (lambda text: LOG.warning("%s", text))

    def whoami(self) -> Dict[str, Any]:
        return _expect_dict(self.http.get_json("/whoami"), "/whoami")

    def iter_docs(self, include_shared: bool, workspace_id: Optional[str]) -> Iterator[Dict[str, Any]]:
        params = {"limit": str(LIST_LIMIT)}
        if not include_shared:
            params["isOwner"] = "true"
        if workspace_id:
            params["workspaceId"] = workspace_id
        return self._paginate("/docs", params, category="list_docs", max_pages=MAX_DOC_LIST_PAGES)

    def iter_pages(self, doc: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
        """A doc's pages, bounded by its docSize.pageCount."""
        return self._paginate(f"/docs/{_quote(doc['id'])}/pages", {"limit": str(LIST_LIMIT)}, doc_scoped=True,
                              expected=doc_size(doc, "pageCount"))

    def iter_tables(self, doc: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
        """A doc's tables and views, bounded by its docSize.tableAndViewCount."""
        params = {"limit": str(LIST_LIMIT), "tableTypes": "table,view"}
        return self._paginate(f"/docs/{_quote(doc['id'])}/tables", params, doc_scoped=True,
                              expected=doc_size(doc, "tableAndViewCount"))

    def get_table(self, doc_id: str, table_id: str) -> Dict[str, Any]:
        path = f"/docs/{_quote(doc_id)}/tables/{_quote(table_id)}"
        return _expect_dict(self.http.get_json(path, doc_scoped=True), path)

    def iter_columns(self, doc_id: str, table_id: str) -> Iterator[Dict[str, Any]]:
        path = f"/docs/{_quote(doc_id)}/tables/{_quote(table_id)}/columns"
        return self._paginate(path, {"limit": str(COLUMN_LIMIT)}, doc_scoped=True, max_pages=MAX_COLUMN_PAGES)

    def iter_rows(self, doc_id: str, table_id: str, limit: int = ROW_LIMIT,
                  expected: Any = None) -> Iterator[Dict[str, Any]]:
        """Rows keyed by column id; without useColumnNames, which breaks on renames and duplicates.

        `expected` is the table's rowCount, which bounds the listing."""
        path = f"/docs/{_quote(doc_id)}/tables/{_quote(table_id)}/rows"
        params = {"limit": str(limit), "valueFormat": "simpleWithArrays"}
        # At the full page size a 504 means "too big to build in time": the caller goes smaller.
        return self._paginate(path, params, doc_scoped=True, final=(504,) if limit > SMALL_ROW_LIMIT else (),
                              max_pages=MAX_ROW_PAGES, expected=expected, unique=False)

    def iter_formulas(self, doc_id: str) -> Iterator[Dict[str, Any]]:
        return self._paginate(f"/docs/{_quote(doc_id)}/formulas", {"limit": str(LIST_LIMIT)}, doc_scoped=True)

    def iter_controls(self, doc_id: str) -> Iterator[Dict[str, Any]]:
        return self._paginate(f"/docs/{_quote(doc_id)}/controls", {"limit": str(LIST_LIMIT)}, doc_scoped=True)

    def get_item(self, doc_id: str, kind: str, item_id: str) -> Dict[str, Any]:
        """One formula or control with its value (the lists give names only)."""
        path = f"/docs/{_quote(doc_id)}/{kind}/{_quote(item_id)}"
        return _expect_dict(self.http.get_json(path, doc_scoped=True), path)

    def sharing(self, doc_id: str) -> Dict[str, Any]:
        """Permissions, ACL settings and metadata of a doc; owners only (others get 403)."""
        base = f"/docs/{_quote(doc_id)}/acl"
        permissions = list_all(self._paginate(f"{base}/permissions", {"limit": str(LIST_LIMIT)}))
        return {
            "permissions": permissions,
            "settings": self.http.get_json(f"{base}/settings"),
            "metadata": self.http.get_json(f"{base}/metadata"),
        }

    def start_export(self, doc_id: str, page_id: str, output_format: str, deadline: Optional[float] = None,
                     claimed: bool = False) -> str:
        path = f"/docs/{_quote(doc_id)}/pages/{_quote(page_id)}/export"
        answer = _expect_dict(self.http.post_json(path, {"outputFormat": output_format}, doc_scoped=True,
                                                  deadline=deadline, claimed=claimed), path)
        request_id = answer.get("id")
        if not isinstance(request_id, str) or not request_id:
            raise MalformedAnswer("export answer has no request id", path)
        return request_id

    def export_status(self, doc_id: str, page_id: str, request_id: str,
                      deadline: Optional[float] = None) -> Dict[str, Any]:
        path = f"/docs/{_quote(doc_id)}/pages/{_quote(page_id)}/export/{_quote(request_id)}"
        return _expect_dict(self.http.get_json(path, doc_scoped=True, deadline=deadline), path)

    def download(self, url: str, deadline: Optional[float] = None) -> bytes:
        return self.http.download(url, deadline)

    def _paginate(self, path: str, params: Dict[str, str], *, category: str = "read", doc_scoped: bool = False,
                  final: Tuple[int, ...] = (), max_pages: int = MAX_LIST_PAGES, expected: Any = None,
                  unique: bool = True) -> Iterator[Dict[str, Any]]:
        """Yield every item of a list endpoint, following nextPageToken.

        The listing ends with ListingIncomplete, after the good items, when a page token
        repeats, a page has no `items` list, items lack an id, more items come than the count
        the API gave (`expected`, with slack) allows, more than `max_pages` pages come, or
        MAX_STALE_PAGES pages in a row bring nothing new. With `unique`, an id seen on an
        earlier page is skipped with a warning: a list that shifted between two requests must
        not back one object up twice. (Rows are not checked: that would hold every row id in
        memory; their rowCount bounds them.)
        """
        seen_tokens = set()
        seen_ids: set[str] = set()
        repeated: List[str] = []
        query = dict(params)
        problems: List[str] = []
        most = listing_bound(expected)
        count = stale = 0
        for _ in range(max_pages):
            page = _expect_dict(self.http.get_json(path, query, category=category, doc_scoped=doc_scoped, final=final),
                                path)
            items = page.get("items")
            if not isinstance(items, list):
                raise ListingIncomplete(f"{path}: answer has no items list")
            fresh = 0
            over = False
            for item in items:
                if not (isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"]):
                    problems.append("an item without an id was skipped")
                elif unique and item["id"] in seen_ids:
                    repeated.append(item["id"])
                elif most is not None and count >= most:
                    over = True
                    break
                else:
                    if unique:
                        seen_ids.add(item["id"])
                    count += 1
                    fresh += 1
                    yield item
            if over:
                problems.append(f"more than {most} items where the API counts {expected}; stopped paging")
                break
            stale = 0 if fresh else stale + 1
            token = page.get("nextPageToken")
            if token is None or token == "":
                break
            if not isinstance(token, str):
                problems.append("the answer has a page token that is not text; stopped paging")
                break
            if token in seen_tokens:
                problems.append("the server repeated a page token; stopped paging")
                break
            if stale >= MAX_STALE_PAGES:
                problems.append(f"{stale} pages in a row brought nothing new; stopped paging")
                break
            seen_tokens.add(token)
            query = {"pageToken": token}
        else:
            problems.append(f"stopped after {max_pages} pages")
        if repeated:
            shown = ", ".join(printable(item) for item in sorted(set(repeated))[:5])
            self.warn(f"{path}: {len(repeated)} item(s) came more than once in the listing ({shown}); "
                      "each is kept once")
        if problems:
            raise ListingIncomplete(f"{path}: " + "; ".join(sorted(set(problems))))


def listing_bound(expected: Any) -> Optional[int]:
    """The most items a listing may bring when the API said it holds `expected` (None: no count).

    Generous, since rows and pages come and go while a run reads them.
    """
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        return None
    return expected * LIST_SLACK_FACTOR + LIST_SLACK_ITEMS


def doc_size(doc: Dict[str, Any], key: str) -> Any:
    """One of a doc's docSize counts (pageCount, tableAndViewCount), or None."""
    size = doc.get("docSize")
    return size.get(key) if isinstance(size, dict) else None


def _expect_dict(value: Any, path: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedAnswer("answer is not a JSON object", path)
    return value


def read_all(items: Iterator[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], Optional[BackupError]]:
    """Drain a listing; return what was read and the error that ended it early, if any."""
    collected: List[Dict[str, Any]] = []
    try:
        for item in items:
            collected.append(item)
    except (ApiError, ListingIncomplete) as exc:
        return collected, exc
    return collected, None


def list_all(items: Iterator[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Drain a listing that is useless when partial; its error is raised."""
    collected, problem = read_all(items)
    if problem is not None:
        raise problem
    return collected


# --- Names and paths ----------------------------------------------------------


def safe_component(text: Any, max_chars: int = MAX_COMPONENT_CHARS, max_bytes: int = MAX_COMPONENT_BYTES) -> str:
    """One file or folder name that is valid on Windows, macOS and Linux.

    Forbidden and control characters become "_", Unicode is kept (NFC),
    trailing dots and spaces go (Windows strips them silently), device names
    such as CON or com1.txt get a "_" prefix, and the result is bounded in
    characters and in UTF-8 bytes. Never empty, never "." or "..".
    """
    name = unicodedata.normalize("NFC", str(text))
    name = "".join("_" if ch in FORBIDDEN_CHARS or ord(ch) < 32 or ord(ch) == 127 else ch for ch in name)
    # Leading dots would hide the file (and could meet our ".tmp-" names); trailing ones Windows drops.
    name = _truncate(name.strip().lstrip("."), max_chars, max_bytes).rstrip(". ")
    if not name:
        return "_"
    if name.split(".")[0].strip().upper() in RESERVED_NAMES:
        name = _truncate("_" + name, max_chars, max_bytes)
    return name


def _truncate(text: str, max_chars: int, max_bytes: int) -> str:
    text = text[:max_chars]
    while len(text.encode("utf-8")) > max_bytes:
        text = text[:-1]
    return text


def object_stem(name: Any, object_id: Any) -> str:
    """`<Name>__<id>`, short enough that every suffix we add still fits a component.

    The id is immutable and unique, so two objects with the same name never
    share a file, and a name full of forbidden characters is still findable.
    """
    safe_id = safe_component(object_id, MAX_ID_CHARS, MAX_ID_CHARS * 4)
    budget_chars = MAX_COMPONENT_CHARS - len(LONGEST_SUFFIX) - len(safe_id) - 2
    budget_bytes = MAX_COMPONENT_BYTES - len(LONGEST_SUFFIX) - len(safe_id.encode("utf-8")) - 2
    label = safe_component(name or "untitled", budget_chars, budget_bytes)
    return f"{label}__{safe_id}"


class PathAllocator:
    """Hands out snapshot-relative paths that never collide, even case-insensitively.

    Ids differ only in case on case-insensitive file systems (Windows, macOS),
    and a hostile API could repeat an id; the second claimant gets `__2`.
    """

    def __init__(self) -> None:
        self._taken: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, wanted: PurePosixPath) -> PurePosixPath:
        with self._lock:
            candidate = wanted
            number = 2
            while str(candidate).casefold() in self._taken:
                candidate = wanted.with_name(f"{wanted.name}__{number}")
                number += 1
            self._taken.add(str(candidate).casefold())
            return candidate


def doc_folder(doc: Dict[str, Any]) -> PurePosixPath:
    return PurePosixPath("docs", object_stem(doc.get("name"), doc["id"]))


def page_stems(pages: List[Dict[str, Any]]) -> Dict[str, PurePosixPath]:
    """Map page id -> `pages/<Ancestor>__<id>/.../<Name>__<id>` (no suffix).

    A child page lives in a folder named like its parent's file, to any
    depth. A parent that is missing from the list, or a cycle, makes the page
    top-level rather than looping.
    """
    by_id = {page["id"]: page for page in pages}
    stems: Dict[str, PurePosixPath] = {}
    for page in pages:
        chain = [object_stem(page.get("name"), page["id"])]
        seen = {page["id"]}
        parent_id = _ref_id(page.get("parent"))
        while parent_id in by_id and parent_id not in seen:
            seen.add(parent_id)
            parent = by_id[parent_id]
            chain.append(object_stem(parent.get("name"), parent_id))
            parent_id = _ref_id(parent.get("parent"))
        stems[page["id"]] = PurePosixPath("pages", *reversed(chain))
    return stems


def table_stem(table: Dict[str, Any]) -> PurePosixPath:
    """`tables/<table|view>/<Parent Page>__<Name>__<id>` (no suffix)."""
    kind = "view" if table.get("tableType") == "view" else "table"
    parent_name = _ref_name(table.get("parent"))
    label = f"{parent_name}__{table.get('name') or 'untitled'}" if parent_name else table.get("name")
    return PurePosixPath("tables", kind, object_stem(label, table["id"]))


def _ref_id(ref: Any) -> Optional[str]:
    return ref.get("id") if isinstance(ref, dict) and isinstance(ref.get("id"), str) else None


def _ref_name(ref: Any) -> str:
    return str(ref.get("name") or "") if isinstance(ref, dict) else ""


def printable(text: Any) -> str:
    """A name from the API made safe for a terminal or log line (no escape sequences)."""
    return "".join("?" if unicodedata.category(ch) in ("Cc", "Cf") else ch for ch in str(text))


def inside(root: Path, relative: PurePosixPath) -> Path:
    """Join a relative path under root, refusing anything that would leave it."""
    if relative.is_absolute() or any(part in ("", ".", "..") or "\\" in part or ":" in part
                                     for part in relative.parts):
        raise BackupError(f"refusing unsafe path {str(relative)!r}")
    return root.joinpath(*relative.parts)


# --- Writers ------------------------------------------------------------------


def make_private_dir(path: Path) -> None:
    """mkdir -p where every folder it creates is 0700: backups hold private data.

    Path.mkdir(parents=True) would give the intermediate folders default modes.
    """
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)


@contextlib.contextmanager
def atomic_file(path: Path, settle: Optional[Callable[[str], bool]] = None) -> Iterator[IO[bytes]]:
    """Write to a temp file in the same folder, fsync, then rename into place.

    A reader sees the old file or the complete new one, never half of it; on
    any error (or cancellation) the temp file is removed. mkstemp makes the
    file 0600 on POSIX. `settle(temp name)` runs before the rename; when it
    returns True it has put the target in place itself (a hard link to an
    identical file) and the temp file is dropped.
    """
    make_private_dir(path.parent)
    fd, temp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if settle is not None and settle(temp_name):
            make_writable(temp_name)
            os.unlink(temp_name)
        else:
            replace_file(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            make_writable(temp_name)
            os.unlink(temp_name)
        raise


class HashingWriter(io.BufferedIOBase):
    """A write-only stream that hashes what passes through it, so a saved file's size and
    sha256 for the manifest come for free instead of from reading the file back."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self._raw = raw
        self._digest = hashlib.sha256()
        self.size = 0

    @property
    def name(self) -> Any:
        return self._raw.name

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._digest.update(view)
        self._raw.write(view)
        self.size += view.nbytes
        return view.nbytes

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def record(self, relative: PurePosixPath, role: str) -> FileRecord:
        return FileRecord(str(relative), self.size, self.sha256, role)


# Given the size and sha256 of a file just written, an earlier identical file to hard-link instead.
Twin = Callable[[int, str], Optional[Path]]


@contextlib.contextmanager
def content_file(path: Path, twin: Optional[Twin] = None) -> Iterator[HashingWriter]:
    """atomic_file for a snapshot's content: hashed while written, read-only (0400) before it
    gets its name, and replaced by a hard link when `twin` finds an identical earlier file
    (a re-read that changed nothing costs no disk)."""
    writer: Optional[HashingWriter] = None

    def settle(temp_name: str) -> bool:
        os.chmod(temp_name, READ_ONLY_MODE)
        same = twin(writer.size, writer.sha256) if twin is not None and writer is not None else None
        if same is not None and hard_link(same, path):
            return True
        make_writable(path)  # a page rewritten with its asset links: Windows cannot replace a read-only file
        return False

    with atomic_file(path, settle) as raw:
        writer = HashingWriter(raw)
        yield writer


def replace_file(source: str, target: Path) -> None:
    """os.replace, a few times more on Windows, where a virus scanner or a reader holding the
    target open makes it fail for a moment."""
    for attempt in range(6 if os.name == "nt" else 1):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if os.name != "nt" or attempt == 5:
                raise
            time.sleep(0.05 * 2 ** attempt)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as handle:
        handle.write(data)


def json_bytes(value: Any) -> bytes:
    return (json.dumps(value, ensure_ascii=False, indent=2, sort_keys=False) + "\n").encode("utf-8")


def write_json_atomic(path: Path, value: Any) -> None:
    write_bytes_atomic(path, json_bytes(value))


def hash_file(path: Path) -> Tuple[int, str]:
    """Size and sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def file_record(root: Path, relative: PurePosixPath) -> Dict[str, Any]:
    """Path, size and sha256 of a file on disk, for --verify."""
    size, sha256 = hash_file(inside(root, relative))
    return {"path": str(relative), "size": size, "sha256": sha256}


def file_matches(path: Path, record: Dict[str, Any]) -> bool:
    """Whether a file still holds what its manifest record says: size first (cheap), then sha256."""
    try:
        if path.stat().st_size != record.get("size"):
            return False
        return hash_file(path) == (record.get("size"), record.get("sha256"))
    except OSError:
        return False


def with_suffix(stem: PurePosixPath, suffix: str) -> PurePosixPath:
    """Append a suffix; Path.with_suffix would eat the part after a dot in a name."""
    return stem.with_name(stem.name + suffix)


def csv_header(columns: List[Dict[str, Any]]) -> List[str]:
    """Meta columns, then column names in API order, duplicates as `Name__2`, `Name__3`."""
    header: List[str] = []
    used: set[str] = set()
    for name in CSV_META_HEADER + [str(column.get("name") or column.get("id")) for column in columns]:
        candidate, number = name, 2
        while candidate in used:
            candidate = f"{name}__{number}"
            number += 1
        used.add(candidate)
        header.append(candidate)
    return header


def csv_cell(value: Any) -> str:
    """Encode one value: null empty, true/false, numbers and containers as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def csv_line(cells: List[str]) -> str:
    """One RFC 4180 line: a cell holding a comma, quote, CR, LF or NUL is quoted, quotes doubled.

    Written by hand because the csv module cannot write NUL at all on Python 3.10 and quotes it
    differently on 3.9 and 3.11; this way every Python writes the same bytes.
    """
    return ",".join(f'"{cell.replace(chr(34), chr(34) * 2)}"' if CSV_NEEDS_QUOTES.search(cell) else cell
                    for cell in cells) + "\r\n"


def csv_record(row: Dict[str, Any], column_ids: List[str]) -> List[str]:
    values = row.get("values")
    if not isinstance(values, dict):
        raise MalformedAnswer(f"row {row.get('id')!r} has values that are not an object")
    meta = [row.get("id"), row.get("name"), row.get("index"), row.get("createdAt"),
            row.get("updatedAt"), row.get("browserLink")]
    return [csv_cell(value) for value in meta] + [csv_cell(values.get(column_id)) for column_id in column_ids]


def write_rows_csv(path: Path, columns: List[Dict[str, Any]], rows: Iterator[Dict[str, Any]],
                   ndjson_path: Optional[Path] = None, like: "Optional[SavedCopy]" = None,
                   written: Optional[List[HashingWriter]] = None, bom: bool = False
                   ) -> Tuple[int, Optional[BackupError]]:
    """Stream rows into a CSV file (and, if asked, NDJSON), one page of results at a time.

    Memory stays flat whatever the table size. A listing that ends early
    (ListingIncomplete) keeps the rows read and returns the error; an API
    failure discards the temp files and raises. A file identical to `like`'s
    becomes a hard link of it; `written` receives the files' hashing writers
    (size and sha256).
    `bom` starts the CSV with a UTF-8 byte order mark, which Excel on Windows
    needs to read UTF-8.
    """
    column_ids = [str(column.get("id")) for column in columns]
    count = 0
    problem: Optional[BackupError] = None
    with contextlib.ExitStack() as files:
        csv_out = files.enter_context(content_file(path, twin_of(like, "csv")))
        text = io.TextIOWrapper(csv_out, encoding="utf-8", newline="")
        files.callback(text.detach)  # flushes; the raw file stays open for atomic_file to fsync
        ndjson = files.enter_context(content_file(ndjson_path, twin_of(like, "rows"))) \
            if ndjson_path is not None else None
        text.write(("\ufeff" if bom else "") + csv_line(csv_header(columns)))
        try:
            for row in rows:
                text.write(csv_line(csv_record(row, column_ids)))
                if ndjson is not None:
                    ndjson.write(ndjson_line(row))
                count += 1
        except ListingIncomplete as exc:
            problem = exc
    if written is not None:
        written.extend([csv_out] + ([ndjson] if ndjson is not None else []))
    return count, problem


def ndjson_line(row: Dict[str, Any]) -> bytes:
    """One row as a JSON line, values keyed by column id, for a lossless copy beside the CSV."""
    record = {key: row.get(key) for key in ("id", "name", "index", "createdAt", "updatedAt", "browserLink")}
    record["values"] = row.get("values") if isinstance(row.get("values"), dict) else {}
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def hard_link(source: Path, target: Path) -> bool:
    """Hard-link an earlier snapshot's file; False where links fail (FAT, another drive).

    Files saved before snapshots became read-only are made 0400 on the way (the inode is
    shared, so every snapshot holding it gains the protection).
    """
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:
        return False
    if os.name == "posix":
        with contextlib.suppress(OSError):
            if target.stat().st_mode & 0o777 != READ_ONLY_MODE:
                os.chmod(target, READ_ONLY_MODE)
    return True


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link an unchanged file into the new snapshot; copy where links fail."""
    make_private_dir(target.parent)
    if not hard_link(source, target):
        with content_file(target) as handle, open(source, "rb") as original:
            shutil.copyfileobj(original, handle)
        original_times = os.stat(source)
        os.utime(target, ns=(original_times.st_atime_ns, original_times.st_mtime_ns))


def coda_mtime(updated_at: Any) -> Optional[float]:
    """Coda's `updatedAt` (ISO 8601, e.g. 2026-03-07T10:15:30.123Z) as a POSIX time, or None.

    None for text that is not such a time, and for times a ZIP archive cannot hold
    (before 1980 or from 2108 on), so that a strange value never breaks --zip.
    """
    if not isinstance(updated_at, str):
        return None
    text = updated_at.strip()
    text = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    if not 1980 <= moment.astimezone(dt.timezone.utc).year <= 2107:
        return None
    return moment.timestamp()


def stamp_with_coda_time(path: Path, updated_at: Any) -> None:
    """Give a saved page or table file its object's updatedAt as mtime, so `ls -lt` and file
    managers show what was edited recently in Coda. A time that cannot be read leaves the file's
    own time, and so does a file that turned out identical to an earlier snapshot's and became a
    hard link of it: it keeps that copy's time, as earlier snapshots are never touched."""
    when = coda_mtime(updated_at)
    if when is not None and os.stat(path).st_nlink == 1:
        os.utime(path, (when, when))


def make_writable(path: Any) -> None:
    """Windows refuses to delete a read-only file; POSIX asks only the folder, so this is a no-op there."""
    if os.name == "nt":
        with contextlib.suppress(OSError):
            os.chmod(path, stat.S_IWRITE | stat.S_IREAD)


def remove_tree(folder: Path) -> None:
    """shutil.rmtree that also deletes read-only snapshot files on Windows (clears the attribute
    and tries again); on POSIX a 0400 file in a 0700 folder is deleted as it is."""
    def retry(function: Callable[..., Any], path: str, *_: Any) -> None:
        make_writable(path)
        function(path)

    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=retry)
    else:
        shutil.rmtree(folder, onerror=retry)


# --- Previous snapshots and reuse ---------------------------------------------

# Why an object is reused or fetched again: the manifest's `reason` and what --dry-run prints.
REASON_UNCHANGED = "unchanged"
REASON_DOC_UNCHANGED = "doc unchanged"
REASON_RETRY_FAILED = "saved before (--retry-failed)"
REASON_NO_COPY = "no saved copy"
REASON_CHANGED = "changed"
REASON_FILES = "other files asked for"
REASON_FLAGS = "other flags"
REASON_PARTIAL = "not all of it saved"
REASON_TABLES = "a table on it changed"
REASON_BASE = "base table changed"
REASON_FORMULAS = "calculated columns, doc changed"
REASON_MAX_AGE = "older than --max-age"
REASON_DAMAGED = "saved copy damaged"
REASON_ASSETS = "assets not all saved"


@dataclass(frozen=True)
class SavedCopy:
    """One object as an earlier snapshot saved it, with the facts reuse compares, all taken
    from that same snapshot (a page is only as current as the tables it showed then)."""

    snapshot: Path
    entry: Dict[str, Any]  # its manifest entry
    fetched_at: Optional[dt.datetime]  # when its bytes were downloaded; None = unknown (too old)
    doc_updated: Any = None  # the doc's updatedAt in that snapshot
    base_updated: Any = None  # a view's base table's updatedAt in that snapshot
    hosted: Dict[str, Optional[str]] = field(default_factory=dict)  # a page's tables: id -> CSV sha256
    whole: bool = False  # a doc: its run finished and every page and table of it was saved
    layout: Any = None  # a doc or table: the file choices of that run (Options.layout_key)

    def path_of(self, record: Dict[str, Any]) -> Path:
        return inside(self.snapshot, PurePosixPath(record["path"]))

    def roles(self) -> set[str]:
        return {record["role"] for record in self.entry["files"]}

    def all_files(self) -> List[Tuple[Path, Dict[str, Any]]]:
        """A doc's own files and those of its pages and tables (assets included); any other
        object's files."""
        children = self.entry.get("pages", []) + self.entry.get("tables", [])
        records = {record["path"]: record for item in [self.entry] + children
                   for record in item["files"] + item.get("assets", [])}  # a doc's pages share assets
        return [(self.path_of(record), record) for record in records.values()]


@dataclass(frozen=True)
class Decision:
    """Reuse `source` (link its files), or fetch; `source` is then the copy that identical new
    files are linked to. `reason` is one of the REASON_ strings."""

    reuse: bool
    reason: str
    source: Optional[SavedCopy] = None


@dataclass(frozen=True)
class ReusePolicy:
    """Whether an object may be linked from an earlier snapshot: pure, so that the run and
    --dry-run decide alike and every rule has a table-driven test.

    The rules, in the order they are asked (README "Incremental runs" lists them): a saved
    copy exists (ok/unchanged, files present); it has the files this run wants; the
    object's updatedAt did not move; a page's tables are byte for byte what the saved page
    showed; a view's base table did not move; a table with calculated columns is re-read
    when its doc moved (Coda's updatedAt ignores formula results); nothing is older than
    --max-age. --retry-failed reuses whatever was saved.
    """

    now: dt.datetime
    max_age_days: float = DEFAULT_MAX_AGE_DAYS
    retry_failed: bool = False
    page_formats: Tuple[str, ...] = (DEFAULT_PAGE_FORMAT,)
    rows_json: bool = False
    layout: Dict[str, Any] = field(default_factory=dict)
    csv_bom: bool = False

    @classmethod
    def for_run(cls, options: Options, now: dt.datetime) -> "ReusePolicy":
        return cls(now=now, max_age_days=options.max_age_days, retry_failed=options.retry_failed,
                   page_formats=options.page_formats, rows_json=options.rows_json, layout=options.layout_key(),
                   csv_bom=options.csv_bom)

    def doc(self, doc: Dict[str, Any], saved: Optional[SavedCopy]) -> Decision:
        """Link a whole doc (no request at all) or list it again and decide object by object."""
        if saved is None:
            return Decision(False, REASON_NO_COPY)
        if not saved.whole:
            return Decision(False, REASON_PARTIAL, saved)
        if saved.layout != self.layout:
            return Decision(False, REASON_FLAGS, saved)
        moved = self._moved(doc, saved)
        if moved is not None:
            return moved
        if self._too_old(saved):
            return Decision(False, REASON_MAX_AGE, saved)
        return Decision(True, REASON_DOC_UNCHANGED, saved)

    def page(self, page: Dict[str, Any], saved: Optional[SavedCopy],
             hosted: Callable[[], Dict[str, Optional[str]]]) -> Decision:
        """`hosted()`: this run's CSV sha256 of each table and view shown on the page (None: failed,
        or not known yet in a dry run); asked last, as it waits for those tables."""
        if saved is None:
            return Decision(False, REASON_NO_COPY)
        if saved.roles() != set(self.page_formats):
            return Decision(False, REASON_FILES, saved)
        moved = self._moved(page, saved)
        if moved is not None:
            return moved
        if self._too_old(saved):
            return Decision(False, REASON_MAX_AGE, saved)
        now_shown = hosted()
        if now_shown != saved.hosted or None in now_shown.values():
            return Decision(False, REASON_TABLES, saved)
        return Decision(True, REASON_UNCHANGED, saved)

    def table(self, table: Dict[str, Any], saved: Optional[SavedCopy], doc_updated: Any,
              base_updated: Callable[[], Any]) -> Decision:
        """`table`: GET /tables/{id}. `doc_updated`: the doc's updatedAt now. `base_updated()`: a
        view's base table's updatedAt now (one more read, so asked last and only for views)."""
        if saved is None:
            return Decision(False, REASON_NO_COPY)
        wanted = {"table", "columns", "csv"} | ({"rows"} if self.rows_json else set())
        if saved.roles() != wanted:
            return Decision(False, REASON_FILES, saved)
        if (isinstance(saved.layout, dict) and saved.layout.get("csv_bom") is True) != self.csv_bom:
            return Decision(False, REASON_FLAGS, saved)  # the CSV's first bytes differ
        moved = self._moved(table, saved)
        if moved is not None:
            return moved
        calculated = saved.entry.get("calculatedColumns")
        if (calculated is None or calculated > 0) and doc_updated != saved.doc_updated:
            return Decision(False, REASON_FORMULAS, saved)
        if self._too_old(saved):
            return Decision(False, REASON_MAX_AGE, saved)
        if _ref_id(table.get("parentTable")) is not None:
            now_base = base_updated()
            if not now_base or now_base != saved.base_updated:
                return Decision(False, REASON_BASE, saved)
        return Decision(True, REASON_UNCHANGED, saved)

    def _moved(self, item: Dict[str, Any], saved: SavedCopy) -> Optional[Decision]:
        """The step every kind shares once its files fit: --retry-failed reuses whatever was
        saved; otherwise an object whose updatedAt moved (or has none) is fetched."""
        if self.retry_failed:
            return Decision(True, REASON_RETRY_FAILED, saved)
        if not item.get("updatedAt") or item.get("updatedAt") != saved.entry.get("updatedAt"):
            return Decision(False, REASON_CHANGED, saved)
        return None

    def _too_old(self, saved: SavedCopy) -> bool:
        if saved.fetched_at is None or self.max_age_days <= 0:
            return True
        return self.now - saved.fetched_at > refresh_age(self.max_age_days, saved.entry.get("id"), saved.fetched_at)


def refresh_age(max_age_days: float, object_id: Any, fetched_at: dt.datetime) -> dt.timedelta:
    """How old this copy may grow before it is downloaded again: a stable point between
    (1 - MAX_AGE_SPREAD) and 1 times --max-age, drawn from the object's id and download time,
    so the objects of one full run do not all fall due on the same night (and a new draw
    follows every download)."""
    seed = hashlib.sha256(f"{object_id}|{iso(fetched_at)}".encode()).digest()
    fraction = int.from_bytes(seed[:8], "big") / 2 ** 64
    return dt.timedelta(days=max_age_days * (1 - MAX_AGE_SPREAD * fraction))


def intact(files: List[Tuple[Path, Dict[str, Any]]]) -> bool:
    """Every file still holds the bytes its manifest recorded (read and hashed in full)."""
    for path, record in files:
        if not file_matches(path, record):
            LOG.warning("%s no longer matches its manifest (size or sha256); not linking it", path)
            return False
    return True


def csv_sha256(entry: Dict[str, Any]) -> Optional[str]:
    """The sha256 of a saved table's rows, or None unless it was saved (ok or unchanged)."""
    if entry.get("status") not in REUSABLE_STATUSES:
        return None
    return next((record["sha256"] for record in entry["files"] if record["role"] == "csv"), None)


def twin_of(source: Optional[SavedCopy], role: str) -> Optional[Twin]:
    """Finds the earlier file of this role when a new file turns out byte-identical to it."""
    record = next((r for r in source.entry["files"] if r["role"] == role), None) if source else None
    if source is None or record is None:
        return None

    def twin(size: int, sha256: str) -> Optional[Path]:
        if (size, sha256) != (record["size"], record["sha256"]):
            return None
        path = source.path_of(record)
        return path if file_matches(path, record) else None

    return twin


def parse_time(value: Any) -> Optional[dt.datetime]:
    try:
        return dt.datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


class Journal:
    """`manifest.partial.jsonl` in a running snapshot: one JSON line per doc, page and table as
    it is saved, so a run killed outright (kill -9, Task Scheduler's End, a power cut), which
    never writes manifest.json, can still be resumed. Lines are appended whole under a lock; a
    line cut short by the kill is skipped when read. Removed once manifest.json is written.
    Best effort: a journal that cannot be written is a debug line, not a failure.
    """

    def __init__(self, path: Optional[Path] = None) -> None:
        self._fd: Optional[int] = None
        self._path = path
        self._lock = threading.Lock()

    @classmethod
    def start(cls, snapshot: Path, options_record: Dict[str, Any], started: dt.datetime) -> "Journal":
        journal = cls(snapshot / JOURNAL_NAME)
        with contextlib.suppress(OSError):
            journal._fd = os.open(snapshot / JOURNAL_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        journal._write({"version": MANIFEST_VERSION, "started_at": iso(started), "options": options_record})
        return journal

    def doc(self, entry: DocEntry) -> None:
        record = entry.as_json()
        self._write({"doc": {key: record.get(key) for key in ("id", "name", "path", "updatedAt", "fetchedAt")}})

    def saved(self, doc_id: str, kind: str, entry: Union[PageEntry, TableEntry]) -> None:
        """A page or table that ended saved (ok or unchanged); anything else is not worth a line."""
        if entry.status in REUSABLE_STATUSES:  # as_json copies at once (the asset finisher may still add to it)
            self._write({"docId": doc_id, "kind": kind, "entry": entry.as_json()})

    def close(self, remove: bool) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if remove and self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()

    def _write(self, record: Dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            if self._fd is None:
                return
            try:
                os.write(self._fd, line)
            except OSError as exc:
                LOG.debug("cannot write %s (%s); a killed run could not be resumed", JOURNAL_NAME, exc)


def journal_manifest(folder: Path) -> Dict[str, Any]:
    """A manifest rebuilt from the journal of a run that never wrote manifest.json: its docs
    are `partial` (never linked whole), their saved pages and tables usable one by one."""
    lines = (folder / JOURNAL_NAME).read_bytes().splitlines()
    header = json.loads(lines[0]) if lines else None
    if not isinstance(header, dict):
        raise ValueError(f"{JOURNAL_NAME} without a header")
    docs: Dict[str, Dict[str, Any]] = {}
    for line in lines[1:]:
        try:
            item = json.loads(line)
        except ValueError:
            continue  # the line the kill cut short
        if isinstance(item, dict) and isinstance(item.get("doc"), dict):
            docs.setdefault(str(item["doc"].get("id")), dict(item["doc"], status="partial", files=[],
                                                              pages=[], tables=[]))
        elif isinstance(item, dict) and item.get("kind") in ("page", "table") and item.get("docId") in docs:
            docs[item["docId"]][item["kind"] + "s"].append(item["entry"])
    return {"version": header.get("version"), "status": "abandoned", "started_at": header.get("started_at"),
            "options": header.get("options"), "docs": list(docs.values())}


class SnapshotIndex:
    """For every doc, page and table: the newest earlier snapshot that holds it intact
    (status ok or unchanged, every file there with its recorded size), whatever that
    run's status: a cancelled or failed run is resumed, not thrown away.

    Manifests are read newest first and an object found is not looked for further back,
    so memory holds one entry per object. Reading stops after a `completed` snapshot that
    backed up the same docs as this run (nothing older can add to it). A manifest that
    cannot be read is skipped with a warning. Pages and tables are keyed by (doc id, id):
    ids are unique only within a doc, and a copy of a doc may keep them.
    """

    def __init__(self) -> None:
        self.docs: Dict[str, SavedCopy] = {}
        self.pages: Dict[Tuple[str, str], SavedCopy] = {}
        self.tables: Dict[Tuple[str, str], SavedCopy] = {}

    @classmethod
    def load(cls, output: Path, options: Options, current: Optional[Path] = None,
             warn: Callable[[str], None] = LOG.warning) -> "SnapshotIndex":
        """All snapshots in `output` but `current`; --retry-failed: only `latest`."""
        index = cls()
        if options.retry_failed:
            latest = read_latest(output)
            folders = [latest] if latest is not None else []
        else:
            folders = [folder for folder in reversed(snapshot_folders(output)) if folder != current]
        if not folders:
            warn(f"no previous snapshot in {output}; making a full backup")
        selection = selection_key(options)
        for folder in folders:
            try:
                manifest = read_manifest(folder)
            except (OSError, ValueError, KeyError, TypeError, AttributeError, BackupError) as exc:
                if read_summary(folder).get("status") == "abandoned":
                    LOG.info("snapshot %s was abandoned without a manifest; nothing to reuse there", folder.name)
                else:
                    warn(f"cannot use the manifest of {folder.name} ({exc}); its files are not reused")
                continue
            index.add(folder, manifest)
            options_then = manifest["options"]
            if manifest.get("status") == "completed" and selection_key_of(options_then) == selection:
                break
        return index

    def add(self, folder: Path, manifest: Dict[str, Any]) -> None:
        started = parse_time(manifest.get("started_at"))
        finished = manifest.get("status") in FINISHED_STATUSES
        layout = manifest["options"].get("layout")
        for doc in manifest["docs"]:
            doc_id, doc_updated = doc["id"], doc.get("updatedAt")
            hosted: Dict[str, Dict[str, Optional[str]]] = {}
            updated: Dict[str, Any] = {}
            for table in doc["tables"]:
                hosted.setdefault(table.get("parentPageId") or "", {})[table["id"]] = csv_sha256(table)
                updated[table["id"]] = table.get("updatedAt")
            for page in doc["pages"]:
                if (doc_id, page["id"]) not in self.pages and self._saved(folder, page):
                    self.pages[(doc_id, page["id"])] = SavedCopy(
                        folder, page, fetched_time(page, started), doc_updated, hosted=hosted.get(page["id"], {}))
            for table in doc["tables"]:
                if (doc_id, table["id"]) not in self.tables and self._saved(folder, table):
                    self.tables[(doc_id, table["id"])] = SavedCopy(
                        folder, table, fetched_time(table, started), doc_updated,
                        base_updated=updated.get(table.get("parentTableId") or ""), layout=layout)
            known = self.docs.get(doc_id)
            if known is None or not known.whole:
                copy = self._doc_copy(folder, doc, started, finished, layout)
                if copy is not None and (known is None or copy.whole):
                    self.docs[doc_id] = copy

    def _doc_copy(self, folder: Path, doc: Dict[str, Any], started: Optional[dt.datetime], finished: bool,
                  layout: Any) -> Optional[SavedCopy]:
        if not self._saved(folder, doc):
            return None
        children = doc["pages"] + doc["tables"]
        whole = finished and all(child["status"] in REUSABLE_STATUSES + ("skipped",) for child in children) \
            and all(self._saved(folder, child) for child in children if child["status"] != "skipped") \
            and all(assets_intact(folder, child) for child in children)
        times = [fetched_time(item, started) for item in [doc] + children if item["status"] != "skipped"]
        oldest = None if None in times else min(time for time in times if time is not None)
        return SavedCopy(folder, doc, oldest, doc.get("updatedAt"), whole=whole, layout=layout)

    @staticmethod
    def _saved(folder: Path, entry: Dict[str, Any]) -> bool:
        if entry.get("status") not in REUSABLE_STATUSES:
            return False
        for record in entry["files"]:
            try:
                if inside(folder, PurePosixPath(record["path"])).stat().st_size != record["size"]:
                    return False
            except OSError:
                return False
        return True


def fetched_time(entry: Dict[str, Any], started: Optional[dt.datetime]) -> Optional[dt.datetime]:
    """When an entry's bytes were downloaded. Manifests older than `fetchedAt` did not say: an
    `ok` entry was downloaded by that run (its start is a safe, earlier bound); for a linked
    (`unchanged`) one nobody knows, so it counts as older than any --max-age."""
    if "fetchedAt" in entry:
        return parse_time(entry["fetchedAt"])
    return started if entry.get("status") == "ok" else None


def selection_key(options: Options) -> Dict[str, Any]:
    """Which docs a run backs up; a completed run with the same selection holds them all."""
    return {"include_shared": options.include_shared, "workspace_id": options.workspace_id,
            "docs": list(options.docs), "exclude_docs": list(options.exclude_docs)}


def selection_key_of(options: Dict[str, Any]) -> Dict[str, Any]:
    return {"include_shared": options.get("include_shared"), "workspace_id": options.get("workspace_id"),
            "docs": options.get("docs", []), "exclude_docs": options.get("exclude_docs", [])}


def manifest_json(folder: Path) -> Any:
    """A snapshot's manifest.json as JSON, unchecked: each reader checks what it uses. Raises
    OSError or ValueError when it is missing or not JSON."""
    return json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))


def read_manifest(folder: Path) -> Dict[str, Any]:
    """A snapshot's manifest, checked: every field reuse reads has the right type and no path
    leaves the snapshot. Raises ValueError (or OSError) otherwise."""
    if not (folder / MANIFEST_NAME).exists() and (folder / JOURNAL_NAME).exists():
        manifest: Any = journal_manifest(folder)
    else:
        manifest = manifest_json(folder)
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"manifest version {manifest.get('version') if isinstance(manifest, dict) else None!r}")
    if not isinstance(manifest.get("options"), dict) or not isinstance(manifest.get("docs"), list):
        raise ValueError("manifest without options or docs")
    for doc in manifest["docs"]:
        _check_entry(folder, doc, DOC_FILES)
        if not isinstance(doc.get("pages"), list) or not isinstance(doc.get("tables"), list):
            raise ValueError(f"doc {doc['id']!r} without pages or tables")
        for page in doc["pages"]:
            _check_entry(folder, page, PAGE_ROLES)
        for table in doc["tables"]:
            _check_entry(folder, table, TABLE_ROLES)
            for key in ("rowCount", "calculatedColumns"):
                if not isinstance(table.get(key), (int, type(None))) or isinstance(table.get(key), bool):
                    raise ValueError(f"table {table['id']!r} has a {key} that is not a number")
    return manifest


def _check_entry(root: Path, entry: Any, roles: Collection[str]) -> None:
    """Raise ValueError unless a manifest entry has what reuse reads, of the right types,
    and only files of the roles its kind of object has."""
    if not isinstance(entry, dict):
        raise ValueError("manifest entry is not an object")
    for key, kinds in (("id", str), ("status", str), ("path", str), ("updatedAt", (str, type(None))),
                       ("parentPageId", (str, type(None))), ("parentTableId", (str, type(None)))):
        if not isinstance(entry.get(key), kinds):
            raise ValueError(f"manifest entry {entry.get('id')!r}: bad {key}")
    if not isinstance(entry.get("files"), list):
        raise ValueError(f"manifest entry {entry['id']!r}: no files list")
    for record in entry["files"]:
        if not (isinstance(record, dict) and isinstance(record.get("path"), str)
                and isinstance(record.get("size"), int) and not isinstance(record.get("size"), bool)
                and isinstance(record.get("sha256"), str) and record.get("role") in roles):
            raise ValueError(f"manifest entry {entry['id']!r}: bad file record")
        inside(root, PurePosixPath(record["path"]))  # a manifest must not point outside


# --- Exporters ----------------------------------------------------------------

ROLE_SUFFIXES = {
    "markdown": ".md",
    "html": ".html",
    "csv": ".csv",
    "columns": ".columns.json",
    "table": ".table.json",
    "rows": ".rows.ndjson",
}
PAGE_ROLES = ("markdown", "html")
TABLE_ROLES = ("table", "columns", "csv", "rows")
DOC_FILES = {"doc": "doc.json", "pages": "pages.json", "tables": "tables.json",
             "formulas": "formulas.json", "controls": "controls.json", "permissions": "permissions.json"}


class RunRecorder:
    """Counts and failures of one run, shared by the worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Dict[str, int] = {"docs": 0, "pages": 0, "tables": 0, "views": 0, "rows": 0,
                                       "pages_not_exportable": 0, "assets": 0, "asset_bytes": 0}
        self.skipped_unchanged: Dict[str, int] = {"docs": 0, "pages": 0, "tables": 0, "views": 0}
        self.failures: List[Failure] = []
        self.skipped: List[Skipped] = []  # optional items the API refused, assets gone (not failures)
        self.warnings: List[str] = []  # what the log said at WARNING, for summary.json and monitors
        self.queued = 0  # pages and tables handed to the pool, for the progress line
        self.settled = 0  # ... and those that ended, one way or another
        self.listed = Listed()  # what the listings returned (a key per doc, set by its lister): what vanished
        self.vanished: List[Vanished] = []
        self.changes: Optional[Dict[str, Any]] = None  # against the previous snapshot, once the run ends
        self.docs_total: Optional[int] = None  # docs selected, once they are listed

    def expect_docs(self, total: int) -> None:
        with self._lock:
            self.docs_total = total

    def queue(self) -> None:
        with self._lock:
            self.queued += 1

    def settle(self) -> None:
        with self._lock:
            self.settled += 1

    def count(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + amount

    def unchanged(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self.skipped_unchanged[key] += amount

    def fail(self, kind: str, error: Union[BaseException, str], *, doc_id: Optional[str] = None,
             object_id: Optional[str] = None, name: Any = None) -> None:
        """Record one failed object (a Failure; `name` as the API gave it, any JSON value); the run
        goes on and ends with exit 1."""
        failure = Failure(kind=kind, doc_id=doc_id, object_id=object_id, name=None if name is None else str(name),
                          error=str(error) or error.__class__.__name__)
        if object_id is None:
            LOG.error("%s: %s", printable(name or kind), printable(failure.error))
        else:
            LOG.error("%s %s (%s) in doc %s failed: %s", kind, printable(object_id), printable(name),
                      printable(doc_id), printable(failure.error))
        with self._lock:
            self.failures.append(failure)

    def warn(self, text: str) -> None:
        """A warning for the log and for summary.json `warnings`: a monitor reads the summary, not stderr."""
        LOG.warning("%s", text)
        with self._lock:
            self.warnings.append(printable(text))

    def skip(self, item: Skipped) -> None:
        LOG.info("%s of doc %s skipped: %s", item.kind, item.doc_id, printable(item.reason))
        with self._lock:
            self.skipped.append(item)

    def as_counts(self) -> Dict[str, Any]:
        with self._lock:
            counts: Dict[str, Any] = dict(self.counts)
            counts["skipped_unchanged"] = dict(self.skipped_unchanged)
            counts["failures"] = len(self.failures)
            counts["vanished"] = vanished_counts(self.vanished)
            return counts


@dataclass
class Job:
    """What every exporter of one run shares. `index` is None in a full run: nothing is reused."""

    options: Options
    api: CodaApi
    root: Path
    paths: PathAllocator
    recorder: RunRecorder
    index: Optional[SnapshotIndex]
    policy: ReusePolicy
    assets: "Optional[AssetStore]" = None  # None with --no-assets
    journal: Journal = field(default_factory=Journal)

    def write_json(self, relative: PurePosixPath, value: Any, role: str,
                   like: Optional[SavedCopy] = None) -> FileRecord:
        return self.write_bytes(relative, json_bytes(value), role, like)

    def write_bytes(self, relative: PurePosixPath, data: bytes, role: str,
                    like: Optional[SavedCopy] = None) -> FileRecord:
        """Save one file; when `like` holds a byte-identical file of this role, link that instead."""
        with content_file(inside(self.root, relative), twin_of(like, role)) as handle:
            handle.write(data)
        return handle.record(relative, role)

    def link_files(self, source: SavedCopy, records: List[Dict[str, Any]], stem: Optional[PurePosixPath] = None,
                   checked: bool = False) -> Optional[List[FileRecord]]:
        """Link files of an earlier snapshot into this one (at `stem` if the object moved), each
        checked first against its manifest (size and sha256) unless the caller just did;
        None, linking nothing, if one does not match."""
        if not checked and not intact([(source.path_of(record), record) for record in records]):
            return None
        linked = []
        for record in records:
            target = with_suffix(stem, ROLE_SUFFIXES[record["role"]]) if stem is not None else PurePosixPath(
                record["path"])
            link_or_copy(source.path_of(record), inside(self.root, target))
            linked.append(FileRecord.from_json(dict(record, path=str(target))))
        return linked

    def fetched(self, entry: Union[DocEntry, PageEntry, TableEntry], decision: Decision) -> None:
        """Mark an entry downloaded now, saying why when this run could have reused it."""
        entry.fetched_at = iso(utc_now())
        if self.index is not None:
            entry.reason = decision.reason

    @staticmethod
    def reused(entry: Union[DocEntry, PageEntry, TableEntry], decision: Decision) -> None:
        """Mark an entry linked from `decision.source`: its download time travels with it."""
        assert decision.source is not None
        before = decision.source
        entry.status = "unchanged"
        entry.updated_at = before.entry.get("updatedAt")
        entry.fetched_at = iso(before.fetched_at) if before.fetched_at else None
        entry.reused_from = before.snapshot.name
        entry.reason = decision.reason


def disk_trouble(exc: BaseException) -> Optional[str]:
    """One line saying why, when `exc` is the disk refusing writes (full, over quota, read-only)."""
    if not isinstance(exc, OSError) or exc.errno not in DISK_ERRNOS:
        return None
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"cannot write the snapshot: {exc.strerror or os.strerror(exc.errno or 0)} ({name})"


def stop_on_disk_trouble(job: Job, exc: BaseException) -> None:
    """A full, over-quota or read-only disk fails every later write too: stop the whole run at
    the first such error (raising Cancelled) instead of failing object after object."""
    reason = disk_trouble(exc)
    if reason is not None:
        job.api.http.halt("disk", reason)
        raise Cancelled(reason) from exc


def next_export_step(now: float, starts_waiting: bool, write_delay: float,
                     next_poll: Optional[float], read_delay: float = 0.0) -> Tuple[str, float]:
    """What a free export worker does next: ("start", 0), ("poll", 0), or ("wait", seconds; inf:
    until new work comes).

    The write budget is the long pole of most workspaces and a write slot left unused is lost for
    good, so an export waiting to start goes first whenever the write budget has room
    (`write_delay` 0); then a status poll that is due (a read: it takes its turn in the read budget
    like any read). While exports wait to start, a due poll goes only if its read comes soon
    (`read_delay` at most POLL_READ_WAIT) or before the next start could go anyway: a worker asleep
    on a read slot starts no export, and a read budget spent to the end of its window (tables read
    in a burst) holds it for seconds. Nor does it wait longer for its read than it has been due:
    other readers can keep the read budget booked seconds ahead for as long as exports wait to
    start (minutes), and an export unpolled that long fails at its deadline. Otherwise the worker
    sleeps until one of them can go.
    """
    if starts_waiting and write_delay <= 0:
        return "start", 0.0
    due = next_poll is not None and next_poll <= now
    overdue = now - next_poll if next_poll is not None and due else 0.0
    if due and (not starts_waiting or read_delay <= max(write_delay, POLL_READ_WAIT, overdue)):
        return "poll", 0.0
    wait = float("inf")
    if starts_waiting:
        wait = write_delay
    if next_poll is not None:
        # due: until the read comes soon, or the poll has waited as long as its read is away
        wait = min(wait, min(read_delay - POLL_READ_WAIT, (read_delay - overdue) / 2) if due else next_poll - now)
    return "wait", wait


class RenderTimes:
    """How long exports take to render in this run, so that an export's first status poll comes
    when it is likely done: an early poll is a read spent for nothing, a late one holds the page.

    A poll that found an export rendering bounds the render from below, one that found it done
    from above, taken as when it was due: one that waited for its read slot says no more than
    that. A sample is the midpoint between the two; an export done at its first poll gives 0.9 x
    that poll's time, so that the estimate creeps down towards the truth instead of sticking at
    its first guess, and a first poll that came late (the read budget spent) never pushes it up.
    The estimate is the median of the recent samples (one slow render does not move it much).
    """

    def __init__(self, poll_interval: float) -> None:
        self._interval = poll_interval  # also the first guess
        self._samples: Deque[float] = deque(maxlen=RENDER_SAMPLES)
        self._lock = threading.Lock()

    def expected(self) -> float:
        with self._lock:
            if not self._samples:
                return self._interval
            ordered = sorted(self._samples)
            return ordered[len(ordered) // 2]

    def again(self, first: bool, reads_spare: bool) -> float:
        """When to poll again an export a poll found rendering. A first poll comes when renders have
        been ending, so that one is most likely nearly done: look again soon, once (a miss costs a
        quarter of the interval, not all of it), if the read budget has room to spare (where reads
        are the long pole, an extra one costs every table a little); otherwise, and after that,
        every --poll-interval."""
        return self._interval * (FIRST_MISS_SHARE if first and reads_spare else 1.0)

    def done(self, after: float, due: float, rendering_after: Optional[float]) -> None:
        """An export was found done `after` seconds from its start by a poll due at `due` (and
        found rendering at `rendering_after`, if a poll did)."""
        done_by = min(after, due)
        sample = (rendering_after + done_by) / 2 if rendering_after is not None else 0.9 * done_by
        with self._lock:
            self._samples.append(max(0.0, sample))


@dataclass
class PageExport:
    """A page on its way through the ExportScheduler: the formats still to export and where the
    current one is. `done` gets the page's entry when it ends, saved or failed."""

    job: Job
    doc_id: str
    page: Dict[str, Any]
    stem: PurePosixPath
    entry: PageEntry
    decision: Decision
    done: concurrent.futures.Future[PageEntry]
    formats: List[str]
    request_id: str = ""
    deadline: float = 0.0  # of the current format: --export-timeout from its first start, download included
    answered: float = 0.0  # when its start was answered: the render is timed from here
    due: float = 0.0  # when its next poll is due (seconds after `answered`)
    rendering_after: Optional[float] = None  # the last poll that found it rendering (seconds after `answered`)
    starts: int = 0
    refreshes: int = 0


class ExportScheduler:
    """Runs page exports one request at a time on EXPORT_WORKERS threads of its own, so that an
    export that is rendering holds no thread at all.

    A start (a write) goes out as soon as the write budget has room, across docs, in the order
    pages were listed; the status polls (reads) are timers that come due, the first near the
    render time learnt so far (RenderTimes), once more soon after if that one just missed and
    reads are spare, then every --poll-interval. The thread whose poll finds the download link downloads and saves the
    file. next_export_step decides which step goes first. A 404 on a poll (the export request
    expired) starts it again, a refused download link is polled again for a fresh one; both are
    bounded, and every request of a format, the download included, ends by its deadline
    (--export-timeout).
    """

    def __init__(self, http: HttpClient, options: Options, workers: int = EXPORT_WORKERS) -> None:
        self._http = http
        self._options = options
        self._cond = threading.Condition()
        self._starts: Deque[PageExport] = deque()
        self._polls: List[Tuple[float, int, PageExport]] = []  # a heap by due time
        self._order = itertools.count()  # ties in the heap go by arrival
        self._closing = False
        self.render = RenderTimes(options.poll_interval)
        self._threads = [threading.Thread(target=self._work, name=f"coda-export-{number}", daemon=True)
                         for number in range(workers)]

    def __enter__(self) -> "ExportScheduler":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    def add(self, exports: List[PageExport]) -> None:
        """Queue pages to export, after those queued before (after a cancel: end them at once)."""
        with self._cond:
            self._starts.extend(exports)
            if self._http.cancelled:
                self._drop()
            self._cond.notify_all()

    def _take(self) -> Optional[Tuple[str, PageExport]]:
        with self._cond:
            while True:
                if self._http.cancelled:
                    self._drop()
                    return None
                if self._closing and not self._starts and not self._polls:
                    return None
                now = time.monotonic()
                poll_due = bool(self._polls) and self._polls[0][0] <= now
                step, wait = next_export_step(now, bool(self._starts),
                                              self._http.budget_delay("write") if self._starts else 0.0,
                                              self._polls[0][0] if self._polls else None,
                                              self._http.budget_delay("read") if poll_due and self._starts else 0.0)
                if step == "start":
                    self._http.claim_slot("write")  # under the lock: no two workers take one slot
                    return step, self._starts.popleft()
                if step == "poll":
                    return step, heapq.heappop(self._polls)[2]
                self._cond.wait(min(wait, IDLE_WAKE))

    def _drop(self) -> None:
        """After a cancel: every waiting export ends as cancelled (left out of the manifest)."""
        waiting = list(self._starts) + [item[2] for item in self._polls]
        self._starts.clear()
        self._polls.clear()
        for export in waiting:
            export.job.recorder.settle()
            export.done.set_exception(Cancelled("cancelled"))

    def _poll_at(self, export: PageExport, when: float) -> None:
        with self._cond:
            heapq.heappush(self._polls, (min(when, export.deadline), next(self._order), export))
            self._cond.notify_all()

    def _start_next(self, export: PageExport) -> None:
        """Its next format, or the same again after an expiry: ahead of pages not started yet."""
        with self._cond:
            self._starts.appendleft(export)
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            step, export = taken
            try:
                if step == "start":
                    self._start(export)
                elif self._poll(export):
                    end_page(export.job, export.doc_id, export.page, export.entry, export.done)
            except Exception as exc:  # one bad page must never stop the run (a cancel or a full disk does)
                if isinstance(exc, (ApiError, DeadlineReached)) and time.monotonic() >= export.deadline:
                    exc = ExportError(f"export did not finish within {self._options.export_timeout:g}s: {exc}")
                end_page(export.job, export.doc_id, export.page, export.entry, export.done, exc)

    def _start(self, export: PageExport) -> None:
        if export.starts == 0:
            export.deadline = time.monotonic() + self._options.export_timeout
            export.refreshes = 0
        export.starts += 1
        export.request_id = export.job.api.start_export(export.doc_id, export.page["id"], export.formats[0],
                                                        export.deadline, claimed=True)
        export.answered = time.monotonic()
        export.rendering_after = None
        export.due = self.render.expected()
        self._poll_at(export, export.answered + export.due)

    def _poll(self, export: PageExport) -> bool:
        """One status poll, and the download once there is a link; True when the page is saved."""
        api, page_id, timeout = export.job.api, export.page["id"], self._options.export_timeout
        try:
            status = api.export_status(export.doc_id, page_id, export.request_id, export.deadline)
        except ApiError as exc:
            if exc.status != 404:
                raise
            if time.monotonic() > export.deadline:
                raise ExportError(f"export did not finish within {timeout:g}s") from exc
            if export.starts >= MAX_EXPORT_STARTS:
                raise ExportError(f"export request expired {MAX_EXPORT_STARTS} times") from exc
            LOG.info("export of page %s expired (404); starting it again", page_id)
            self._start_next(export)
            return False
        polled = time.monotonic()
        if status.get("error") or str(status.get("status", "")).lower() == "failed":
            raise ExportError(f"export failed: {status.get('error') or 'no reason given'}")
        link = status.get("downloadLink")
        if link is not None and not isinstance(link, str):
            raise ExportError(f"export answer has a downloadLink that is not a URL: {link!r:.100}")
        if not link:
            if polled > export.deadline:
                raise ExportError(f"export did not finish within {timeout:g}s")
            again = self.render.again(first=export.rendering_after is None,
                                      reads_spare=self._http.budget_delay("read") <= 0)
            export.rendering_after = polled - export.answered
            export.due = export.rendering_after + again
            self._poll_at(export, export.answered + export.due)
            return False
        try:
            data = api.download(link, export.deadline)
        except ExpiredLink as exc:
            export.refreshes += 1
            if export.refreshes > MAX_LINK_REFRESHES:
                raise ExportError(f"download link kept expiring: {exc}") from exc
            LOG.info("download link of page %s expired; asking for a fresh one", page_id)
            self._poll_at(export, time.monotonic() + self._options.poll_interval)
            return False
        if export.refreshes == 0:
            self.render.done(polled - export.answered, export.due, export.rendering_after)
        output_format = export.formats.pop(0)
        relative = with_suffix(export.stem, ROLE_SUFFIXES[output_format])
        export.entry.files.append(export.job.write_bytes(relative, data, output_format, export.decision.source))
        stamp_with_coda_time(inside(export.job.root, relative), export.page.get("updatedAt"))
        if export.formats:
            export.starts = 0
            self._start_next(export)
            return False
        export.job.fetched(export.entry, export.decision)
        save_page_assets(export.job, export.doc_id, export.entry)
        export.job.recorder.count("pages")
        return True


def page_entry(page: Dict[str, Any], stem: PurePosixPath, formats: Tuple[str, ...]) -> PageEntry:
    return PageEntry(id=page["id"], name=page.get("name"), parent_id=_ref_id(page.get("parent")),
                     browser_link=page.get("browserLink"), updated_at=page.get("updatedAt"),
                     content_type=page.get("contentType"), is_hidden=page.get("isHidden"),
                     path=str(with_suffix(stem, ROLE_SUFFIXES[formats[0]])), formats=list(formats))


def export_page(job: Job, doc_id: str, page: Dict[str, Any], stem: PurePosixPath,
                shown_tables: List[concurrent.futures.Future[TableEntry]],
                done: concurrent.futures.Future[PageEntry]) -> Optional[PageExport]:
    """Decide one page: link it from an earlier snapshot, skip it (not exportable), or return it
    as a PageExport for the ExportScheduler, which saves it in every requested format. A page that
    ends here ends through end_page (a failure recorded, never raised; `done` gets the entry).

    A page's updatedAt covers its own text, not the tables shown on it, so the
    policy also compares those tables with what the saved page showed.
    """
    formats = job.options.page_formats
    entry = page_entry(page, stem, formats)
    try:
        saved = job.index.pages.get((doc_id, page["id"])) if job.index is not None else None
        decision = job.policy.page(page, saved, lambda: hosted_tables(shown_tables))
        if decision.reuse and decision.source is not None and not assets_reusable(
                job.assets.prefixes if job.assets else None, decision.source, stem):
            decision = Decision(False, REASON_ASSETS, decision.source)
        linked = job.link_files(decision.source, decision.source.entry["files"], stem) \
            if decision.reuse and decision.source is not None else None
        if decision.reuse and linked is None:
            decision = Decision(False, REASON_DAMAGED)
        if linked is not None and decision.source is not None:
            entry.files = linked
            job.reused(entry, decision)
            carry_assets(job, doc_id, entry, decision.source.entry)
            job.recorder.unchanged("pages")
            job.recorder.count("pages")
        elif (page.get("contentType") or "canvas") != "canvas":
            entry.status = "skipped"
            entry.reason = f"the API cannot export {page.get('contentType')} pages"
            job.recorder.count("pages_not_exportable")
        else:
            return PageExport(job, doc_id, page, stem, entry, decision, done, list(formats))
    except Exception as exc:  # one bad page must never stop the run (a cancel or a full disk does)
        end_page(job, doc_id, page, entry, done, exc)
        return None
    end_page(job, doc_id, page, entry, done)
    return None


def end_page(job: Job, doc_id: str, page: Dict[str, Any], entry: PageEntry,
             done: concurrent.futures.Future[PageEntry], exc: Optional[Exception] = None) -> None:
    """The one way a page ends: a failure recorded in its entry and the summary (a cancel, or a
    full disk, which stops the run, ends it as cancelled instead), counted as settled for the
    progress line, journalled, and handed to `done`."""
    stop = exc if isinstance(exc, Cancelled) else None
    if exc is not None and stop is None:
        try:
            stop_on_disk_trouble(job, exc)
        except Cancelled as halted:
            stop = halted
    job.recorder.settle()
    if stop is not None:
        done.set_exception(stop)
        return
    if exc is not None:
        LOG.debug("page %s failed", page["id"], exc_info=exc)
        entry.status = "failed"
        entry.error = str(exc)
        job.recorder.fail("page", exc, doc_id=doc_id, object_id=page["id"], name=page.get("name"))
    job.journal.saved(doc_id, "page", entry)
    done.set_result(entry)


def decide_page_later(job: Job, exports: ExportScheduler, doc_id: str, page: Dict[str, Any], stem: PurePosixPath,
                      shown_tables: List[concurrent.futures.Future[TableEntry]],
                      done: concurrent.futures.Future[PageEntry]) -> None:
    """export_page on a pool worker, for a page whose decision may wait for its tables."""
    export = export_page(job, doc_id, page, stem, shown_tables, done)
    if export is not None:
        exports.add([export])


def hosted_tables(tables: List[concurrent.futures.Future[TableEntry]]) -> Dict[str, Optional[str]]:
    """The CSV sha256 this run saved for each table shown on a page (waits for them)."""
    return {entry.id: csv_sha256(entry.as_json()) for entry in (future.result() for future in tables)}


def table_entry(ref: Dict[str, Any], stem: PurePosixPath) -> TableEntry:
    return TableEntry(id=ref["id"], name=ref.get("name"),
                      table_type="view" if ref.get("tableType") == "view" else "table",
                      parent_page_id=_ref_id(ref.get("parent")), parent_page_name=_ref_name(ref.get("parent")) or None,
                      browser_link=ref.get("browserLink"), path=str(with_suffix(stem, ROLE_SUFFIXES["csv"])))


def export_table(job: Job, doc_id: str, ref: Dict[str, Any], stem: PurePosixPath, doc_updated: Any) -> TableEntry:
    """Save one table or view: .table.json, .columns.json and the rows as CSV.

    The table list lacks updatedAt and rowCount, so the table is always
    fetched; with --incremental one the policy calls unchanged is linked, not re-read.
    """
    entry = table_entry(ref, stem)
    kind = "views" if entry.table_type == "view" else "tables"
    api = job.api
    try:
        table = api.get_table(doc_id, ref["id"])
        parent_table = table.get("parentTable")
        entry.updated_at, entry.row_count = table.get("updatedAt"), table.get("rowCount")
        entry.parent_table_id = _ref_id(parent_table)
        entry.browser_link = table.get("browserLink", entry.browser_link)
        saved = job.index.tables.get((doc_id, ref["id"])) if job.index is not None else None
        entry.files.append(job.write_json(with_suffix(stem, ROLE_SUFFIXES["table"]), table, "table", saved))
        decision = job.policy.table(table, saved, doc_updated, lambda: base_updated(job, doc_id, table))
        if decision.reuse and decision.source is not None and not assets_reusable(
                job.assets.prefixes if job.assets else None, decision.source, None):
            decision = Decision(False, REASON_ASSETS, decision.source)
        source = decision.source
        linked = job.link_files(source, [r for r in source.entry["files"] if r["role"] != "table"], stem) \
            if decision.reuse and source is not None else None
        if decision.reuse and linked is None:
            decision = Decision(False, REASON_DAMAGED)
        if linked is not None and source is not None:
            entry.files.extend(linked)
            carry_assets(job, doc_id, entry, source.entry)
            job.reused(entry, decision)
            entry.row_count = source.entry.get("rowCount")
            entry.calculated_columns = source.entry.get("calculatedColumns")
            job.recorder.unchanged(kind)
        else:
            read_table(job, doc_id, table, stem, entry, decision)
        job.recorder.count(kind)
        job.recorder.count("rows", entry.row_count if isinstance(entry.row_count, int) else 0)
    except Cancelled:
        raise
    except Exception as exc:  # one bad table must never stop the run (a full disk does)
        stop_on_disk_trouble(job, exc)
        LOG.debug("table %s failed", ref["id"], exc_info=True)
        entry.status = "failed"
        entry.error = str(exc)
        job.recorder.fail(kind[:-1], exc, doc_id=doc_id, object_id=ref["id"], name=ref.get("name"))
    finally:
        job.recorder.settle()
    job.journal.saved(doc_id, "table", entry)
    return entry


def read_table(job: Job, doc_id: str, table: Dict[str, Any], stem: PurePosixPath, entry: TableEntry,
               decision: Decision) -> None:
    """Read a table's columns and rows into the snapshot; files identical to the saved copy's
    become hard links of it. Raises when the rows could not all be read."""
    columns = list_all(job.api.iter_columns(doc_id, table["id"]))
    entry.calculated_columns = sum(1 for column in columns if column.get("calculated") is True)
    entry.files.append(job.write_json(with_suffix(stem, ROLE_SUFFIXES["columns"]), columns, "columns",
                                         decision.source))
    csv_path = with_suffix(stem, ROLE_SUFFIXES["csv"])
    ndjson_path = with_suffix(stem, ROLE_SUFFIXES["rows"]) if job.options.rows_json else None
    found = CellAssets(job, doc_id, stem, columns) if job.assets is not None else None
    count, problem, records = read_rows(job, doc_id, table, columns, csv_path, ndjson_path, decision.source, found)
    if found is not None:
        found.save(entry)
    entry.files.extend(records)
    for record in records:  # the table's own time in Coda, not the time of this run
        stamp_with_coda_time(inside(job.root, PurePosixPath(record.path)), table.get("updatedAt"))
    entry.row_count = count
    job.fetched(entry, decision)
    if problem is not None:
        raise problem


def read_rows(job: Job, doc_id: str, table: Dict[str, Any], columns: List[Dict[str, Any]], csv_path: PurePosixPath,
              ndjson_path: Optional[PurePosixPath], like: Optional[SavedCopy], found: "Optional[CellAssets]" = None
              ) -> Tuple[int, Optional[BackupError], List[FileRecord]]:
    """Stream a table's rows to disk, at most about as many as its rowCount says (and the asset
    URLs in their cells to `found`); files identical to `like`'s become hard links of it. Coda
    answers 504 when a page of a large table takes too long to build; its advice is to start the
    listing again with a smaller limit."""
    table_id = table["id"]

    def write(limit: int) -> Tuple[int, Optional[BackupError], List[FileRecord]]:
        written: List[HashingWriter] = []
        rows = job.api.iter_rows(doc_id, table_id, limit, table.get("rowCount"))
        count, problem = write_rows_csv(inside(job.root, csv_path), columns, found.scan(rows) if found else rows,
                                        inside(job.root, ndjson_path) if ndjson_path else None, like, written,
                                        job.options.csv_bom)
        records = [written[0].record(csv_path, "csv")]
        if ndjson_path is not None:
            records.append(written[1].record(ndjson_path, "rows"))
        return count, problem, records

    try:
        return write(ROW_LIMIT)
    except ApiError as exc:
        if exc.status != 504:
            raise
    LOG.info("rows of table %s timed out (504); reading them again %d at a time", table_id, SMALL_ROW_LIMIT)
    return write(SMALL_ROW_LIMIT)


def base_updated(job: Job, doc_id: str, table: Dict[str, Any]) -> Any:
    """A view shows its base table's rows; Coda does not promise to bump the view's
    updatedAt when they change, so the base table is asked too (one read, only
    for views that would otherwise be reused)."""
    base_id = _ref_id(table.get("parentTable"))
    return job.api.get_table(doc_id, base_id).get("updatedAt") if base_id is not None else None


@dataclass
class DocWork:
    """A doc whose listings are done and whose pages and tables are in the pool."""

    entry: DocEntry
    pages: List[concurrent.futures.Future[PageEntry]] = field(default_factory=list)
    tables: List[concurrent.futures.Future[TableEntry]] = field(default_factory=list)
    extras: "List[concurrent.futures.Future[DocExtras]]" = field(default_factory=list)

    def finish(self) -> DocEntry:
        """Wait for the doc's objects; leave out the ones a cancellation stopped."""
        self.entry.pages.extend(_finished(self.pages))
        self.entry.tables.extend(_finished(self.tables))
        for extras in _finished(self.extras):
            self.entry.files.extend(extras.files)
            if extras.errors:
                self.entry.status, self.entry.error = "failed", "; ".join(extras.errors)
        return self.entry


def _cancel_with(done: concurrent.futures.Future[Any], task: concurrent.futures.Future[Any]) -> None:
    """A pool task dropped by a cancel before it ran never ends its page: end the page too."""
    if task.cancelled():
        done.cancel()


def _finished(futures: List[concurrent.futures.Future[Any]]) -> List[Any]:
    results = []
    for future in futures:
        try:
            results.append(future.result())
        except (Cancelled, concurrent.futures.CancelledError):
            continue
    return results


def doc_entry(doc: Dict[str, Any], folder: PurePosixPath) -> DocEntry:
    return DocEntry(id=doc["id"], name=doc.get("name"), browser_link=doc.get("browserLink"),
                    updated_at=doc.get("updatedAt"), path=str(folder))


@dataclass(frozen=True)
class Workers:
    """The threads of a run besides the doc listers: `pool` reads tables (and decides the pages
    that wait for them) and runs each doc's extras, `exports` runs page exports, `items` fetches
    formulas and controls one by one for the extras. Their requests share --concurrency."""

    pool: concurrent.futures.Executor
    exports: ExportScheduler
    items: concurrent.futures.Executor


def backup_doc(job: Job, doc: Dict[str, Any], workers: Workers) -> DocWork:
    """List a doc's pages and tables, save the lists, and queue every object.

    Pages go to the export scheduler as soon as they are listed, before the tables are (exports
    are the long pole), and the extras (a long chain of reads) go to the pool before the tables
    (so that they are not the run's tail); a page an earlier snapshot holds waits on the pool
    instead, as its reuse decision may need the outcome of the tables it shows. A doc an earlier snapshot holds whole
    and unchanged is linked whole, without a single request.
    """
    doc_id = doc["id"]
    saved = job.index.docs.get(doc_id) if job.index is not None else None
    decision = job.policy.doc(doc, saved)
    folder = job.paths.claim(PurePosixPath(saved.entry["path"]) if decision.reuse and saved else doc_folder(doc))
    work = DocWork(doc_entry(doc, folder))
    job.recorder.count("docs")
    entry = work.entry
    if decision.reuse and saved is not None and str(folder) == saved.entry["path"]:
        if link_whole_doc(job, decision, entry):
            return work
        decision = Decision(False, REASON_DAMAGED)
    if saved is not None and job.policy.retry_failed:
        entry.updated_at = saved.entry.get("updatedAt")  # not looked at: the next run must still compare
    job.fetched(entry, decision)
    job.journal.doc(entry)
    entry.files.append(job.write_json(folder / DOC_FILES["doc"], doc, "doc"))
    pages, problem = read_all(job.api.iter_pages(doc))
    job.recorder.listed.pages[doc_id] = listed_ids(pages, problem)
    if isinstance(problem, ApiError):
        entry.status, entry.error = "failed", str(problem)
        job.recorder.fail("doc", problem, doc_id=doc_id, object_id=doc_id, name=doc.get("name"))
        return work
    entry.files.append(job.write_json(folder / DOC_FILES["pages"], pages, "pages"))
    stems = page_stems(pages)
    fresh: List[PageExport] = []
    later: List[Tuple[Dict[str, Any], PurePosixPath, concurrent.futures.Future[PageEntry]]] = []
    for page in selected_pages(job.options, pages):
        stem = job.paths.claim(folder / stems[page["id"]])
        done: concurrent.futures.Future[PageEntry] = concurrent.futures.Future()
        work.pages.append(done)
        job.recorder.queue()
        if job.index is not None and (doc_id, page["id"]) in job.index.pages:
            later.append((page, stem, done))
        else:
            export = export_page(job, doc_id, page, stem, [], done)
            if export is not None:
                fresh.append(export)
    workers.exports.add(fresh)
    if job.options.extras:
        work.extras.append(workers.pool.submit(export_doc_extras, job, doc_id, folder, workers.items))
    tables, table_problem = read_all(job.api.iter_tables(doc))
    job.recorder.listed.tables[doc_id] = listed_ids(tables, table_problem)
    entry.files.append(job.write_json(folder / DOC_FILES["tables"], tables, "tables"))
    for listing_problem in (problem, table_problem):
        if listing_problem is not None:
            entry.status, entry.error = "failed", str(listing_problem)
            job.recorder.fail("doc", listing_problem, doc_id=doc_id, object_id=doc_id, name=doc.get("name"))
    # Tables go to the pool before the pages that wait for them: a page may wait for the tables it
    # shows (see export_page), and the queue is first in, first out, so those are already running.
    hosted: Dict[str, List[concurrent.futures.Future[TableEntry]]] = {}
    for table in selected_tables(job.options, doc, tables):
        stem = job.paths.claim(folder / table_stem(table))
        job.recorder.queue()
        future = workers.pool.submit(export_table, job, doc_id, table, stem, doc.get("updatedAt"))
        work.tables.append(future)
        hosted.setdefault(_ref_id(table.get("parent")) or "", []).append(future)
    for page, stem, done in later:
        task = workers.pool.submit(decide_page_later, job, workers.exports, doc_id, page, stem,
                                   hosted.get(page["id"], []), done)
        task.add_done_callback(functools.partial(_cancel_with, done))
    return work


def selected_pages(options: Options, pages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [page for page in pages if not (options.skip_hidden_pages and page.get("isEffectivelyHidden"))]


def selected_tables(options: Options, doc: Dict[str, Any], tables: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Tables and views to back up: --no-views and --exclude-table (`Doc/Table` by name or id)."""
    return [table for table in tables
            if table_wanted(options, doc["id"], doc.get("name"), table["id"], table.get("name"),
                            table.get("tableType") == "view")]


def table_wanted(options: Options, doc_id: str, doc_name: Any, table_id: str, name: Any, is_view: bool) -> bool:
    if options.no_views and is_view:
        return False
    keys = (f"{doc_name}/{name}", f"{doc_id}/{table_id}")
    return not any(fnmatch.fnmatchcase(key, pattern) for key in keys for pattern in options.exclude_tables)


def export_doc_extras(job: Job, doc_id: str, folder: PurePosixPath, items: concurrent.futures.Executor) -> "DocExtras":
    """formulas.json, controls.json and permissions.json, where the token may read them.

    The lists give names only, so each formula and control is fetched for its value, on the
    `items` threads: one after another they would be a long chain of reads, the run's tail. A
    403 (sharing settings are for owners) is a skipped item, not a failure.
    """
    api = job.api

    def with_values(kind: str, refs: Iterator[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return list(items.map(lambda item: api.get_item(doc_id, kind, item["id"]), list_all(refs)))

    fetchers: List[Tuple[str, Callable[[], Any]]] = [
        ("formulas", lambda: with_values("formulas", api.iter_formulas(doc_id))),
        ("controls", lambda: with_values("controls", api.iter_controls(doc_id))),
        ("permissions", lambda: api.sharing(doc_id)),
    ]
    extras = DocExtras()
    for role, fetch in fetchers:
        try:
            extras.files.append(job.write_json(folder / DOC_FILES[role], fetch(), role))
        except Cancelled:
            raise
        except ApiError as exc:
            if exc.status in (401, 403):
                job.recorder.skip(Skipped(role, doc_id, f"not allowed for this token (HTTP {exc.status})"))
            else:
                extras.errors.append(f"{role}: {exc}")
                job.recorder.fail(role, exc, doc_id=doc_id, object_id=doc_id, name=role)
        except Exception as exc:  # listing cut short, a bug: recorded, the run goes on (a full disk stops it)
            stop_on_disk_trouble(job, exc)
            extras.errors.append(f"{role}: {exc}")
            job.recorder.fail(role, exc, doc_id=doc_id, object_id=doc_id, name=role)
    return extras


@dataclass
class DocExtras:
    """What export_doc_extras saved, and what failed (which makes the doc `failed`)."""

    files: List[FileRecord] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)


def link_whole_doc(job: Job, decision: Decision, entry: DocEntry) -> bool:
    """Carry an unchanged doc over from an earlier snapshot, file by file, after checking every
    file against its manifest; False (nothing linked) if one does not match."""
    saved = decision.source
    assert saved is not None
    if not intact(saved.all_files()):
        return False
    recorder = job.recorder
    before = saved.entry
    recorder.listed.pages[entry.id] = {page["id"] for page in before["pages"]}
    recorder.listed.tables[entry.id] = {table["id"] for table in before["tables"]}
    entry.files, entry.path = job.link_files(saved, before["files"], checked=True) or [], before["path"]
    Job.reused(entry, decision)
    entry.fetched_at = before.get("fetchedAt") or entry.fetched_at
    link_doc_assets(job, saved)
    for page in before["pages"]:
        page_copy = PageEntry.from_json(page)
        page_copy.files = job.link_files(saved, page["files"], checked=True) or []
        if page["status"] != "skipped":
            Job.reused(page_copy, Decision(True, decision.reason, replace_entry(saved, page)))
        entry.pages.append(page_copy)
        recorder.count("pages" if page["status"] != "skipped" else "pages_not_exportable")
    for table in before["tables"]:
        table_copy = TableEntry.from_json(table)
        table_copy.files = job.link_files(saved, table["files"], checked=True) or []
        Job.reused(table_copy, Decision(True, decision.reason, replace_entry(saved, table)))
        entry.tables.append(table_copy)
        kind = "views" if table.get("tableType") == "view" else "tables"
        recorder.count(kind)
        recorder.count("rows", table.get("rowCount") or 0)
        recorder.unchanged(kind)
    recorder.unchanged("pages", sum(1 for page in before["pages"] if page["status"] != "skipped"))
    recorder.unchanged("docs")
    job.journal.doc(entry)
    for page_copy in entry.pages:
        job.journal.saved(entry.id, "page", page_copy)
    for table_copy in entry.tables:
        job.journal.saved(entry.id, "table", table_copy)
    return True


def replace_entry(saved: SavedCopy, entry: Dict[str, Any]) -> SavedCopy:
    """A doc's saved copy narrowed to one of its pages or tables (same snapshot), keeping
    that object's own download time."""
    return SavedCopy(saved.snapshot, entry, fetched_time(entry, None) or saved.fetched_at, saved.doc_updated)


# --- Assets -------------------------------------------------------------------
# Images and attachments that pages and cells point to, saved once per doc under
# docs/<Doc>/assets/ so that a snapshot opens offline, images included.

ASSET_FOLDER = "assets"
ASSET_FORMAT_TYPES = frozenset({"image", "imageReference", "attachments"})
ASSET_URL_TEXT = re.compile(r"[\x21-\x7e]{1,4096}")  # printable ASCII, no spaces: what a link target can be
MARKDOWN_TARGET = re.compile(r"\]\(\s*<?([^\s<>()]+)")  # the URL of ![alt](URL), [name](URL "title")
HTML_TARGET = re.compile(r"""\b(?:src|href)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'<>=`]+))""", re.IGNORECASE)
# Extensions by Content-Type; a URL's own extension counts only if it is one of these.
ASSET_TYPES: Dict[str, str] = {
    "image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif", "image/webp": ".webp",
    "image/svg+xml": ".svg", "image/bmp": ".bmp", "image/tiff": ".tif", "image/x-icon": ".ico",
    "image/vnd.microsoft.icon": ".ico", "image/heic": ".heic", "image/avif": ".avif",
    "application/pdf": ".pdf", "application/zip": ".zip", "application/json": ".json",
    "text/plain": ".txt", "text/csv": ".csv", "text/markdown": ".md",
    "video/mp4": ".mp4", "video/quicktime": ".mov", "video/webm": ".webm",
    "audio/mpeg": ".mp3", "audio/wav": ".wav", "audio/x-wav": ".wav",
    "application/msword": ".doc", "application/vnd.ms-excel": ".xls", "application/vnd.ms-powerpoint": ".ppt",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": ".docx",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": ".xlsx",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": ".pptx",
}
KNOWN_EXTENSIONS = frozenset(ASSET_TYPES.values()) | {".jpeg"}


def asset_host_prefix(text: str) -> str:
    """Normalise an --asset-host value: scheme and host in lower case, a path that ends at a "/"
    (so `https://files.example/coda` never admits `https://files.example/coda-evil/...`)."""
    parts = split_url(text.strip())
    if (parts.scheme.lower() not in ("http", "https") or not parts.netloc or parts.query or parts.fragment
            or "@" in parts.netloc):
        raise ConfigError(f"--asset-host {text!r}: give an http(s) URL prefix such as {DEFAULT_ASSET_HOSTS[0]}")
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, "", ""))


def is_asset_url(url: str, prefixes: Collection[str]) -> bool:
    """Whether a URL found in a page or cell is an asset to save: under an allowed prefix, same
    scheme and host exactly (no user@ trick, no look-alike host), nothing but printable ASCII."""
    if not ASSET_URL_TEXT.fullmatch(url):
        return False
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return False
    for prefix in prefixes:
        allowed = urllib.parse.urlsplit(prefix)
        if (parts.scheme.lower(), parts.netloc.lower()) == (allowed.scheme, allowed.netloc) \
                and parts.path.startswith(allowed.path):
            return True
    return False


def may_follow_redirect(url: str, prefixes: Collection[str]) -> bool:
    """An asset host may redirect to any https URL (a CDN), or to a URL under an allowed prefix
    (which is how a plain-http --asset-host stays usable); never to anything else."""
    if not ASSET_URL_TEXT.fullmatch(url):
        return False
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return False
    return (parts.scheme.lower() == "https" and bool(parts.netloc)) or is_asset_url(url, prefixes)


def asset_file_name(url: str, content_type: str) -> str:
    """`<sha256 of the URL>.<ext>`: the same URL always gets the same name, two URLs never
    share one, and nothing in the URL can choose a character of it (only pick a known extension)."""
    last = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]
    match = re.search(r"\.[A-Za-z0-9]{1,8}$", last)
    extension = match.group(0).lower() if match and match.group(0).lower() in KNOWN_EXTENSIONS else ""
    if not extension:
        extension = ASSET_TYPES.get(content_type.split(";")[0].strip().lower(), ".bin")
    return hashlib.sha256(url.encode("utf-8")).hexdigest() + extension


def link_targets(text: str, role: str) -> List[Tuple[int, int, str, bool]]:
    """Where link targets sit in a page file: (start, end, URL, HTML-escaped?), in text order.

    Markdown: `](URL` of images and links, plus src/href of any raw HTML in it; HTML: src and
    href attributes, whose values are HTML-escaped.
    """
    spans: List[Tuple[int, int, str, bool]] = []
    if role == "markdown":
        spans.extend((m.start(1), m.end(1), m.group(1), False) for m in MARKDOWN_TARGET.finditer(text))
    for match in HTML_TARGET.finditer(text):
        group = next(number for number in (1, 2, 3) if match.group(number) is not None)
        spans.append((match.start(group), match.end(group), html.unescape(match.group(group)), True))
    return sorted(spans)


def page_asset_urls(text: str, role: str, prefixes: Collection[str]) -> List[str]:
    """The asset URLs a page file links to, each once, in text order."""
    found = dict.fromkeys(url for _, _, url, _ in link_targets(text, role) if is_asset_url(url, prefixes))
    return list(found)


def rewrite_links(text: str, role: str, paths: Dict[str, str]) -> str:
    """Replace each link target found in `paths` (URL -> relative path); everything else stays
    byte for byte, so the manifest's url/path pairs turn the file back into the export."""
    pieces: List[str] = []
    done = 0
    for start, end, url, escaped in link_targets(text, role):
        if start < done or url not in paths:
            continue
        pieces.append(text[done:start])
        pieces.append(html.escape(paths[url], quote=True) if escaped else paths[url])
        done = end
    pieces.append(text[done:])
    return "".join(pieces)


def asset_column_ids(columns: List[Dict[str, Any]]) -> List[str]:
    """Columns whose cells hold files: image, imageReference and attachments."""
    return [str(column.get("id")) for column in columns
            if isinstance(column.get("format"), dict) and column["format"].get("type") in ASSET_FORMAT_TYPES]


def cell_asset_urls(value: Any, prefixes: Collection[str]) -> Iterator[str]:
    """Asset URLs in one cell: a URL string, an object with `url` (ImageObject), or a list of
    either (isArray is known to misreport for attachments, so lists are always accepted)."""
    if isinstance(value, str):
        if is_asset_url(value.strip(), prefixes):
            yield value.strip()
    elif isinstance(value, dict):
        yield from cell_asset_urls(value.get("url"), prefixes)
    elif isinstance(value, list):
        for item in value:
            yield from cell_asset_urls(item, prefixes)


def copy_limited(read: Callable[[int], bytes], handle: HashingWriter, limit: int) -> Tuple[int, str]:
    """Copy a stream into a file in chunks, hashing as it goes; AssetTooLarge past `limit` bytes
    (the caller's atomic_file then removes the partial file)."""
    digest = hashlib.sha256()
    size = 0
    while True:
        chunk = read(ASSET_CHUNK)
        if not chunk:
            return size, digest.hexdigest()
        size += len(chunk)
        if size > limit:
            raise AssetTooLarge(f"more than {limit} bytes")
        digest.update(chunk)
        handle.write(chunk)


def _read_network(raw: http.client.HTTPResponse, size: int) -> bytes:
    """A read from the asset host; a lost connection is retried, a disk error (raised while
    writing) is not, so the two must not look alike."""
    try:
        return raw.read(size)
    except (OSError, http.client.HTTPException) as exc:
        raise _Transient(f"connection lost while downloading: {exc.__class__.__name__}: {exc}") from exc


def valid_asset_record(record: Any) -> bool:
    """A manifest asset record we wrote: the right types, and a path that is exactly
    `docs/<Doc>/assets/<the name its URL and type give>`, so a doctored manifest cannot point
    a link anywhere else."""
    if not (isinstance(record, dict) and all(isinstance(record.get(key), str)
                                             for key in ("url", "path", "sha256", "contentType"))
            and isinstance(record.get("size"), int) and not isinstance(record.get("size"), bool)):
        return False
    parts = PurePosixPath(record["path"]).parts
    return (len(parts) == 4 and parts[0] == "docs" and parts[2] == ASSET_FOLDER and parts[1] not in ("", ".", "..")
            and safe_component(parts[1]) == parts[1]
            and parts[3] == asset_file_name(record["url"], record["contentType"]))


def assets_intact(root: Path, entry: Dict[str, Any]) -> bool:
    """Whether a previous page or table can bring its assets along: none failed to download,
    every record is sound and its file is there at its size."""
    saved = entry.get("assets", [])
    if entry.get("assetErrors") or not isinstance(saved, list):
        return False
    for record in saved:
        if not valid_asset_record(record):
            return False
        try:
            if inside(root, PurePosixPath(record["path"])).stat().st_size != record["size"]:
                return False
        except (OSError, BackupError):
            return False
    return True


def assets_reusable(prefixes: Optional[Collection[str]], saved: SavedCopy, stem: Optional[PurePosixPath]) -> bool:
    """The asset part of the reuse decision for a previous page (`stem` given) or table.

    With --no-assets a page whose links were rewritten into assets/ is exported again, with its
    original links. Otherwise every asset the entry lists must be intact and a page must sit at
    the same depth (its links are relative); an entry saved without assets (an older version,
    --no-assets) is reused only if it links to none.
    """
    entry = saved.entry
    if prefixes is None:
        return stem is None or not entry.get("assets")
    if "assets" not in entry:  # saved by a run that kept no assets: fine if it links to none
        return not links_to_assets(saved.snapshot, entry, prefixes)
    if not isinstance(entry["assets"], list):
        return False
    if stem is not None and len(PurePosixPath(entry["path"]).parts) != len(stem.parts):
        return False
    return assets_intact(saved.snapshot, entry)


def links_to_assets(root: Path, entry: Dict[str, Any], prefixes: Collection[str]) -> bool:
    """Whether a saved page's files, or a saved table's columns, hold or may hold asset URLs
    (a file that cannot be read counts as yes): the first run that keeps assets then re-reads
    only what has some, not everything."""
    try:
        for record in entry["files"]:
            path = inside(root, PurePosixPath(record["path"]))
            if record["role"] in PAGE_ROLES:
                text = path.read_bytes().decode("utf-8", "surrogateescape")
                if page_asset_urls(text, record["role"], prefixes):
                    return True
            elif record["role"] == "columns":
                columns = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(columns, list) or asset_column_ids([c for c in columns if isinstance(c, dict)]):
                    return True
    except (OSError, ValueError, BackupError):
        return True
    return False


def doc_folder_of(relative: PurePosixPath) -> PurePosixPath:
    """`docs/<Doc>__<id>` of any path inside a doc folder: the folder its assets go in."""
    return PurePosixPath(*relative.parts[:2])


@dataclass(frozen=True)
class AssetOutcome:
    """How one asset ended: saved (with its manifest record), gone (404/410), too_large, failed."""

    status: str
    reason: str = ""
    record: Optional[AssetRecord] = None


class AssetStore:
    """The assets of one run: each URL saved once per doc, by a small pool of its own.

    Asset downloads go to another host and count against no Coda limit, so they run on
    ASSET_WORKERS threads with their own HTTP client (no token in it at all) and never hold an
    API worker: an exporter hands over its URLs and goes on. One finisher thread waits for an
    object's downloads, rewrites a page's links and fills the entry's `assets`; close() waits
    for all of it before the manifest is written.
    """

    def __init__(self, options: Options, http: HttpClient, root: Path, recorder: RunRecorder,
                 index: Optional[SnapshotIndex]) -> None:
        self.prefixes = options.asset_hosts
        self._limit = options.max_asset_mb * 1024 * 1024
        self._http = http
        self._root = root
        self._recorder = recorder
        self._earlier = earlier_assets(index)
        self._requested: Dict[Tuple[str, str], concurrent.futures.Future[AssetOutcome]] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(ASSET_WORKERS, thread_name_prefix="coda-asset")
        self._finisher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="coda-asset-finish")

    def request(self, folder: PurePosixPath, doc_id: str, url: str) -> concurrent.futures.Future[AssetOutcome]:
        """Start saving a URL into a doc's assets/ unless that is already under way."""
        with self._lock:
            future = self._requested.get((str(folder), url))
            if future is None:
                future = self._pool.submit(self._save, folder, doc_id, url)
                self._requested[(str(folder), url)] = future
            return future

    def follow(self, job: Job, doc_id: str, entry: Union[PageEntry, TableEntry], urls: List[str],
               rewrite: bool) -> None:
        """Save these URLs for a page or table entry; its `assets` are filled in when they are done."""
        if not urls:
            entry.assets = []
            return
        folder = doc_folder_of(PurePosixPath(entry.path))
        futures = [(url, self.request(folder, doc_id, url)) for url in urls]
        self._finisher.submit(finish_assets, job, doc_id, entry, futures, rewrite)

    def abort(self) -> None:
        self._http.abort()

    def close(self, cancelled: bool) -> None:
        """Wait for every download and finisher (after a cancel: drop the queued ones)."""
        if cancelled:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._finisher.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        self._http.close()

    def _save(self, folder: PurePosixPath, doc_id: str, url: str) -> AssetOutcome:
        try:
            record = self._link_earlier(folder, doc_id, url) or self._download(folder, url)
        except Cancelled:
            raise
        except AssetGone as exc:
            return AssetOutcome("gone", f"gone at the source ({exc})")
        except AssetTooLarge as exc:
            return AssetOutcome("too_large", f"larger than --max-asset-mb ({exc})")
        except Exception as exc:  # the network after retries, a refused redirect: recorded (a full disk stops the run)
            cause = exc.__cause__ if isinstance(exc, AssetDiskError) else exc  # the OSError it wraps
            reason = disk_trouble(cause) if cause is not None else None
            if reason is not None:
                self._http.halt("disk", reason)
                raise Cancelled(reason) from exc
            LOG.debug("asset %s failed", _redact_url(url), exc_info=True)
            return AssetOutcome("failed", (exc.message if isinstance(exc, ApiError) else str(exc))
                                or exc.__class__.__name__)
        self._recorder.count("assets")
        self._recorder.count("asset_bytes", record.size)
        return AssetOutcome("saved", record=record)

    def _link_earlier(self, folder: PurePosixPath, doc_id: str, url: str) -> Optional[AssetRecord]:
        """Link the file an earlier snapshot saved for this URL (the URL carries the content
        hash, so it is the same file); None when there is none or it is not intact."""
        earlier = self._earlier.get((doc_id, url))
        if earlier is None:
            return None
        root, record = earlier
        relative = folder / ASSET_FOLDER / PurePosixPath(record["path"]).name
        try:
            source = inside(root, PurePosixPath(record["path"]))
            if not file_matches(source, record):
                return None
            link_or_copy(source, inside(self._root, relative))
        except (OSError, BackupError) as exc:
            LOG.debug("cannot link asset %s from %s (%s); downloading it", record["path"], root.name, exc)
            return None
        return AssetRecord.from_json(dict(record, path=str(relative)))

    def _download(self, folder: PurePosixPath, url: str) -> AssetRecord:
        def accept(raw: http.client.HTTPResponse) -> AssetRecord:
            if raw.status in (404, 410):
                raise AssetGone(f"HTTP {raw.status}")
            if raw.status != 200:
                raise ApiError(raw.status, "unexpected answer from the asset host", _redact_url(url))
            length = raw.getheader("content-length", "")
            if length.strip().isdigit() and int(length) > self._limit:
                raise AssetTooLarge(f"{int(length)} bytes")
            content_type = (raw.getheader("content-type") or "application/octet-stream").strip()[:200]
            relative = folder / ASSET_FOLDER / asset_file_name(url, content_type)
            try:
                with content_file(inside(self._root, relative)) as handle:
                    size, digest = copy_limited(lambda n: _read_network(raw, n), handle, self._limit)
            except OSError as exc:
                raise AssetDiskError(f"cannot write {relative}: {exc}") from exc
            return AssetRecord(url, str(relative), size, digest, content_type)

        record: AssetRecord = self._http.get_streamed(url, accept, lambda target: may_follow_redirect(
            target, self.prefixes))
        return record


def earlier_assets(index: Optional[SnapshotIndex]) -> Dict[Tuple[str, str], Tuple[Path, Dict[str, Any]]]:
    """(doc id, URL) -> (snapshot root, record) of every sound asset record of the saved copies
    reuse would take each page and table from (the newest intact one)."""
    found: Dict[Tuple[str, str], Tuple[Path, Dict[str, Any]]] = {}
    if index is None:
        return found
    for (doc_id, _), copy in list(index.pages.items()) + list(index.tables.items()):
        saved = copy.entry.get("assets")
        for record in saved if isinstance(saved, list) else []:
            if valid_asset_record(record):
                found.setdefault((doc_id, record["url"]), (copy.snapshot, record))
    return found


def finish_assets(job: Job, doc_id: str, entry: Union[PageEntry, TableEntry],
                  futures: List[Tuple[str, concurrent.futures.Future[AssetOutcome]]], rewrite: bool) -> None:
    """Once an object's downloads are done: rewrite a page's links, fill `assets`, and record
    what was skipped (gone, too large) or failed (which the next --incremental run retries)."""
    kind = "page" if rewrite else ("view" if isinstance(entry, TableEntry) and entry.table_type == "view" else "table")
    saved: Dict[str, AssetRecord] = {}
    errors: List[str] = []
    try:
        for url, future in futures:
            try:
                outcome = future.result()
            except (Cancelled, concurrent.futures.CancelledError):
                return
            if outcome.status == "saved" and outcome.record is not None:
                saved[url] = outcome.record
            elif outcome.status == "failed":
                errors.append(url)
                job.recorder.fail("asset", f"{kind} asset {url}: {outcome.reason}",
                                  doc_id=doc_id, object_id=entry.id, name=entry.name)
            else:
                job.recorder.skip(Skipped("asset", doc_id, f"{url}: {outcome.reason}", object_id=entry.id,
                                          name=entry.name, url=url))
        if rewrite and saved:
            rewrite_page_files(job, entry, saved)
    except Exception as exc:  # a bug: recorded, the run goes on (a full disk stops it)
        stop_on_disk_trouble(job, exc)
        LOG.debug("assets of %s failed", entry.id, exc_info=True)
        errors.extend(saved)
        job.recorder.fail("asset", f"{kind} assets: {exc}", doc_id=doc_id, object_id=entry.id,
                          name=entry.name)
    entry.assets = sorted({record.path: record for record in saved.values()}.values(),
                          key=lambda record: record.path)
    if errors:
        entry.asset_errors = sorted(errors)


def rewrite_page_files(job: Job, entry: Union[PageEntry, TableEntry], saved: Dict[str, AssetRecord]) -> None:
    """Point each saved asset's links in the page files at the file, relative to the page."""
    for index, record in enumerate(entry.files):
        relative = PurePosixPath(record.path)
        text = inside(job.root, relative).read_bytes().decode("utf-8", "surrogateescape")
        paths = {url: posixpath.relpath(asset.path, str(relative.parent)) for url, asset in saved.items()}
        rewritten = rewrite_links(text, record.role, paths)
        if rewritten != text:
            entry.files[index] = job.write_bytes(relative, rewritten.encode("utf-8", "surrogateescape"), record.role)
            stamp_with_coda_time(inside(job.root, relative), entry.updated_at)


def save_page_assets(job: Job, doc_id: str, entry: PageEntry) -> None:
    """Hand the asset URLs of a freshly exported page to the store (read back from its files)."""
    if job.assets is None:
        return
    urls: Dict[str, None] = {}
    for record in entry.files:
        text = inside(job.root, PurePosixPath(record.path)).read_bytes().decode("utf-8", "surrogateescape")
        urls.update(dict.fromkeys(page_asset_urls(text, record.role, job.assets.prefixes)))
    job.assets.follow(job, doc_id, entry, list(urls), rewrite=True)


def carry_assets(job: Job, doc_id: str, entry: Union[PageEntry, TableEntry], previous: Dict[str, Any]) -> None:
    """An unchanged page or table brings its assets along (linked, see AssetStore._link_earlier)."""
    if job.assets is not None:
        job.assets.follow(job, doc_id, entry, [record["url"] for record in previous.get("assets", [])], rewrite=False)


class CellAssets:
    """Collects the asset URLs in a table's image and attachment cells while its rows stream by,
    and starts their downloads at once; the CSV keeps the URLs."""

    def __init__(self, job: Job, doc_id: str, stem: PurePosixPath, columns: List[Dict[str, Any]]) -> None:
        assert job.assets is not None
        self._job, self._store, self._doc_id = job, job.assets, doc_id
        self._folder = doc_folder_of(stem)
        self._column_ids = asset_column_ids(columns)
        self._urls: Dict[str, None] = {}

    def scan(self, rows: Iterator[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        for row in rows:
            values = row.get("values")
            if isinstance(values, dict):
                for column_id in self._column_ids:
                    for url in cell_asset_urls(values.get(column_id), self._store.prefixes):
                        if url not in self._urls:
                            self._urls[url] = None
                            self._store.request(self._folder, self._doc_id, url)
            yield row

    def save(self, entry: TableEntry) -> None:
        self._store.follow(self._job, self._doc_id, entry, list(self._urls), rewrite=False)


def link_doc_assets(job: Job, saved: SavedCopy) -> None:
    """The assets of a doc linked whole from an earlier snapshot (same folder, same paths;
    checked with the doc's other files)."""
    if job.assets is None:
        return
    seen = set()
    for child in saved.entry["pages"] + saved.entry["tables"]:
        for record in child.get("assets", []):
            if record["path"] in seen:
                continue
            seen.add(record["path"])
            relative = PurePosixPath(record["path"])
            link_or_copy(inside(saved.snapshot, relative), inside(job.root, relative))
            job.recorder.count("assets")
            job.recorder.count("asset_bytes", record["size"])


def asset_client_settings(options: Options) -> ClientSettings:
    """The asset client: the run's retries and timeouts, no pacing (no Coda limit applies)."""
    return ClientSettings(api_url=options.api_url, max_retries=options.max_retries, timeout=options.timeout,
                          retry_delay=options.retry_delay, rate_limits=None, max_in_flight=ASSET_WORKERS)


# --- Snapshots and manifest ---------------------------------------------------


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def create_snapshot(output: Path, now: dt.datetime) -> Path:
    """Make `DIR/<UTC timestamp>/`; a second run in the same second gets -2, -3, ...

    The number is always above any already used in that second (even if an
    older one was pruned), so names keep sorting in the order runs started.
    """
    base = now.strftime(SNAPSHOT_TIME_FORMAT)
    used = [number for stamp, number in map(snapshot_key, snapshot_folders(output)) if stamp == base]
    first = max(used, default=0) + 1
    for number in range(first, first + 1000):
        candidate = output / (base if number == 1 else f"{base}-{number}")
        try:
            candidate.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return candidate
    raise FatalError(f"could not create a snapshot folder in {output}")


def read_latest(output: Path) -> Optional[Path]:
    """The snapshot `latest` names: latest.txt first (works everywhere), then the symlink."""
    names = []
    with contextlib.suppress(OSError, UnicodeDecodeError):
        names.append((output / LATEST_TXT).read_text(encoding="utf-8").strip())
    with contextlib.suppress(OSError):
        names.append(Path(os.readlink(output / LATEST_LINK)).name)
    for name in names:
        if SNAPSHOT_NAME_RE.match(name) and (output / name).is_dir():
            return output / name
    return None


def point_latest(output: Path, snapshot: Path) -> None:
    """Move `latest` to a finished snapshot: latest.txt always, a symlink where the OS allows.

    Both are replaced atomically, so a reader never finds `latest` missing or
    half-written.
    """
    write_bytes_atomic(output / LATEST_TXT, (snapshot.name + "\n").encode("utf-8"))
    link = output / LATEST_LINK
    if os.name == "nt":  # symlinks need privileges there, and a directory link cannot be replaced
        with contextlib.suppress(OSError):
            if link.is_symlink():
                link.unlink()
        return
    temp = output / f".latest-{os.getpid()}"
    try:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        os.symlink(snapshot.name, temp, target_is_directory=True)
        os.replace(temp, link)
    except (OSError, NotImplementedError) as exc:
        LOG.debug("no latest symlink (%s); latest.txt names the snapshot", exc)
        with contextlib.suppress(OSError):
            temp.unlink()
        if link.is_symlink():
            with contextlib.suppress(OSError):
                link.unlink()


def try_os_lock(handle: IO[str]) -> bool:
    """Take an exclusive, non-blocking OS lock on an open file; False if another process has it.

    The OS drops the lock when its holder dies, however it dies (kill -9, a reboot), so a
    crashed run never leaves the folder locked, and a reused pid cannot fool anybody.
    """
    if sys.platform == "win32":
        import msvcrt

        handle.seek(WINDOWS_LOCK_OFFSET)  # Windows locks are mandatory: keep the JSON readable
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:  # e.g. NFS without a lock daemon
        LOG.warning("this file system cannot lock %s (%s); two runs at once would not be noticed",
                    handle.name, exc.strerror or exc)
    return True


def release_os_lock(handle: IO[str]) -> None:
    """Windows frees a lock left at close only "after a delay": unlock at once."""
    if sys.platform == "win32":
        import msvcrt

        handle.seek(WINDOWS_LOCK_OFFSET)
        with contextlib.suppress(OSError):
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)


class RunLock:
    """`DIR/.lock` held for a run's whole life: an OS lock on the open file, and inside it the
    holder's pid, host and start time, for the message a second run prints.

    A lock file whose OS lock nobody holds was left by a run that died: it is taken over with
    a warning.
    """

    def __init__(self, output: Path) -> None:
        self.path = output / LOCK_NAME
        self._handle: Optional[IO[str]] = None

    def __enter__(self) -> "RunLock":
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            handle = os.fdopen(fd, "r+", encoding="utf-8")
            if not try_os_lock(handle):
                holder = self._holder(handle)
                handle.close()
                raise LockedError(f"another run ({holder}) holds {self.path}")
            if self._still_the_lock_file(handle):
                break
            handle.close()  # the holder removed it as we opened it: start over on the new file
        else:
            raise LockedError(f"could not take the lock {self.path}")
        left = self._holder(handle)
        if left != "unknown holder":
            LOG.warning("taking over the lock left by a run that is gone (%s)", left)
        handle.seek(0)
        handle.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started_at": iso(utc_now())}, handle)
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is None:
            return
        if os.name == "posix":  # remove it while still holding it, so no one locks a dead file
            with contextlib.suppress(OSError):
                self.path.unlink()
        release_os_lock(self._handle)
        self._handle.close()
        self._handle = None
        if os.name != "posix":
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _still_the_lock_file(self, handle: IO[str]) -> bool:
        try:
            return os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path))
        except OSError:
            return False

    @staticmethod
    def _holder(handle: IO[str]) -> str:
        try:
            handle.seek(0)
            info = json.loads(handle.read() or "null")
            return f"pid {info['pid']} on {info['host']}, started {info.get('started_at')}"
        except (OSError, ValueError, KeyError, TypeError):
            return "unknown holder"


def snapshot_folders(output: Path) -> List[Path]:
    """Snapshot folders in --output, oldest first (names sort by time; -2, -3 after the plain one)."""
    if not output.is_dir():
        return []
    found = [path for path in output.iterdir() if SNAPSHOT_NAME_RE.match(path.name) and path.is_dir()]
    return sorted(found, key=snapshot_key)


def snapshot_key(folder: Path) -> Tuple[str, int]:
    """(timestamp, number in that second): `2026-03-07T101530Z-2` -> ("2026-03-07T101530Z", 2)."""
    stamp, _, number = folder.name.partition("Z-")
    return (stamp + "Z", int(number)) if number else (folder.name, 1)


def read_summary(snapshot: Path) -> Dict[str, Any]:
    """A snapshot's summary.json, or a stand-in saying why there is none."""
    try:
        summary = json.loads((snapshot / SUMMARY_NAME).read_text(encoding="utf-8"))
        if isinstance(summary, dict):
            return summary
    except (OSError, ValueError):
        pass
    return {"status": "unknown"}


def folder_sizes(folder: Path) -> Tuple[int, int]:
    """Bytes of all files, and of files not hard-linked from another snapshot (what deleting frees)."""
    total = unique = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            info = path.lstat()
            if path.is_file() and not path.is_symlink():
                total += info.st_size
                unique += info.st_size if info.st_nlink == 1 else 0
    return total, unique


def describe_runs(output: Path, protected: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
    """Every snapshot with status, times, counts, failures, size and why retention keeps it
    (`protected`: name -> reason), newest first."""
    latest = read_latest(output)
    runs = []
    for folder in reversed(snapshot_folders(output)):
        summary = read_summary(folder)
        size, unique = folder_sizes(folder)
        counts = summary.get("counts") if isinstance(summary.get("counts"), dict) else {}
        runs.append({
            "snapshot": folder.name,
            "latest": latest is not None and folder.name == latest.name,
            "status": summary.get("status", "unknown"),
            "started_at": summary.get("started_at"),
            "duration_s": summary.get("duration_s"),
            "counts": counts,
            "failures": len(summary["failures"]) if isinstance(summary.get("failures"), list) else 0,
            "size_bytes": size,
            "unique_bytes": unique,
            "zip": (output / f"{folder.name}.zip").is_file(),
            "protected": (protected or {}).get(folder.name),
        })
    return runs


def prune_snapshots(output: Path, policy: RetentionPolicy, keep_vanished: int,
                    current: Optional[Path] = None) -> List[str]:
    """Delete the snapshots the retention plan does not keep (see plan_retention and
    retention_plan); return their names. Only the lock holder calls this. A deletion that
    fails is logged and the others go on.
    """
    for leftover in output.glob(".deleting-*"):  # a prune cut short; we hold the lock
        with contextlib.suppress(OSError):
            remove_tree(leftover)
    removed = []
    for decision in retention_plan(output, policy, keep_vanished, current):
        if decision.keep:
            continue
        LOG.info("retention: removing snapshot %s (%s)", decision.name, ", ".join(decision.reasons))
        try:
            delete_snapshot(output, decision.name)
        except OSError as exc:
            LOG.warning("retention: could not remove %s: %s", decision.name, exc)
            continue
        removed.append(decision.name)
    return removed


def mark_abandoned(output: Path, warn: Callable[[str], None] = LOG.warning) -> None:
    """Relabel snapshots left `running` by a run that died (kill -9, Task Scheduler's End,
    a power cut) as `abandoned`, and remove the scratch folders of its change report: only the
    lock holder may call this, so none of them runs."""
    for leftover in output.glob(".tmp-diff-*"):
        with contextlib.suppress(OSError):
            remove_tree(leftover)
    for folder in snapshot_folders(output):
        summary = read_summary(folder)
        if summary.get("status") == "running":
            warn(f"snapshot {folder.name} was left unfinished by a run that is gone; marking it abandoned")
            summary["status"] = "abandoned"
            with contextlib.suppress(OSError):
                write_json_atomic(folder / SUMMARY_NAME, summary)


def zip_snapshot(snapshot: Path) -> Path:
    """Write `<snapshot>.zip` beside the folder (ZIP64, deflate), atomically."""
    target = snapshot.parent / f"{snapshot.name}.zip"
    with atomic_file(target) as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        for path in sorted(snapshot.rglob("*")):
            if path.is_file() and not path.name.startswith(".tmp-"):
                archive.write(path, f"{snapshot.name}/{path.relative_to(snapshot).as_posix()}")
    return target


def manifest_files(manifest: Dict[str, Any]) -> Iterator[Any]:
    yield from manifest.get("index", [])
    for doc in manifest.get("docs", []):
        yield from doc.get("files", [])
        for child in doc.get("pages", []) + doc.get("tables", []):
            yield from child.get("files", [])
            yield from child.get("assets", [])


def verify_snapshot(snapshot: Path) -> List[str]:
    """Re-hash every file the manifest lists; return one line per missing or altered file."""
    try:
        manifest = manifest_json(snapshot)
        records = list(manifest_files(manifest))
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        return [f"{MANIFEST_NAME}: unreadable ({exc})"]
    problems = []
    for record in records:
        if not isinstance(record, dict):
            problems.append(f"{MANIFEST_NAME}: a file record is not an object")
            continue
        relative = PurePosixPath(str(record.get("path")))
        try:
            actual = file_record(snapshot, relative)
        except FileNotFoundError:
            problems.append(f"missing: {relative}")
            continue
        except (OSError, BackupError) as exc:
            problems.append(f"unreadable: {relative} ({exc})")
            continue
        if (actual["size"], actual["sha256"]) != (record.get("size"), record.get("sha256")):
            problems.append(f"altered: {relative}")
    return problems


# --- Vanished objects ---------------------------------------------------------


@dataclass
class Listed:
    """Ids this run's listings returned. None, or no key, where a listing failed, was cut
    short or never ran: nothing it would have listed can be judged vanished."""

    docs: Optional[set[str]] = None
    pages: Dict[str, Optional[set[str]]] = field(default_factory=dict)  # by doc id
    tables: Dict[str, Optional[set[str]]] = field(default_factory=dict)  # tables and views, by doc id


def listed_ids(items: List[Dict[str, Any]], problem: Optional[BackupError]) -> Optional[set[str]]:
    return None if problem is not None else {item["id"] for item in items}


@dataclass(frozen=True)
class Known:
    """One object a snapshot holds, as its manifest names it."""

    kind: str  # doc, page, table or view
    doc_id: str
    id: str
    name: Optional[str]
    hidden: bool = False  # a page hidden itself or below a hidden page
    saved: bool = True  # its files are in the snapshot (not a failed or skipped entry)


@dataclass(frozen=True)
class KnownSnapshot:
    """What one snapshot holds, read from its manifest alone: the other side of a comparison."""

    name: str
    include_shared: bool
    workspace_id: Optional[str]
    docs: Tuple[Known, ...]
    children: Dict[str, Tuple[Known, ...]]  # doc id -> its pages, tables and views

    def holds(self, kind: str, doc_id: str, object_id: str) -> bool:
        """Whether this snapshot has the object's files (a failed entry does not count)."""
        objects = self.docs if kind == "doc" else self.children.get(doc_id, ())
        return any(known.kind == kind and known.doc_id == doc_id and known.id == object_id and known.saved
                   for known in objects)


def read_known_snapshot(snapshot: Path) -> Optional[KnownSnapshot]:
    """A snapshot's objects, or None with a warning when its manifest cannot be read."""
    try:
        manifest = manifest_json(snapshot)
        return known_snapshot(snapshot.name, manifest)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        LOG.warning("cannot read %s (%s); nothing is judged vanished against it", snapshot / MANIFEST_NAME, exc)
        return None


def known_snapshot(name: str, manifest: Dict[str, Any]) -> KnownSnapshot:
    """Read ids, names and kinds from a manifest; ValueError when a needed field is missing."""
    options = manifest.get("options")
    if not isinstance(options, dict) or not isinstance(manifest.get("docs"), list):
        raise ValueError("manifest without options or docs")
    docs: List[Known] = []
    children: Dict[str, Tuple[Known, ...]] = {}
    for doc in manifest["docs"]:
        doc_id = _known_id(doc)
        docs.append(Known("doc", doc_id, doc_id, _known_name(doc), saved=_saved(doc)))
        if not isinstance(doc.get("pages"), list) or not isinstance(doc.get("tables"), list):
            raise ValueError(f"doc {doc_id!r} without pages or tables")
        hidden = hidden_page_ids(doc["pages"])
        kids = [Known("page", doc_id, _known_id(page), _known_name(page), page["id"] in hidden, _saved(page))
                for page in doc["pages"]]
        kids += [Known("view" if table.get("tableType") == "view" else "table", doc_id, _known_id(table),
                       _known_name(table), saved=_saved(table)) for table in doc["tables"]]
        children[doc_id] = tuple(kids)
    workspace = options.get("workspace_id")
    return KnownSnapshot(name, options.get("include_shared") is True,
                         workspace if isinstance(workspace, str) else None, tuple(docs), children)


def _known_id(entry: Any) -> str:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
        raise ValueError("manifest entry without an id")
    return str(entry["id"])


def _saved(entry: Dict[str, Any]) -> bool:
    return entry.get("status") != "failed" and bool(entry.get("files"))


def _known_name(entry: Dict[str, Any]) -> Optional[str]:
    return None if entry.get("name") is None else str(entry["name"])


def hidden_page_ids(pages: List[Any]) -> set[str]:
    """Pages that --skip-hidden-pages leaves out: hidden, or below a hidden page (any depth)."""
    parents = {page["id"]: page.get("parentId") for page in pages if isinstance(page, dict) and "id" in page}
    hidden_self = {page["id"] for page in pages if isinstance(page, dict) and page.get("isHidden") is True}
    hidden = set()
    for page_id in parents:
        node, seen = page_id, set()
        while isinstance(node, str) and node not in seen:
            if node in hidden_self:
                hidden.add(page_id)
                break
            seen.add(node)
            node = parents.get(node)
    return hidden


@dataclass(frozen=True)
class VanishedReport:
    """What vanished since a snapshot, and how much was compared (for the deletion guard)."""

    snapshot: str
    entries: Tuple[Vanished, ...]
    docs_compared: int
    in_docs: Dict[str, Tuple[Optional[str], int, int]]  # doc id -> (name, vanished, compared) below it


def find_vanished(before: KnownSnapshot, listed: Listed, options: Options) -> VanishedReport:
    """Objects `before` holds that this run's listings no longer return.

    Only what this run's selection would have included is judged: a doc left out by --doc or
    --exclude-doc, a view under --no-views, a table under --exclude-table, a hidden page under
    --skip-hidden-pages, and anything below a listing that failed, was cut short or did not run
    are not vanished. Neither is a doc missing from a doc list narrower than `before`'s (no
    --include-shared now, or another --workspace-id). A vanished doc is one entry: its pages
    and tables are not listed again.
    """
    docs_comparable = listed.docs is not None and (options.include_shared or not before.include_shared) \
        and options.workspace_id in (None, before.workspace_id)
    entries: List[Vanished] = []
    docs_compared = 0
    in_docs: Dict[str, Tuple[Optional[str], int, int]] = {}

    def gone(known: Known) -> None:
        entries.append(Vanished(known.kind, known.doc_id, known.id, known.name, before.name))

    for doc in before.docs:
        if any(value in (doc.id, doc.name) for value in options.exclude_docs) or \
                (options.docs and not any(value in (doc.id, doc.name) for value in options.docs)):
            continue
        if listed.docs is None or doc.id not in listed.docs:
            if docs_comparable:
                docs_compared += 1
                gone(doc)
            continue
        docs_compared += 1
        vanished = compared = 0
        for child in before.children.get(doc.id, ()):
            ids = (listed.pages if child.kind == "page" else listed.tables).get(doc.id)
            if ids is None or not _selected(options, doc, child):
                continue
            compared += 1
            if child.id not in ids:
                vanished += 1
                gone(child)
        in_docs[doc.id] = (doc.name, vanished, compared)
    return VanishedReport(before.name, tuple(entries), docs_compared, in_docs)


def _selected(options: Options, doc: Known, child: Known) -> bool:
    if child.kind == "page":
        return not (options.skip_hidden_pages and child.hidden)
    return table_wanted(options, doc.id, doc.name, child.id, child.name, child.kind == "view")


def vanished_counts(entries: List[Vanished]) -> Dict[str, int]:
    counts = {"docs": 0, "pages": 0, "tables": 0, "views": 0}
    for entry in entries:
        counts[entry.kind + "s"] += 1
    return counts


def deletion_guard(report: VanishedReport, max_vanished: float) -> Optional[str]:
    """Why this run must not become latest (in the spirit of rclone --max-delete), or None.

    Trips when more than `max_vanished` percent of the compared docs vanished, or, within one
    doc, more than that share of its compared pages, tables and views and at least
    VANISHED_MIN_OBJECTS of them.
    """
    reasons = []
    docs = sum(1 for entry in report.entries if entry.kind == "doc")
    if docs and docs * 100 > max_vanished * report.docs_compared:
        reasons.append(f"{docs} of {report.docs_compared} docs")
    for doc_id, (name, vanished, compared) in report.in_docs.items():
        if vanished >= VANISHED_MIN_OBJECTS and vanished * 100 > max_vanished * compared:
            reasons.append(f"{vanished} of {compared} pages, tables and views of doc {printable(name)} ({doc_id})")
    if not reasons:
        return None
    return (f"{'; '.join(reasons)} vanished since snapshot {report.snapshot}, "
            f"more than --max-vanished {max_vanished:g}%")


def check_vanished(options: Options, recorder: RunRecorder, now: dt.datetime) -> bool:
    """Compare this run's listings with the snapshot `latest` names: record what vanished in
    the summary and in DIR/vanished.json, and apply the deletion guard.

    True when the guard tripped: the run is then `completed_with_errors` with a failure of
    kind `vanished`, and must neither become latest nor prune.
    """
    latest = read_latest(options.output)
    baseline = vanished_baseline(options.output, options, latest)
    before = read_known_snapshot(baseline) if baseline is not None else None
    if latest is None or before is None:
        return False
    report = find_vanished(before, recorder.listed, options)
    recorder.vanished = list(report.entries)
    log_vanished(report, recorder.warn)
    try:
        record_vanished(options.output, list(report.entries), now, options.keep_vanished)
    except OSError as exc:  # the summary still lists them; the next run tries again
        LOG.warning("cannot update %s: %s", options.output / VANISHED_NAME, exc)
    reason = deletion_guard(report, options.max_vanished)
    if reason is None:
        return False
    if options.allow_vanished:
        recorder.warn(f"{reason}; accepted by --allow-vanished")
        return False
    recorder.fail("vanished", f"{reason}; latest stays at {latest.name}, nothing is pruned "
                  "(run again with --allow-vanished to accept the deletions)", name="deletion guard")
    return True


def vanished_baseline(output: Path, options: Options, latest: Optional[Path]) -> Optional[Path]:
    """The snapshot a run's listings are compared with: `latest`, unless latest backed up other
    docs than this run does (a one-off --doc run) while an earlier snapshot of this run's own
    selection could have become latest (it finished and the guard did not hold it back): then
    that one. Against the narrower latest, a nightly run would see nothing vanish from the docs
    it left out, and the deletion guard would never trip."""
    mine = selection_key(options)
    if latest is None or _selection_of(latest) in (mine, None):
        return latest
    for folder in reversed(snapshot_folders(output)):
        summary = read_summary(folder)
        held = any(failure.get("kind") == "vanished" for failure in _entries(summary.get("failures")))
        if summary.get("status") in FINISHED_STATUSES and not held and _selection_of(folder) == mine:
            return folder
    return latest


def _selection_of(snapshot: Path) -> Optional[Dict[str, Any]]:
    """The doc selection a snapshot's manifest records (see selection_key), or None."""
    options = _mapping(load_manifest(snapshot)).get("options")
    return selection_key_of(options) if isinstance(options, dict) else None


def log_vanished(report: VanishedReport, warn: Callable[[str], None]) -> None:
    """A warning per vanished doc and one counting the rest (RunRecorder.warn: log and summary)."""
    for entry in report.entries:
        if entry.kind == "doc":
            warn(f"doc {printable(entry.name)} ({printable(entry.object_id)}) vanished: snapshot "
                 f"{report.snapshot} holds it, Coda no longer lists it")
    counts = vanished_counts(list(report.entries))
    if counts["pages"] or counts["tables"] or counts["views"]:
        warn(f"{counts['pages']} page(s), {counts['tables']} table(s) and {counts['views']} view(s) vanished "
             f"since snapshot {report.snapshot} (see vanished in summary.json)")


def read_vanished(output: Path) -> List[Dict[str, Any]]:
    """DIR/vanished.json's entries; none (with a warning) when it is damaged."""
    path = output / VANISHED_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        LOG.warning("cannot read %s (%s); it will be written again", path, exc)
        return []
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        LOG.warning("%s has no entries list; it will be written again", path)
        return []
    return [entry for entry in entries if _vanished_entry_ok(entry)]


def _vanished_entry_ok(entry: Any) -> bool:
    return (isinstance(entry, dict) and entry.get("kind") in ("doc", "page", "table", "view")
            and all(isinstance(entry.get(key), str) for key in ("doc_id", "id", "last_snapshot", "vanished_at"))
            and SNAPSHOT_NAME_RE.match(entry["last_snapshot"]) is not None
            and parse_iso(entry["vanished_at"]) is not None)


def parse_iso(text: str) -> Optional[dt.datetime]:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


def merge_vanished(known: List[Dict[str, Any]], found: List[Dict[str, Any]], now: dt.datetime,
                   days: int) -> List[Dict[str, Any]]:
    """The record after a run, in vanished.json's JSON form (Vanished.as_json plus `vanished_at`):
    what was known plus what this run found (an object already recorded from the same snapshot
    keeps its first date), minus what is older than `days`."""
    def key(entry: Dict[str, Any]) -> Tuple[str, str, str, str]:
        return entry["kind"], entry["doc_id"], entry["id"], entry["last_snapshot"]

    merged = list(known)
    seen = {key(entry) for entry in known}
    for entry in found:
        if key(entry) not in seen:
            seen.add(key(entry))
            merged.append(dict(entry, vanished_at=iso(now)))
    return [entry for entry in merged if _within(entry, now, days)]


def _within(entry: Dict[str, Any], now: dt.datetime, days: int) -> bool:
    when = parse_iso(entry["vanished_at"])
    return when is not None and now - when < dt.timedelta(days=days)


def record_vanished(output: Path, found: List[Vanished], now: dt.datetime, days: int) -> None:
    """Keep DIR/vanished.json, rewritten atomically: it outlives the snapshots that noticed."""
    known = read_vanished(output)
    entries = merge_vanished(known, [item.as_json() for item in found], now, days)
    if entries != known:
        write_json_atomic(output / VANISHED_NAME, {"version": VANISHED_VERSION, "entries": entries})


def protected_snapshots(entries: List[Dict[str, Any]], names: List[str], now: dt.datetime, days: int,
                        holds: Callable[[str, Dict[str, Any]], bool]) -> Dict[str, str]:
    """Snapshot name -> why retention must keep it: it is the newest snapshot still holding an
    object that vanished less than `days` ago.

    That is the newest snapshot, from the entry's last_snapshot back, that `holds(name, entry)`
    says has the object's files: last_snapshot itself unless it is gone or its copy had failed.
    `names` are the snapshots on disk.
    """
    newest_first = sorted(names, key=lambda name: snapshot_key(Path(name)), reverse=True)
    held: Dict[str, List[Dict[str, Any]]] = {}
    for entry in entries:
        if not _within(entry, now, days):
            continue
        last = snapshot_key(Path(entry["last_snapshot"]))
        for name in newest_first:
            if snapshot_key(Path(name)) <= last and holds(name, entry):
                held.setdefault(name, []).append(entry)
                break
    reasons = {}
    for name, objects in held.items():
        until = max(parse_iso(entry["vanished_at"]) or now for entry in objects) + dt.timedelta(days=days)
        shown = ", ".join(f"{entry['kind']} {printable(entry.get('name'))} ({printable(entry['id'])})"
                          for entry in objects[:3])
        more = f" and {len(objects) - 3} more" if len(objects) > 3 else ""
        reasons[name] = (f"newest copy of {shown}{more}, which vanished from Coda; "
                         f"kept until {until.date().isoformat()} (--keep-vanished {days})")
    return reasons


def vanished_protection(output: Path, now: dt.datetime, days: int) -> Dict[str, str]:
    """Snapshot name -> reason, for retention: see protected_snapshots."""
    if days <= 0:
        return {}
    cache: Dict[str, Optional[KnownSnapshot]] = {}

    def holds(name: str, entry: Dict[str, Any]) -> bool:
        if name not in cache:
            cache[name] = read_known_snapshot(output / name)
        known = cache[name]
        return known is not None and known.holds(entry["kind"], entry["doc_id"], entry["id"])

    names = [folder.name for folder in snapshot_folders(output)]
    return protected_snapshots(read_vanished(output), names, now, days, holds)


# --- History: changes, diff, retention, find ----------------------------------
#
# Everything here reads snapshots and never writes into one (deleting a whole one
# is retention's job). Manifests are read defensively and only for the fields
# history needs, so entries that other versions of the tool extend (fetchedAt,
# reusedFrom, assets ...) or damage are taken for what they still say.

HISTORY_KINDS = ("docs", "pages", "tables", "views")
DIFF_EXAMPLES = 10  # row ids shown per kind of row change
ROW_BATCH = 5000  # rows inserted into the scratch database at a time
NUL_STAND_IN = "\ufffe"  # csv on Python < 3.11 cannot read NUL; a noncharacter stands in for it


@dataclass(frozen=True)
class HistoryObject:
    """One doc, page, table or view as a manifest records it."""

    kind: str  # docs, pages, tables or views
    doc_id: str
    doc_name: str
    id: str
    name: str
    path: str
    status: str
    updated_at: Optional[str]
    files: Tuple[Tuple[str, str, str], ...]  # (role, path, sha256)

    def file_for(self, *roles: str) -> Optional[str]:
        for role in roles:
            for file_role, path, _ in self.files:
                if file_role == role:
                    return path
        return None

    def fingerprint(self) -> Tuple[Any, ...]:
        return (self.name, tuple(sorted((role, sha) for role, _, sha in self.files)))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _entries(value: Any) -> List[Dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _mapping(value: Any) -> Dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> Tuple[str, ...]:
    return tuple(item for item in value if isinstance(item, str)) if isinstance(value, list) else ()


def _history_files(entry: Dict[str, Any]) -> Tuple[Tuple[str, str, str], ...]:
    """(role, path, sha256) of an entry's files and of its assets (issue 14), where present."""
    found = [(_text(r.get("role")), _text(r.get("path")), _text(r.get("sha256"))) for r in _entries(entry.get("files"))]
    found += [("asset", _text(a.get("path")), _text(a.get("sha256"))) for a in _entries(entry.get("assets"))]
    return tuple(found)


def _manifest_docs(manifest: Any) -> List[Dict[str, Any]]:
    return [doc for doc in _entries(_mapping(manifest).get("docs")) if isinstance(doc.get("id"), str)]


def read_objects(manifest: Any) -> Dict[str, Dict[Tuple[str, str], HistoryObject]]:
    """A manifest's objects by kind and (doc id, id); anything of the wrong shape is skipped."""
    objects: Dict[str, Dict[Tuple[str, str], HistoryObject]] = {kind: {} for kind in HISTORY_KINDS}
    for doc in _manifest_docs(manifest):
        doc_id, doc_name = doc["id"], _text(doc.get("name"))
        children = [("docs", doc)] + [("pages", page) for page in _entries(doc.get("pages"))]
        children += [("views" if table.get("tableType") == "view" else "tables", table)
                     for table in _entries(doc.get("tables"))]
        for kind, entry in children:
            if isinstance(entry.get("id"), str):
                updated = entry.get("updatedAt")
                objects[kind][(doc_id, entry["id"])] = HistoryObject(
                    kind, doc_id, doc_name, entry["id"], _text(entry.get("name")), _text(entry.get("path")),
                    _text(entry.get("status")), updated if isinstance(updated, str) else None, _history_files(entry))
    return objects


def manifest_listing(manifest: Any) -> Listed:
    """What the run that wrote a manifest listed, as far as the manifest tells: the ids it holds,
    and nothing below a doc that failed (one of its listings may have)."""
    docs = _manifest_docs(manifest)
    listed = Listed(docs={doc["id"] for doc in docs})
    for doc in docs:
        failed = doc.get("status") == "failed"
        listed.pages[doc["id"]] = None if failed else {p["id"] for p in _entries(doc.get("pages")) if "id" in p}
        listed.tables[doc["id"]] = None if failed else {t["id"] for t in _entries(doc.get("tables")) if "id" in t}
    return listed


def manifest_selection(manifest: Any) -> Options:
    """The selection a manifest records, as the Options find_vanished reads (a manifest without
    `docs`/`exclude_docs`, from an older version, selected every doc)."""
    options = _mapping(_mapping(manifest).get("options"))
    layout = _mapping(options.get("layout"))
    workspace = options.get("workspace_id")
    return Options(output=Path(), include_shared=options.get("include_shared") is True,
                   workspace_id=workspace if isinstance(workspace, str) else None,
                   skip_hidden_pages=layout.get("skip_hidden_pages") is True, no_views=layout.get("no_views") is True,
                   exclude_tables=_strings(layout.get("exclude_tables")), docs=_strings(options.get("docs")),
                   exclude_docs=_strings(options.get("exclude_docs")))


@dataclass(frozen=True)
class Comparison:
    """Per kind, what is new, what is gone and what differs (pairs of old and new)."""

    added: Dict[str, List[HistoryObject]]
    removed: Dict[str, List[HistoryObject]]
    changed: Dict[str, List[Tuple[HistoryObject, HistoryObject]]]

    def counts(self) -> Dict[str, Dict[str, int]]:
        return {kind: {"added": len(self.added[kind]), "changed": len(self.changed[kind]),
                       "removed": len(self.removed[kind])} for kind in HISTORY_KINDS}


def compare_manifests(old_name: str, old: Any, new: Any) -> Comparison:
    """The pure comparison behind summary `changes` and --diff.

    Added: in `new` only. Changed: in both, with files that differ by sha256 (or another name).
    Removed: what "Nights that go wrong" calls vanished, decided by find_vanished with the new
    manifest standing in for the listings, so a doc, view, table or page the new run's selection
    left out, and anything below a doc that failed, is not removed.
    """
    before, after = read_objects(old), read_objects(new)
    added = {kind: [obj for key, obj in after[kind].items() if key not in before[kind]] for kind in HISTORY_KINDS}
    changed = {kind: [(before[kind][key], obj) for key, obj in after[kind].items()
                      if key in before[kind] and before[kind][key].fingerprint() != obj.fingerprint()]
               for kind in HISTORY_KINDS}
    removed: Dict[str, List[HistoryObject]] = {kind: [] for kind in HISTORY_KINDS}
    try:
        known = known_snapshot(old_name, old)
    except (ValueError, KeyError, TypeError, AttributeError):  # no (usable) old manifest: nothing to lose
        known = None
    if known is not None:
        for entry in find_vanished(known, manifest_listing(new), manifest_selection(new)).entries:
            obj = before[entry.kind + "s"].get((entry.doc_id, entry.object_id))
            if obj is not None:
                removed[obj.kind].append(obj)
    return Comparison(added, removed, changed)


# -- rows and lines

@dataclass(frozen=True)
class RowDiff:
    """How two CSV files of one table differ, by `_row_id`, with a few example ids of each."""

    added: int = 0
    removed: int = 0
    changed: int = 0
    columns_added: Tuple[str, ...] = ()
    columns_removed: Tuple[str, ...] = ()
    examples: Dict[str, List[str]] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return {"rows": {"added": self.added, "removed": self.removed, "changed": self.changed},
                "columns": {"added": list(self.columns_added), "removed": list(self.columns_removed)},
                "examples": self.examples}


def _csv_records(path: Path) -> Iterator[List[str]]:
    """CSV rows of a file the tool wrote, NUL read as a stand-in (csv cannot, before 3.11)."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # a long text cell is not an error
    with open(path, encoding="utf-8", newline="") as handle:
        lines = (line.replace("\x00", NUL_STAND_IN) for line in handle)
        yield from csv.reader(lines)


def diff_rows(old_csv: Path, new_csv: Path, scratch: Optional[Path] = None) -> RowDiff:
    """Compare two CSVs of one table by `_row_id` in a temporary SQLite file.

    Memory stays flat whatever the size: each row is kept as its id, its position and a
    hash of the columns both files have (so an added column does not make every row
    "changed", and a row that only moved is not changed either). Only counts and the first
    few ids of each kind leave the database.
    """
    old_rows, new_rows = _csv_records(old_csv), _csv_records(new_csv)
    old_header, new_header = next(old_rows, []), next(new_rows, [])
    common = [name for name in old_header if name in new_header and name != "_row_index" and name != "_row_id"]
    with tempfile.TemporaryDirectory(prefix=".tmp-diff-", dir=scratch) as folder:
        db = sqlite3.connect(str(Path(folder) / "rows.sqlite"))
        try:
            db.execute("PRAGMA journal_mode = OFF")
            db.execute("PRAGMA synchronous = OFF")
            for name, header, rows in (("old", old_header, old_rows), ("new", new_header, new_rows)):
                db.execute(f"CREATE TABLE {name} (id TEXT PRIMARY KEY, pos INTEGER, h INTEGER) WITHOUT ROWID")
                _load_rows(db, name, header, [header.index(column) for column in common], rows)
            counts = {kind: db.execute(query).fetchone()[0] for kind, query in _ROW_QUERIES.items()}
            examples = {kind: [printable(row[0].replace(NUL_STAND_IN, "\x00"))
                               for row in db.execute(f"{query} ORDER BY pos LIMIT {DIFF_EXAMPLES}")]
                        for kind, query in _ROW_EXAMPLE_QUERIES.items()}
        finally:
            db.close()
    meta = set(CSV_META_HEADER)
    return RowDiff(counts["added"], counts["removed"], counts["changed"],
                   tuple(n for n in new_header if n not in old_header and n not in meta),
                   tuple(n for n in old_header if n not in new_header and n not in meta), examples)


_ROW_EXAMPLE_QUERIES = {
    "added": "SELECT n.id, n.pos AS pos FROM new n LEFT JOIN old o ON o.id = n.id WHERE o.id IS NULL",
    "removed": "SELECT o.id, o.pos AS pos FROM old o LEFT JOIN new n ON n.id = o.id WHERE n.id IS NULL",
    "changed": "SELECT n.id, n.pos AS pos FROM new n JOIN old o ON o.id = n.id WHERE o.h != n.h",
}
_ROW_QUERIES = {kind: f"SELECT COUNT(*) FROM ({query})" for kind, query in _ROW_EXAMPLE_QUERIES.items()}


def _load_rows(db: sqlite3.Connection, name: str, header: List[str], columns: List[int],
               rows: Iterator[List[str]]) -> None:
    """Insert (id, position, hash of the common columns) per row. Python's own hash of the cells
    is fast and, within one process, the same for the same cells; a change that keeps it equal
    has a chance of 1 in 2**64."""
    id_column = header.index("_row_id") if "_row_id" in header else 0
    width = len(header)
    cells = operator.itemgetter(*columns) if columns else (lambda row: ())
    batch: List[Tuple[str, int, int]] = []
    for position, row in enumerate(rows):
        if len(row) < width:
            row = row + [""] * (width - len(row))
        batch.append((row[id_column], position, hash(cells(row))))
        if len(batch) >= ROW_BATCH:
            db.executemany(f"INSERT OR REPLACE INTO {name} VALUES (?, ?, ?)", batch)
            batch.clear()
    db.executemany(f"INSERT OR REPLACE INTO {name} VALUES (?, ?, ?)", batch)


def diff_lines(old_file: Path, new_file: Path) -> Tuple[int, int]:
    """Lines added and removed between two versions of a page, counted as multisets (like
    `diff --stat`, without the quadratic alignment)."""
    def lines(path: Path) -> Counter[str]:
        with open(path, encoding="utf-8", errors="replace", newline="") as handle:
            return Counter(line.rstrip("\r\n") for line in handle)

    before, after = lines(old_file), lines(new_file)
    return sum((after - before).values()), sum((before - after).values())


# -- the change report of a run, and --diff

def load_manifest(snapshot: Path) -> Any:
    """A snapshot's manifest as JSON, or None when it is missing or unreadable."""
    try:
        return manifest_json(snapshot)
    except (OSError, ValueError):
        return None


def _table_diffs(comparison: Comparison, old_root: Path, new_root: Path, kinds: Tuple[str, ...],
                 scratch: Optional[Path], only_read: bool = False) -> Iterator[Tuple[HistoryObject, RowDiff]]:
    """Row diffs of changed tables whose CSVs both snapshots hold (with `only_read`: only
    those this run read, not linked)."""
    for kind in kinds:
        for before, after in comparison.changed[kind]:
            old_csv, new_csv = before.file_for("csv"), after.file_for("csv")
            if old_csv is None or new_csv is None or (only_read and after.status != "ok"):
                continue
            try:
                yield after, diff_rows(inside(old_root, PurePosixPath(old_csv)),
                                       inside(new_root, PurePosixPath(new_csv)), scratch)
            except (OSError, ValueError, csv.Error, sqlite3.Error, BackupError) as exc:
                LOG.warning("rows of %s %s not compared: %s", kind[:-1], printable(after.name), exc)


def change_report(previous: Optional[Path], previous_manifest: Any, manifest: Dict[str, Any], snapshot: Path,
                  scratch: Path) -> Dict[str, Any]:
    """summary.json `changes`: this run's manifest against the snapshot `latest` named when it
    started (everything is `added` on a first run). `rows` sums the base tables read this run
    whose CSV differs from the previous one; tables that appeared or vanished add no rows."""
    comparison = compare_manifests(previous.name if previous else "", previous_manifest, manifest)
    changes: Dict[str, Any] = dict(comparison.counts())
    rows = {"added": 0, "changed": 0, "removed": 0}
    if previous is not None:
        for _, diff in _table_diffs(comparison, previous, snapshot, ("tables",), scratch, only_read=True):
            rows = {"added": rows["added"] + diff.added, "changed": rows["changed"] + diff.changed,
                    "removed": rows["removed"] + diff.removed}
    changes["rows"] = rows
    changes["since"] = previous.name if previous is not None else None
    return changes


def describe_changes(changes: Dict[str, Any]) -> str:
    """The change report in words, for the log."""
    parts = [f"{kind} {changes[kind]['added']} added, {changes[kind]['changed']} changed, "
             f"{changes[kind]['removed']} removed" for kind in HISTORY_KINDS + ("rows",)]
    since = changes.get("since")
    return f"changes since {since or 'nothing (first snapshot)'}: " + "; ".join(parts)


def diff_snapshots(old_root: Path, new_root: Path, scratch: Optional[Path] = None) -> Dict[str, Any]:
    """--diff: what differs between two snapshots, as plain data (the JSON of --diff --json)."""
    comparison = compare_manifests(old_root.name, load_manifest(old_root), load_manifest(new_root))
    rows = {(obj.kind, obj.doc_id, obj.id): diff for obj, diff in
            _table_diffs(comparison, old_root, new_root, ("tables", "views"), scratch)}
    result: Dict[str, Any] = {"old": old_root.name, "new": new_root.name, "counts": comparison.counts()}
    for kind in HISTORY_KINDS:
        changed = []
        for before, after in comparison.changed[kind]:
            item = _object_json(after)
            if before.name != after.name:
                item["old_name"] = before.name
            if kind == "pages":
                item["lines"] = _page_lines(before, after, old_root, new_root)
            diff = rows.get((kind, after.doc_id, after.id))
            if diff is not None:
                item.update(diff.as_dict())
            changed.append(item)
        result[kind] = {"added": [_object_json(obj) for obj in comparison.added[kind]],
                        "removed": [_object_json(obj) for obj in comparison.removed[kind]],
                        "changed": changed}
    return result


def _object_json(obj: HistoryObject) -> Dict[str, Any]:
    return {"doc_id": obj.doc_id, "doc_name": obj.doc_name, "id": obj.id, "name": obj.name, "path": obj.path,
            "status": obj.status, "updatedAt": obj.updated_at}


def _page_lines(before: HistoryObject, after: HistoryObject, old_root: Path,
                new_root: Path) -> Optional[Dict[str, int]]:
    old_file, new_file = before.file_for("markdown", "html"), after.file_for("markdown", "html")
    if old_file is None or new_file is None:
        return None
    try:
        added, removed = diff_lines(inside(old_root, PurePosixPath(old_file)),
                                    inside(new_root, PurePosixPath(new_file)))
    except (OSError, BackupError) as exc:
        LOG.warning("lines of page %s not compared: %s", printable(after.name), exc)
        return None
    return {"added": added, "removed": removed}


def format_diff(diff: Dict[str, Any]) -> List[str]:
    """--diff as text: one count line per kind, then one line per object (+ added, - removed,
    ~ changed) with rows, columns and lines where known."""
    lines = [f"diff {diff['old']} -> {diff['new']}"]
    for kind in HISTORY_KINDS:
        counts = diff["counts"][kind]
        lines.append(f"{kind + ':':<7} {counts['added']} added, {counts['removed']} removed, "
                     f"{counts['changed']} changed")
    for kind in HISTORY_KINDS:
        label = kind[:-1]
        for mark, bucket in (("+", "added"), ("-", "removed"), ("~", "changed")):
            for item in diff[kind][bucket]:
                where = printable(item["name"]) if kind == "docs" else \
                    f"{printable(item['doc_name'])} / {printable(item['name'])}"
                lines.append(f"{mark} {label:<5} {where} ({printable(item['id'])})" + _change_detail(item))
                lines.extend(_row_examples(item))
    return lines


def _change_detail(item: Dict[str, Any]) -> str:
    details = []
    if "old_name" in item:
        details.append(f"renamed from {printable(item['old_name'])}")
    if item.get("lines"):
        details.append(f"lines +{item['lines']['added']} -{item['lines']['removed']}")
    if "rows" in item:
        rows = item["rows"]
        details.append(f"rows +{rows['added']} -{rows['removed']} ~{rows['changed']}")
        columns = ["+" + printable(name) for name in item["columns"]["added"]]
        columns += ["-" + printable(name) for name in item["columns"]["removed"]]
        if columns:
            details.append("columns " + " ".join(columns))
    return ": " + "; ".join(details) if details else ""


def _row_examples(item: Dict[str, Any]) -> List[str]:
    examples = item.get("examples") or {}
    return [f"    {kind} rows: {', '.join(examples[kind])}" for kind in ("added", "removed", "changed")
            if examples.get(kind)]


# -- retention


@dataclass(frozen=True)
class SnapshotRecord:
    """What the planner knows of a snapshot: its folder name, start time and status."""

    name: str
    time: dt.datetime
    status: str
    selection: str = ""  # the docs its run backed up (selection_key): rules count within one selection


@dataclass(frozen=True)
class RetentionDecision:
    name: str
    keep: bool
    reasons: Tuple[str, ...]


def snapshot_time(name: str) -> Optional[dt.datetime]:
    """The UTC start a snapshot folder's name carries (`2026-03-07T101530Z-2` -> 10:15:30)."""
    try:
        return dt.datetime.strptime(name.split("Z")[0] + "Z", SNAPSHOT_TIME_FORMAT).replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


_BUCKETS: Tuple[Tuple[str, Callable[[dt.datetime], Tuple[int, ...]]], ...] = (
    ("daily", lambda moment: (moment.year, moment.month, moment.day)),
    ("weekly", lambda moment: tuple(moment.isocalendar())[:2]),  # ISO year and week
    ("monthly", lambda moment: (moment.year, moment.month)),
)


def plan_retention(records: List[SnapshotRecord], policy: RetentionPolicy, latest: Optional[str] = None,
                   protected: Optional[Dict[str, str]] = None) -> List[RetentionDecision]:
    """Which snapshots to keep and why, newest first, like `restic forget`.

    Only `completed` snapshots count toward a rule: --keep-last N keeps the newest N;
    --keep-daily/weekly/monthly N keep the newest of each of the last N days, ISO weeks or
    months that have one; --keep-within D keeps those less than D days older than the newest
    completed snapshot (not than now: a backup that stopped running is not pruned away). The
    union is kept. Like restic's grouping by paths, the rules count within each `selection`
    (the docs a run backed up): a one-off `--doc X` run never pushes out the last snapshot of
    the other docs. `latest`, running snapshots and `protected` ones (name -> reason) are never
    deleted. An unfinished snapshot (errors, failed, cancelled) newer than the oldest one kept
    (of its selection) stays too: nights with errors never cost the good snapshots around
    them, and when nothing completed at all, nothing goes.
    """
    protected = protected or {}
    ordered = sorted(records, key=lambda record: (record.time, snapshot_key(Path(record.name))), reverse=True)
    reasons: Dict[str, List[str]] = {record.name: [] for record in ordered}
    selections: Dict[str, List[SnapshotRecord]] = {}
    for record in ordered:
        if record.status == "completed":
            selections.setdefault(record.selection, []).append(record)
    for completed in selections.values():
        _apply_rules(completed, policy, reasons)
    oldest: Dict[str, dt.datetime] = {}
    for selection, completed in selections.items():
        kept_times = [record.time for record in completed if reasons[record.name]]
        if kept_times:
            oldest[selection] = min(kept_times)
    decisions = []
    for record in ordered:
        why = reasons[record.name]
        oldest_kept = oldest.get(record.selection, min(oldest.values(), default=None))
        if record.name == latest:
            why.append("latest")
        if record.status == "running":
            why.append("running")
        if record.name in protected:
            why.append(protected[record.name])
        if record.status != "completed" and not why and (oldest_kept is None or record.time > oldest_kept):
            why.append(f"{record.status}, newer than the oldest kept snapshot" if oldest_kept
                       else f"{record.status}, no completed snapshot is kept")
        if why:
            decisions.append(RetentionDecision(record.name, True, tuple(why)))
        else:
            decisions.append(RetentionDecision(record.name, False, (
                "no rule keeps it" if record.status == "completed"
                else f"{record.status}, older than the oldest kept snapshot",)))
    return decisions


def _apply_rules(completed: List[SnapshotRecord], policy: RetentionPolicy, reasons: Dict[str, List[str]]) -> None:
    """The keep rules over the completed snapshots of one selection, newest first."""
    for record in completed[:policy.last or 0]:
        reasons[record.name].append("last")
    for label, bucket_of in _BUCKETS:
        wanted = getattr(policy, label) or 0
        seen: set[Tuple[int, ...]] = set()
        for record in completed:
            bucket = bucket_of(record.time)
            if bucket not in seen and len(seen) < wanted:
                reasons[record.name].append(label)
            seen.add(bucket)
    if policy.within_days is not None and completed:
        since = completed[0].time - dt.timedelta(days=policy.within_days)
        for record in completed:
            if record.time > since:
                reasons[record.name].append("within")


def retention_records(output: Path) -> List[SnapshotRecord]:
    """Every snapshot folder whose name is a valid time, with the status its summary gives and
    the doc selection its manifest records ("?" when it has none that can be read)."""
    records = []
    for folder in snapshot_folders(output):
        moment = snapshot_time(folder.name)
        if moment is not None:
            options = _mapping(load_manifest(folder)).get("options")
            selection = json.dumps(selection_key_of(options), sort_keys=True) if isinstance(options, dict) else "?"
            records.append(SnapshotRecord(folder.name, moment, str(read_summary(folder).get("status", "unknown")),
                                          selection))
    return records


def retention_plan(output: Path, policy: RetentionPolicy, keep_vanished: int,
                   current: Optional[Path] = None) -> List[RetentionDecision]:
    """The planner over the snapshots on disk. Protected: the run that is pruning, and the newest
    copy of what vanished less than `keep_vanished` days ago (see vanished_protection)."""
    latest = read_latest(output)
    protected = vanished_protection(output, utc_now(), keep_vanished)
    if current is not None:
        protected[current.name] = "this run"
    return plan_retention(retention_records(output), policy, latest.name if latest else None, protected)


def delete_snapshot(output: Path, name: str) -> None:
    """Rename a snapshot away, then delete it and its .zip: a deletion cut short never leaves a
    half snapshot that claims to be whole. Hard links make this safe: a file shared with a kept
    snapshot lives on there."""
    doomed = output / f".deleting-{name}"
    os.replace(output / name, doomed)
    with contextlib.suppress(FileNotFoundError):
        (output / f"{name}.zip").unlink()
    remove_tree(doomed)


# -- find

def find_objects(output: Path, pattern: str) -> List[Dict[str, Any]]:
    """--find: every doc, page, table or view whose name or id matches the glob (case
    insensitive), in every snapshot, newest first."""
    found = []
    for folder in reversed(snapshot_folders(output)):
        objects = read_objects(load_manifest(folder))
        for kind in HISTORY_KINDS:
            for obj in objects[kind].values():
                if fnmatch.fnmatchcase(obj.name.casefold(), pattern.casefold()) or fnmatch.fnmatchcase(obj.id, pattern):
                    found.append(dict(_object_json(obj), snapshot=folder.name, kind=kind[:-1]))
    return found


# --- Snapshot index (index.html) ----------------------------------------------

INDEX_NAME = "index.html"
BROWSE_DIR = "browse"  # per-doc pages and table previews, mirroring docs/
PREVIEW_ROWS = 100
PREVIEW_CELL_CHARS = 1000

INDEX_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:72em;padding:0 1em;
color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left;
vertical-align:top}th{background:#f4f4f4}.num{text-align:right}
.status{display:inline-block;padding:.1em .6em;border-radius:.3em;background:#eee;font-weight:bold}
.completed,.ok{background:#d9f2d9}.completed_with_errors,.unchanged{background:#fff1c2}
.failed,.cancelled,.abandoned,.running{background:#f8d0d0}.muted{color:#777}
ul.tree{list-style:none;padding-left:1.2em}code{background:#f4f4f4;padding:0 .2em}
.preview td{max-width:30em;overflow-wrap:anywhere;white-space:pre-wrap}
""".strip()


def link(from_page: PurePosixPath, target: PurePosixPath, text: Any) -> str:
    """An <a> from one snapshot file to another: relative, URL-quoted, the text HTML-escaped."""
    relative = posixpath.relpath(str(target), str(from_page.parent))
    return f'<a href="{html.escape(urllib.parse.quote(relative))}">{html.escape(str(text))}</a>'


def html_page(title: str, body: List[str]) -> str:
    """A self-contained page: inline CSS, no script, nothing fetched from anywhere."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{INDEX_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def status_badge(status: Any) -> str:
    text = str(status or "unknown")
    return f'<span class="status {html.escape(re.sub(r"[^a-z_]", "", text))}">{html.escape(text)}</span>'


def html_table(header: List[str], rows: List[List[str]], css: str = "") -> str:
    """A table from cells that are already HTML."""
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table{f" class={chr(34)}{css}{chr(34)}" if css else ""}><tr>{head}</tr>{body}</table>'


def doc_page_path(doc: Dict[str, Any]) -> PurePosixPath:
    return PurePosixPath(BROWSE_DIR, doc["path"] + ".html")


def preview_path(csv_path: PurePosixPath) -> PurePosixPath:
    return PurePosixPath(BROWSE_DIR, *csv_path.with_name(csv_path.name[:-len(".csv")] + ".html").parts)


def files_of(entry: Dict[str, Any], *roles: str) -> List[PurePosixPath]:
    return [PurePosixPath(record["path"]) for record in entry.get("files", []) if record.get("role") in roles]


def render_index(summary: Dict[str, Any], docs: List[Dict[str, Any]]) -> str:
    """index.html: the run first (status, times, counts, failures, vanished), then the docs."""
    here = PurePosixPath(INDEX_NAME)
    counts: Dict[str, Any] = summary["counts"] if isinstance(summary.get("counts"), dict) else {}
    title = f"Coda backup {summary.get('snapshot', '')}"
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>{status_badge(summary.get('status'))} started {html.escape(str(summary.get('started_at')))}, "
            f"finished {html.escape(str(summary.get('finished_at')))}, "
            f"{html.escape(str(summary.get('duration_s')))} s. "
            f"{link(here, PurePosixPath(SUMMARY_NAME), SUMMARY_NAME)} · "
            f"{link(here, PurePosixPath(MANIFEST_NAME), MANIFEST_NAME)}</p>"]
    shown = [(key, value) for key, value in counts.items() if isinstance(value, int)]
    body.append(html_table([html.escape(key) for key, _ in shown], [[str(value) for _, value in shown]]))
    failures = [f for f in summary.get("failures") or [] if isinstance(f, dict)]
    body.append(f"<h2>Failures ({len(failures)})</h2>")
    body.append(html_table(["kind", "doc", "id", "name", "error"],
                           [[html.escape(str(f.get(key) or "")) for key in ("kind", "doc_id", "id", "name", "error")]
                            for f in failures]) if failures else '<p class="muted">None.</p>')
    vanished = [v for v in summary.get("vanished") or [] if isinstance(v, dict)]
    if vanished:
        body.append(f"<h2>Vanished since the last backup ({len(vanished)})</h2>")
        body.append(html_table(["kind", "doc", "id", "name", "last seen in"],
                               [[html.escape(str(v.get(key) or ""))
                                 for key in ("kind", "doc_id", "id", "name", "last_snapshot")] for v in vanished]))
    body.append(f"<h2>Docs ({len(docs)})</h2>")
    rows = []
    for doc in docs:
        tables = [t for t in doc.get("tables", []) if t.get("tableType") != "view"]
        views = [t for t in doc.get("tables", []) if t.get("tableType") == "view"]
        rows.append([link(here, doc_page_path(doc), doc.get("name") or doc["id"]), status_badge(doc.get("status")),
                     str(len(doc.get("pages", []))), str(len(tables)), str(len(views)),
                     str(sum(t.get("rowCount") or 0 for t in doc.get("tables", []))),
                     html.escape(str(doc.get("updatedAt") or ""))])
    body.append(html_table(["doc", "status", "pages", "tables", "views", "rows", "updated in Coda"], rows)
                if rows else '<p class="muted">No docs in this snapshot.</p>')
    return html_page(title, body)


def render_doc_page(doc: Dict[str, Any]) -> str:
    """One doc: its files, its page tree (links to the page files) and its tables and views."""
    here = doc_page_path(doc)
    name = str(doc.get("name") or doc["id"])
    body = [f"<p>{link(here, PurePosixPath(INDEX_NAME), '← all docs')}</p>",
            f"<h1>{html.escape(name)}</h1>",
            f"<p>{status_badge(doc.get('status'))} id <code>{html.escape(doc['id'])}</code>, updated in Coda "
            f"{html.escape(str(doc.get('updatedAt') or '?'))}"
            + (f", error: {html.escape(str(doc['error']))}" if doc.get("error") else "") + "</p>",
            "<p>Files: " + " · ".join(link(here, path, path.name) for path in files_of(doc, *DOC_FILES)) + "</p>",
            "<h2>Pages</h2>", page_tree(here, doc.get("pages", [])),
            "<h2>Tables and views</h2>"]
    rows = []
    for table in doc.get("tables", []):
        csv_files = files_of(table, "csv")
        rows.append([html.escape(str(table.get("tableType") or "table")), html.escape(str(table.get("name") or "")),
                     html.escape(str(table.get("parentPageName") or "")),
                     str(table.get("rowCount") if table.get("rowCount") is not None else ""),
                     status_badge(table.get("status")),
                     " ".join([link(here, path, "CSV") for path in csv_files]
                              + [link(here, preview_path(path), "preview") for path in csv_files])])
    body.append(html_table(["kind", "name", "on page", "rows", "status", "files"], rows)
                if rows else '<p class="muted">None.</p>')
    return html_page(name, body)


def page_tree(here: PurePosixPath, pages: List[Dict[str, Any]]) -> str:
    """Nested lists in page order, each page linking to its files; a page whose parent is
    missing goes to the top, and so does a page caught in a cycle of parents."""
    ids = {page["id"] for page in pages}
    children: Dict[Optional[str], List[Dict[str, Any]]] = {}
    for page in pages:
        parent = page.get("parentId")
        children.setdefault(parent if parent in ids and parent != page["id"] else None, []).append(page)
    placed: set[str] = set()

    def item(page: Dict[str, Any]) -> str:
        placed.add(page["id"])
        files = files_of(page, *PAGE_ROLES)
        name = page.get("name") or page["id"]
        label = html.escape(str(name))
        if files:
            label = link(here, files[0], name) + "".join(
                " (" + link(here, path, path.suffix.lstrip(".")) + ")" for path in files[1:])
        note = "" if page.get("status") in ("ok", "unchanged") else " " + status_badge(page.get("status"))
        below = [item(child) for child in children.get(page["id"], []) if child["id"] not in placed]
        return f"<li>{label}{note}" + (f'<ul class="tree">{"".join(below)}</ul>' if below else "") + "</li>"

    items = [item(page) for page in children.get(None, []) if page["id"] not in placed]
    items += [item(page) for page in pages if page["id"] not in placed]
    return f'<ul class="tree">{"".join(items)}</ul>' if items else '<p class="muted">None.</p>'


def read_csv_preview(path: Path, limit: int = PREVIEW_ROWS) -> Tuple[List[str], List[List[str]], Optional[str]]:
    """Header and the first `limit` rows of a CSV, read as a stream; a row the reader cannot
    parse ends the preview with a note (the file itself is whole)."""
    header: List[str] = []
    rows: List[List[str]] = []
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as handle:
            # csv cannot read NUL before Python 3.11; a browser would show U+FFFD for it anyway
            for number, row in enumerate(csv.reader(line.replace("\x00", "\ufffd") for line in handle)):
                if number == 0:
                    header = row
                elif number > limit:
                    break
                else:
                    rows.append(row)
    except (OSError, csv.Error) as exc:
        return header, rows, f"preview stops here: {exc}"
    return header, rows, None


def render_preview(doc: Dict[str, Any], table: Dict[str, Any], csv_path: PurePosixPath, header: List[str],
                   rows: List[List[str]], problem: Optional[str]) -> str:
    here = preview_path(csv_path)
    name = str(table.get("name") or table["id"])

    def cell(text: str) -> str:
        return html.escape(text[:PREVIEW_CELL_CHARS] + ("…" if len(text) > PREVIEW_CELL_CHARS else ""))

    total = table.get("rowCount")
    body = [f"<p>{link(here, PurePosixPath(INDEX_NAME), '← all docs')} · "
            f"{link(here, doc_page_path(doc), doc.get('name') or doc['id'])}</p>",
            f"<h1>{html.escape(name)}</h1>",
            f"<p>{html.escape(str(table.get('tableType') or 'table'))}, the first {len(rows)} of "
            f"{html.escape(str(total if total is not None else '?'))} rows; all of them: "
            f"{link(here, csv_path, csv_path.name)}</p>"]
    if problem:
        body.append(f"<p>{html.escape(problem)}</p>")
    body.append(html_table([cell(text) for text in header], [[cell(text) for text in row] for row in rows],
                           "preview"))
    return html_page(f"{name} (preview)", body)


def write_snapshot_index(snapshot: Path, summary: Dict[str, Any], docs: List[Dict[str, Any]]) -> List[FileRecord]:
    """Write index.html, a page per doc and a preview per table; return their manifest records.

    Built only from the summary, the manifest entries and the CSVs on disk, so an incremental
    run rebuilds it without a request. Index files are never reused from another snapshot.
    """
    records: List[FileRecord] = []

    def put(relative: PurePosixPath, text: str) -> None:
        with content_file(inside(snapshot, relative)) as handle:  # read-only, like all content
            handle.write(text.encode("utf-8"))
        records.append(handle.record(relative, "index"))

    for doc in docs:
        put(doc_page_path(doc), render_doc_page(doc))
        for table in doc.get("tables", []):
            for csv_path in files_of(table, "csv"):
                header, rows, problem = read_csv_preview(inside(snapshot, csv_path))
                put(preview_path(csv_path), render_preview(doc, table, csv_path, header, rows, problem))
    put(PurePosixPath(INDEX_NAME), render_index(summary, docs))
    return records


# --- Run: progress and monitoring ---------------------------------------------


class StatusLine:
    """stderr for a person at a terminal: one live status line that log lines scroll above.

    The logging handler writes through it, so a log line first clears the
    status line and the status is drawn again below it.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._text = ""
        self._lock = threading.Lock()

    def write(self, data: str) -> int:
        with self._lock:
            self._stream.write("\r\x1b[K" + data)
            if data.endswith("\n") and self._text:
                self._stream.write(self._text)
            self._stream.flush()
        return len(data)

    def flush(self) -> None:
        self._stream.flush()

    def show(self, text: str) -> None:
        with self._lock:
            self._text = text
            self._stream.write("\r\x1b[K" + text)
            self._stream.flush()

    def width(self) -> int:
        """Columns of the terminal, asked each time (windows get resized); 80 if unknown."""
        columns = 0
        with contextlib.suppress(OSError, ValueError, AttributeError):
            columns = os.get_terminal_size(self._stream.fileno()).columns
        return columns if columns > 0 else shutil.get_terminal_size().columns


class Monitor:
    """Background heartbeat of a run: the progress line and a `running` summary.json.

    Another process (or a person) can watch a long run by reading
    summary.json, which is rewritten every SUMMARY_EVERY seconds.
    """

    SUMMARY_EVERY = 5.0
    DRAW_EVERY = 0.5

    def __init__(self, write_summary: Callable[[], None], recorder: RunRecorder, stats: RequestStats,
                 status_line: Optional[StatusLine]) -> None:
        self._write_summary = write_summary
        self._recorder = recorder
        self._stats = stats
        self._line = status_line
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="coda-monitor", daemon=True)

    def __enter__(self) -> "Monitor":
        self._write_summary()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        if self._line is not None:
            self._line.show("")

    def _loop(self) -> None:
        last_summary = time.monotonic()
        while not self._stop.wait(self.DRAW_EVERY):
            if self._line is not None:
                # One column spare: some terminals wrap when the last column is written.
                self._line.show(self.progress_text(self._line.width() - 1))
            if time.monotonic() - last_summary >= self.SUMMARY_EVERY:
                last_summary = time.monotonic()
                with contextlib.suppress(OSError):
                    self._write_summary()

    def progress_text(self, width: int = 1000) -> str:
        counts = self._recorder.as_counts()
        requests = self._stats.as_dict()
        elapsed = max(0.001, time.monotonic() - self._started)
        queued, settled = self._recorder.queued, self._recorder.settled
        eta: Optional[float] = None
        if settled and queued > settled:
            eta = elapsed * (queued - settled) / settled
        elif queued and queued == settled:
            eta = 0.0
        return progress_line(Progress(
            elapsed=elapsed, eta=eta, docs=counts["docs"], docs_total=self._recorder.docs_total,
            objects_done=settled, objects_queued=queued, rows=counts["rows"],
            waiting=tuple(self._stats.waiting()), requests_per_s=requests["total"] / elapsed,
            rate_limited=requests["rate_limited"], failures=counts["failures"]), width)


@dataclass(frozen=True)
class Progress:
    """What the progress line shows, taken at one moment."""

    elapsed: float
    eta: Optional[float]
    docs: int
    docs_total: Optional[int]
    objects_done: int
    objects_queued: int
    rows: int
    waiting: Tuple[str, ...] = ()
    requests_per_s: float = 0.0
    rate_limited: int = 0
    failures: int = 0


RATE_LIMIT_NAMES = {"read": "read limit", "write": "write limit", "list_docs": "doc-listing limit"}


def progress_line(progress: Progress, width: int) -> str:
    """The progress line, at most `width` characters, the most important parts first.

    Parts that do not fit are left out whole (a line that wraps leaves stale copies behind
    on the terminal); only a first part wider than the terminal is cut.
    """
    parts = [
        format_duration(progress.elapsed),
        "ETA " + ("?" if progress.eta is None else format_duration(progress.eta)),
        f"docs {progress.docs}/{'?' if progress.docs_total is None else progress.docs_total}",
        f"objects {progress.objects_done}/{progress.objects_queued}",
        f"rows {progress.rows:,}",
    ]
    if progress.waiting:
        parts.append("waiting: " + ", ".join(RATE_LIMIT_NAMES.get(name, name) for name in progress.waiting))
    parts += [f"failures {progress.failures}", f"{progress.requests_per_s:.1f} req/s",
              f"429s {progress.rate_limited}"]
    line = ""
    for part in parts:
        candidate = f"{line} | {part}" if line else part
        if len(candidate) > width:
            break
        line = candidate
    return line or parts[0][:max(0, width)]


def format_duration(seconds: float) -> str:
    """45s, 12m03s, 2h05m: short enough for a status line."""
    whole = int(max(0.0, seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class Pinger:
    """--ping-url, the healthchecks.io convention: `URL/start` when a run starts, `URL` when it
    ends with exit 0, `URL/<exit code>` otherwise, each a POST with a short plain-text body.

    A ping must never hurt the backup: a short timeout, one more try only for answers a retry
    may cure, and a failure is a logged warning. The URL is a secret (it holds the check's key),
    so logs show only scheme and host; the Coda token is never in it, nor in a body.
    """

    def __init__(self, url: str, secret: str, timeout: float = PING_TIMEOUT,
                 retry_pause: float = PING_RETRY_PAUSE) -> None:
        if secret and secret in url:
            raise ConfigError("--ping-url must not contain the Coda API token")
        self.url = url
        self.timeout = min(PING_TIMEOUT, timeout)
        self.attempts = PING_ATTEMPTS
        self.retry_pause = min(PING_RETRY_PAUSE, retry_pause)
        self.finished = False
        self._secret = secret

    @classmethod
    def for_options(cls, options: Options, secret: str) -> "Optional[Pinger]":
        """A pinger for --ping-url, or None; it waits no longer than an API request would."""
        if options.ping_url is None:
            return None
        return cls(options.ping_url, secret, options.timeout, options.retry_delay)

    def start(self) -> Optional[str]:
        """The start ping; returns the warning when it failed, for the run's summary."""
        return self._send(ping_target(self.url, "start"),
                          f"coda-backup {__version__} started on {socket.gethostname()}\n")

    def finish(self, code: int, summary: Dict[str, Any]) -> None:
        """The end ping, once per run, whatever path the run took to its exit code. The run's
        records are written by then, so a failure is only logged."""
        if self.finished:
            return
        self.finished = True
        problem = self._send(ping_target(self.url, None if code == EXIT_OK else str(code)), ping_body(code, summary))
        if problem is not None:
            LOG.warning("%s", problem)

    def _send(self, url: str, body: str) -> Optional[str]:
        data = (body.replace(self._secret, "[redacted]") if self._secret else body).encode("utf-8")
        problem = "no attempt"
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.retry_pause)
            try:
                status = post_text(url, data, self.timeout)
            except socket.timeout:
                problem = f"no answer within {self.timeout:g}s"
                break  # a server that hangs once will hang again: do not wait twice
            except (OSError, http.client.HTTPException) as exc:
                problem = f"{exc.__class__.__name__}: {exc}".replace(url, redact_ping_url(url))
                continue
            if status < 300:
                return None
            problem = f"HTTP {status}"
            if status < 500:
                break
        return f"monitoring ping to {redact_ping_url(url)} failed ({problem}); the backup goes on"


def post_text(url: str, data: bytes, timeout: float) -> int:
    """POST a plain-text body; return the HTTP status. No credentials, no redirects followed."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.netloc, timeout=timeout, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    try:
        conn.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body=data,
                     headers={"Content-Type": "text/plain; charset=utf-8", "User-Agent": USER_AGENT})
        response = conn.getresponse()
        response.read(65536)
        return response.status
    finally:
        conn.close()


def ping_target(url: str, suffix: Optional[str]) -> str:
    """`URL/<suffix>` (before any query string), or URL itself for None."""
    if suffix is None:
        return url
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + suffix))


def redact_ping_url(url: str) -> str:
    """What a log may say about a ping URL: scheme and host, never the path that holds the key."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}/…"


def ping_body(code: int, summary: Dict[str, Any]) -> str:
    """A run's outcome in a few lines for the monitoring service: status, counts, duration,
    vanished objects, the error and the first failures."""
    counts: Dict[str, Any] = summary["counts"] if isinstance(summary.get("counts"), dict) else {}
    lines = [f"status: {summary.get('status', 'unknown')} (exit {code})"]
    if summary.get("snapshot"):
        lines.append(f"snapshot: {printable(summary['snapshot'])}")
    if isinstance(summary.get("duration_s"), (int, float)):
        lines.append(f"started: {summary.get('started_at')}, duration: {summary['duration_s']:.1f}s")
    shown = [f"{key} {counts[key]}" for key in ("docs", "pages", "tables", "views", "rows", "failures")
             if isinstance(counts.get(key), int)]
    vanished = counts.get("vanished")
    if isinstance(vanished, dict):
        vanished = sum(n for n in vanished.values() if isinstance(n, int))
    elif isinstance(summary.get("vanished"), list):
        vanished = len(summary["vanished"])
    if isinstance(vanished, int) and vanished:
        shown.append(f"vanished {vanished}")
    if shown:
        lines.append("counts: " + ", ".join(shown))
    if summary.get("error"):
        lines.append(f"error: {printable(summary['error'])[:500]}")
    failures = [f for f in summary.get("failures") or [] if isinstance(f, dict)]
    if failures:
        lines.append(f"failures (first {min(len(failures), PING_MAX_FAILURES)} of {len(failures)}):")
        for failure in failures[:PING_MAX_FAILURES]:
            where = " ".join(printable(failure.get(key)) for key in ("kind", "id") if failure.get(key))
            name = f' "{printable(failure["name"])}"' if failure.get("name") else ""
            lines.append(f"- {where}{name}: {printable(failure.get('error'))}"[:300])
    return "\n".join(lines) + "\n"


# --- Run: outcome and exit codes ----------------------------------------------


@dataclass(frozen=True)
class RunFacts:
    """What decide_outcome decides from."""

    failure_kinds: Tuple[str, ...] = ()
    fatal: Optional[str] = None  # the token refused, the API unreachable, a bug
    halt: Optional[Halt] = None  # the API lost, the disk full
    signal: Optional[int] = None  # the first SIGINT/SIGTERM received
    nothing_selected: bool = False  # --doc matched no doc


@dataclass(frozen=True)
class Outcome:
    """How a run ended. Status, exit code and error go into summary.json, manifest.json, the
    zip and last-run.json alike; the flags say what the end of the run may do."""

    status: str
    cause: str  # a key of EXIT_CODES
    error: Optional[str] = None  # one line, for failed and cancelled runs
    move_latest: bool = False  # `latest` may name this snapshot
    may_prune: bool = False  # --keep may delete old snapshots after this run
    discard_snapshot: bool = False  # remove what this run wrote (the disk refused it)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.cause]


# Failure kinds after which `latest` stays where it was (the deletion guard's `vanished`).
HOLD_LATEST_KINDS = frozenset({"vanished"})


def decide_outcome(facts: RunFacts) -> Outcome:
    """The one place that decides how a run ended: status, exit code (via EXIT_CODES), error,
    whether `latest` may move and whether old snapshots may be pruned.

    A halt (API lost, disk full) came before any signal (halt() keeps a cause only then); only a
    run without any failure may prune, so a bad night never pushes good backups out.
    """
    if facts.halt is not None:
        return Outcome("failed", facts.halt.kind, facts.halt.reason, discard_snapshot=facts.halt.kind == "disk")
    if facts.signal is not None:
        name = "SIGTERM" if facts.signal == signal.SIGTERM else "SIGINT"
        return Outcome("cancelled", name.lower(), f"cancelled by {name}")
    if facts.fatal is not None:
        return Outcome("failed", "fatal", facts.fatal)
    if facts.nothing_selected:
        return Outcome("failed", "nothing_selected", "nothing to back up: no doc matched --doc")
    if facts.failure_kinds:
        held = HOLD_LATEST_KINDS.intersection(facts.failure_kinds)
        return Outcome("completed_with_errors", "completed_with_errors", move_latest=not held)
    return Outcome("completed", "completed", move_latest=True, may_prune=True)


@dataclass
class RunState:
    """What the end of a run needs to know, filled in as the run goes."""

    options: Options
    recorder: RunRecorder
    stats: RequestStats
    started: dt.datetime
    secret: str  # cut out of every error text
    snapshot: Optional[Path] = None  # None until the folder exists
    docs: List[DocEntry] = field(default_factory=list)
    fatal: Optional[str] = None  # FatalError or a bug: the run cannot go on
    before: Optional[Path] = None  # the snapshot `latest` named at the start, for `changes`
    before_manifest: Any = None
    journal: Optional[Journal] = None  # manifest.partial.jsonl, removed once manifest.json is written
    pinger: Optional[Pinger] = None  # --ping-url: end_run sends the end ping

    def facts(self, halt: Optional[Halt], signals: List[int]) -> RunFacts:
        return RunFacts(
            failure_kinds=tuple(failure.kind for failure in self.recorder.failures),
            fatal=None if self.fatal is None else one_line(self.fatal, self.secret),
            halt=None if halt is None else Halt(halt.kind, one_line(halt.reason, self.secret)),
            signal=signals[0] if signals else None,
            nothing_selected=nothing_selected(self.options, self.docs, self.recorder),
        )

    def summary(self, outcome: Optional[Outcome] = None) -> Dict[str, Any]:
        assert self.snapshot is not None
        status = "running" if outcome is None else outcome.status
        return build_summary(status, self.started, self.recorder, self.stats, self.snapshot, outcome)

    def write_running_summary(self) -> None:
        assert self.snapshot is not None
        write_json_atomic(self.snapshot / SUMMARY_NAME, self.summary())

    def write_records(self, outcome: Outcome) -> None:
        """manifest.json, then summary.json (what says the run ended), both with the outcome."""
        assert self.snapshot is not None
        manifest = build_manifest(self.options, self.started, outcome.status, self.snapshot, self.docs)
        write_json_atomic(self.snapshot / MANIFEST_NAME, manifest)
        if self.journal is not None:
            self.journal.close(remove=True)
        if self.recorder.changes is None and outcome.status in ("completed", "completed_with_errors"):
            self.recorder.changes = run_changes(self.before, self.before_manifest, manifest, self.snapshot,
                                                self.recorder.vanished)
        if self.options.index:  # once the outcome is known; the manifest lists its files, for --verify
            index = write_index_or_warn(self.snapshot, self.summary(outcome), manifest["docs"], self.recorder.warn)
            manifest["index"] = [record.as_json() for record in index]
            write_json_atomic(self.snapshot / MANIFEST_NAME, manifest)
        write_json_atomic(self.snapshot / SUMMARY_NAME, self.summary(outcome))


def exit_code_for(exc: BaseException) -> int:
    """The exit code main() gives an error that ends a run early (for the end ping)."""
    for kind, code in ((ConfigError, EXIT_USAGE), (LockedError, EXIT_LOCKED), (KeyboardInterrupt, EXIT_SIGINT)):
        if isinstance(exc, kind):
            return code
    return EXIT_FATAL


def nothing_selected(options: Options, docs: List[DocEntry], recorder: RunRecorder) -> bool:
    """--doc matched no doc: the run did nothing, and must not become `latest`."""
    return bool(options.docs) and not docs and any(failure.kind == "filter" for failure in recorder.failures)


def build_summary(status: str, started: dt.datetime, recorder: RunRecorder, stats: RequestStats,
                  snapshot: Path, outcome: Optional[Outcome] = None) -> Dict[str, Any]:
    """summary.json (a Summary, as JSON): `running` while the run goes on (exit_code and error
    null), then its outcome."""
    finished = utc_now()
    return Summary(
        tool=f"coda-backup {__version__}",
        snapshot=snapshot.name,
        status=status,
        exit_code=outcome.exit_code if outcome is not None else None,
        error=outcome.error if outcome is not None else None,
        started_at=iso(started),
        finished_at=None if status == "running" else iso(finished),
        duration_s=round((finished - started).total_seconds(), 3),
        counts=recorder.as_counts(),
        failures=list(recorder.failures),
        skipped=list(recorder.skipped),
        vanished=list(recorder.vanished),
        warnings=list(recorder.warnings),
        requests=stats.as_dict(),
        changes=recorder.changes,
    ).as_json()


def build_manifest(options: Options, started: dt.datetime, status: str, snapshot: Path,
                   docs: List[DocEntry]) -> Dict[str, Any]:
    """manifest.json (a Manifest, as JSON); RunState.write_records adds the index files."""
    return Manifest(
        version=MANIFEST_VERSION,
        tool=f"coda-backup {__version__}",
        snapshot=snapshot.name,
        status=status,
        started_at=iso(started),
        finished_at=iso(utc_now()),
        options=manifest_options(options),
        docs=docs,
        index=[],
    ).as_json()


def manifest_options(options: Options) -> Dict[str, Any]:
    return {"layout": options.layout_key(), "include_shared": options.include_shared,
            "workspace_id": options.workspace_id, "incremental": options.incremental,
            "docs": list(options.docs), "exclude_docs": list(options.exclude_docs),
            "max_age_days": options.max_age_days}


def run_changes(before: Optional[Path], before_manifest: Any, manifest: Dict[str, Any], snapshot: Path,
                vanished: List[Vanished]) -> Optional[Dict[str, Any]]:
    """The change report, computed in a scratch folder inside --output (we hold its lock);
    `removed` is this run's `vanished`, counted alike. A report that cannot be made is a
    warning, never the run's failure."""
    if before is not None and not isinstance(before_manifest, dict):
        LOG.warning("no change report: the manifest of %s is unreadable", before.name)
        return None
    try:
        changes = change_report(before, before_manifest, manifest, snapshot, snapshot.parent)
    except (OSError, ValueError, sqlite3.Error, BackupError) as exc:
        LOG.warning("no change report: %s", exc)
        return None
    for kind, count in vanished_counts(vanished).items():
        changes[kind]["removed"] = count
    return changes


def write_index_or_warn(snapshot: Path, summary: Dict[str, Any], docs: List[Dict[str, Any]],
                        warn: Callable[[str], None]) -> List[FileRecord]:
    """write_snapshot_index; the index is a convenience, so trouble writing it is a warning."""
    try:
        return write_snapshot_index(snapshot, summary, docs)
    except Exception as exc:  # the disk, a strange manifest entry: the backup itself is whole
        LOG.debug("index failed", exc_info=True)
        warn(f"could not write {INDEX_NAME}: {exc}")
        return []


def end_run(run: RunState, halt: Optional[Halt], signals: List[int]) -> int:
    """The one outcome path at the end of every run that took the lock, whatever happened:
    decide the outcome once, write it into the snapshot, move `latest`, zip, write
    DIR/last-run.json, prune; return the exit code.

    A step that fails here (latest, zip) is a recorded failure: the outcome is decided again
    from the same facts and rewritten before anything else reads it, so summary.json,
    manifest.json, the zip's copy and last-run.json always agree.
    """
    outcome = decide_outcome(run.facts(halt, signals))
    if run.snapshot is not None:
        outcome = settle_snapshot(run, run.snapshot, outcome, halt, signals)
    write_last_run(run, outcome)
    if outcome.may_prune and run.options.retention and run.snapshot is not None:
        try:
            prune_snapshots(run.options.output, run.options.retention, run.options.keep_vanished, run.snapshot)
        except OSError as exc:
            LOG.warning("retention: could not remove an old snapshot: %s", exc)
    if run.recorder.changes is not None:
        LOG.info("%s", describe_changes(run.recorder.changes))
    log_outcome(outcome, run)
    if run.pinger is not None:
        run.pinger.finish(outcome.exit_code,
                          run.summary(outcome) if run.snapshot is not None else last_run_record(run, outcome))
    return outcome.exit_code


def settle_snapshot(run: RunState, snapshot: Path, outcome: Outcome, halt: Optional[Halt],
                    signals: List[int]) -> Outcome:
    """Write the outcome into the snapshot, move `latest`, zip; return the final outcome."""
    if not outcome.discard_snapshot:
        try:
            run.write_records(outcome)
        except OSError as exc:
            reason = disk_trouble(exc)
            halt = halt or (Halt("disk", reason) if reason else None)
            run.fatal = run.fatal or f"cannot write {SUMMARY_NAME}: {exc}"
            outcome = decide_outcome(run.facts(halt, signals))
    if outcome.discard_snapshot:
        if run.journal is not None:
            run.journal.close(remove=True)
        discard_snapshot(snapshot)
        return outcome

    def failed_step(kind: str, name: str, error: str) -> Outcome:
        run.recorder.fail(kind, error, name=name)
        again = decide_outcome(run.facts(halt, signals))
        try:
            run.write_records(again)
        except OSError as exc:
            LOG.error("cannot rewrite %s: %s", SUMMARY_NAME, exc)
        return again

    if outcome.move_latest:
        try:
            point_latest(run.options.output, snapshot)
        except OSError as exc:
            outcome = failed_step("latest", "latest", f"the backup is complete, but latest did not move: {exc}")
    if run.options.zip and outcome.status in ("completed", "completed_with_errors"):
        try:
            LOG.info("wrote %s", zip_snapshot(snapshot))
        except OSError as exc:
            outcome = failed_step("zip", f"{snapshot.name}.zip", str(exc))
    return outcome


def discard_snapshot(snapshot: Path) -> None:
    """Remove this run's own snapshot folder, and only it (hard links leave other snapshots'
    files alone). Renamed away first, as prune does, so a removal cut short never leaves a half
    snapshot behind; a read-only disk may refuse even that."""
    doomed = snapshot.parent / f".deleting-{snapshot.name}"
    try:
        os.replace(snapshot, doomed)
        remove_tree(doomed)  # clears read-only files on Windows, as pruning does
        LOG.error("removed the unfinished snapshot %s", snapshot.name)
    except OSError as exc:
        LOG.error("could not remove the unfinished snapshot %s: %s", snapshot.name, exc)


def last_run_record(run: RunState, outcome: Outcome) -> Dict[str, Any]:
    """DIR/last-run.json (a LastRun, as JSON) for a run that took the lock."""
    kept = run.snapshot is not None and not outcome.discard_snapshot
    return LastRun(
        snapshot=run.snapshot.name if kept and run.snapshot is not None else None,
        status=outcome.status,
        exit_code=outcome.exit_code,
        error=outcome.error,
        started_at=iso(run.started),
        finished_at=iso(utc_now()),
        counts=run.recorder.as_counts(),
        vanished=len(run.recorder.vanished),
    ).as_json()


def write_last_run(run: RunState, outcome: Outcome) -> None:
    """Rewrite DIR/last-run.json atomically; a disk that refuses even this is only logged."""
    try:
        write_json_atomic(run.options.output / LAST_RUN_NAME, last_run_record(run, outcome))
    except OSError as exc:
        LOG.error("cannot write %s: %s", run.options.output / LAST_RUN_NAME, exc)


def record_run_that_never_started(options: Options, started: dt.datetime, code: int, error: str, secret: str,
                                  ping: bool = False) -> None:
    """DIR/last-run.json (and, with `ping`, the end ping) for a backup that ended before it took
    the lock: no token (a cron job without the variable is the classic), or another run holding
    the folder. A monitor sees that night's failure at once instead of yesterday's success.
    Only into an output folder that already exists: a usage error never creates one."""
    record = LastRun(snapshot=None, status="failed", exit_code=code, error=one_line(error, secret),
                     started_at=iso(started), finished_at=iso(utc_now()), counts=RunRecorder().as_counts(),
                     vanished=0).as_json()
    pinger = Pinger.for_options(options, secret) if ping else None
    if pinger is not None:
        pinger.finish(code, record)
    if not options.output.is_dir():
        return
    try:
        write_json_atomic(options.output / LAST_RUN_NAME, record)
    except OSError as exc:
        LOG.error("cannot write %s: %s", options.output / LAST_RUN_NAME, exc)


def one_line(text: str, secret: str = "") -> str:
    """An error for summary.json and last-run.json: one printable line, never the token."""
    if secret:
        text = text.replace(secret, "[redacted]")
    return printable(" ".join(text.split()))[:500]


def log_outcome(outcome: Outcome, run: RunState) -> None:
    counts = run.recorder.as_counts()
    unchanged = sum(counts["skipped_unchanged"].values())
    requests = run.stats.as_dict()
    duration = (utc_now() - run.started).total_seconds()
    where = "(removed)" if outcome.discard_snapshot else str(run.snapshot)
    reason = f" ({outcome.error})" if outcome.error else ""
    line = (f"backup {outcome.status}{reason}: {counts['docs']} docs, {counts['pages']} pages, "
            f"{counts['tables']} tables, {counts['views']} views, {counts['rows']} rows, {unchanged} unchanged, "
            f"{counts['failures']} failures, {requests['total']} requests in {duration:.1f}s -> {where}")
    (LOG.warning if counts["failures"] or outcome.status != "completed" else LOG.info)("%s", line)


# --- Run: lifecycle -----------------------------------------------------------


@contextlib.contextmanager
def cancel_on_signals(cancel: threading.Event, on_cancel: Callable[[], None] = lambda: None) -> Iterator[List[int]]:
    """Turn SIGINT/SIGTERM (and Ctrl+Break on Windows) into a cancel: workers stop at their next
    request or sleep, and `on_cancel` cuts the requests in flight.

    The handler only appends to a list: it runs between two bytecodes of the main thread, which
    may hold any lock at that moment, so taking one there could hang the process. A watcher
    thread notices within SIGNAL_POLL seconds and does the rest.
    """
    received: List[int] = []
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        received.append(signum)

    def watch() -> None:
        while not stop.wait(SIGNAL_POLL):
            if received:
                cancel.set()
                on_cancel()
                return

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGBREAK", None)):
            if signum is not None:
                previous[signum] = signal.signal(signum, handler)
    watcher = threading.Thread(target=watch, name="coda-signals", daemon=True)
    watcher.start()
    try:
        yield received
    finally:
        stop.set()
        watcher.join()
        for signum, old in previous.items():
            signal.signal(signum, old)


def run_with_pings(options: Options, credentials: Credentials, status_line: Optional[StatusLine] = None) -> int:
    """run_backup with --ping-url: run_backup sends the start ping and end_run the end ping; the
    end ping also goes out here for a run that ended before taking the lock (the output folder
    locked by another run, or not writable)."""
    pinger = Pinger.for_options(options, credentials.token)
    try:
        return run_backup(options, credentials, status_line, pinger)
    except BaseException as exc:
        if pinger is not None:
            pinger.finish(exit_code_for(exc), {"status": "failed", "error": one_line(str(exc), credentials.token)})
        raise


def client_settings(options: Options) -> ClientSettings:
    return ClientSettings(api_url=options.api_url, max_retries=options.max_retries, timeout=options.timeout,
                          retry_delay=options.retry_delay, rate_limits=options.rate_limits,
                          strict_latest=options.strict_latest, max_in_flight=options.concurrency)


def check_access(api: CodaApi, token_source: str = "") -> Dict[str, Any]:
    """Call /whoami first: a bad token or an unreachable API ends the run before any work."""
    try:
        user = api.whoami()
    except ApiError as exc:
        raise FatalError(_fatal_message("checking the token (/whoami)", exc, token_source)) from exc
    LOG.info("authenticated as %s (token %s)", user.get("loginId") or user.get("name"), user.get("tokenName"))
    return user


def list_docs(api: CodaApi, options: Options, recorder: RunRecorder) -> List[Dict[str, Any]]:
    docs, problem = read_all(api.iter_docs(options.include_shared, options.workspace_id))
    recorder.listed.docs = listed_ids(docs, problem)
    if isinstance(problem, ApiError):
        raise FatalError(_fatal_message("listing docs", problem)) from problem
    if problem is not None:
        recorder.fail("listing", problem, name="docs")
    docs = select_docs(docs, options, recorder)
    recorder.expect_docs(len(docs))
    LOG.info("%d doc(s) to back up", len(docs))
    return docs


def select_docs(docs: List[Dict[str, Any]], options: Options, recorder: RunRecorder) -> List[Dict[str, Any]]:
    """Apply --doc and --exclude-doc (ids or exact names); warn about --doc values that match nothing."""
    def matches(doc: Dict[str, Any], wanted: str) -> bool:
        return wanted in (doc["id"], doc.get("name"))

    chosen = [doc for doc in docs if not any(matches(doc, value) for value in options.exclude_docs)]
    if options.docs:
        unmatched = [value for value in options.docs if not any(matches(doc, value) for doc in docs)]
        for value in unmatched:  # a typo must not pass as a good night, even when other values matched
            recorder.fail("filter", f"no doc this token lists matches {value!r}", name="--doc")
        chosen = [doc for doc in chosen if any(matches(doc, value) for value in options.docs)]
        if not chosen and not unmatched:
            recorder.fail("filter", "every doc --doc matched is left out by --exclude-doc", name="--doc")
    return chosen


def _fatal_message(action: str, exc: ApiError, token_source: str = "") -> str:
    if exc.status in (401, 403):
        token = f"the API token from {token_source}" if token_source else "the API token"
        return (f"{action} failed: {token} was refused (HTTP {exc.status}: {exc.message}); "
                "check CODA_API_TOKEN or --token-file")
    return f"{action} failed: {exc}"


def list_doc(job: Job, doc: Dict[str, Any], workers: Workers) -> Optional[DocWork]:
    """backup_doc on a lister thread; None when the doc failed (recorded: the run goes on)."""
    job.api.http.check_cancelled()
    LOG.info("doc %s (%s)", printable(doc["id"]), printable(doc.get("name")))
    try:
        return backup_doc(job, doc, workers)
    except Cancelled:
        raise
    except Exception as exc:  # one bad doc must never stop the run (a full disk does)
        stop_on_disk_trouble(job, exc)
        LOG.debug("doc %s failed", doc["id"], exc_info=True)
        job.recorder.fail("doc", exc, doc_id=doc["id"], object_id=doc["id"], name=doc.get("name"))
        return None


def back_up_docs(job: Job, docs: List[Dict[str, Any]]) -> List[DocEntry]:
    """List docs a few at a time (DOC_LISTERS) while the export scheduler exports their pages and a
    pool reads their tables; every thread's requests share the --concurrency bound."""
    works: List[DocWork] = []
    concurrency = job.options.concurrency
    with concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="coda") as pool, \
            ExportScheduler(job.api.http, job.options) as exports, \
            concurrent.futures.ThreadPoolExecutor(min(ITEM_WORKERS, concurrency), thread_name_prefix="coda-item") \
            as items, \
            concurrent.futures.ThreadPoolExecutor(min(DOC_LISTERS, concurrency), thread_name_prefix="coda-list") \
            as listers:
        workers = Workers(pool, exports, items)
        listed = [listers.submit(list_doc, job, doc, workers) for doc in docs]
        try:
            for future in listed:
                work = future.result()
                if work is not None:
                    works.append(work)
        except (Cancelled, concurrent.futures.CancelledError):
            listers.shutdown(wait=True, cancel_futures=True)
            pool.shutdown(wait=True, cancel_futures=True)
            items.shutdown(wait=True, cancel_futures=True)
        return [work.finish() for work in works]


def run_backup(options: Options, credentials: Credentials, status_line: Optional[StatusLine] = None,
               pinger: Optional[Pinger] = None) -> int:
    """One whole run: lock, snapshot, back up; then end_run, the one outcome path, whatever happened."""
    try:
        make_private_dir(options.output)
    except OSError as exc:
        raise ConfigError(f"cannot create --output {options.output}: {exc.strerror or exc}") from None
    cancel = threading.Event()
    recorder, stats = RunRecorder(), RequestStats()
    if pinger is not None:
        started_ping = pinger.start()
        if started_ping is not None:
            recorder.warn(started_ping)
    http = HttpClient(client_settings(options), credentials.token, cancel, stats)
    asset_http = HttpClient(asset_client_settings(options), "", cancel)  # never holds the token

    def abort() -> None:
        http.abort()
        asset_http.abort()

    with RunLock(options.output), cancel_on_signals(cancel, abort) as received:
        run = RunState(options, recorder, stats, utc_now(), credentials.token, pinger=pinger)
        for text in credentials.warnings:
            recorder.warn(text)
        try:
            mark_abandoned(options.output, recorder.warn)
            run.before = vanished_baseline(options.output, options, read_latest(options.output))
            run.before_manifest = load_manifest(run.before) if run.before is not None else None
            run.snapshot = create_snapshot(options.output, run.started)
            index = None
            if options.reuses_previous:
                index = SnapshotIndex.load(options.output, options, run.snapshot, recorder.warn)
            assets = AssetStore(options, asset_http, run.snapshot, recorder, index) if options.assets else None
            run.journal = Journal.start(run.snapshot, manifest_options(options), run.started)
            job = Job(options, CodaApi(http, recorder.warn), run.snapshot, PathAllocator(), recorder, index,
                      ReusePolicy.for_run(options, run.started), assets, run.journal)
            LOG.info("writing snapshot %s", run.snapshot)
            with Monitor(run.write_running_summary, recorder, stats, status_line):
                try:
                    check_access(job.api, credentials.describe())
                    run.docs = back_up_docs(job, list_docs(job.api, options, recorder))
                finally:
                    if assets is not None:
                        assets.close(cancel.is_set())
                    http.close()
        except FatalError as exc:
            LOG.error("%s", exc)
            run.fatal = str(exc)
        except Cancelled:
            pass
        except Exception as exc:  # the disk, or a bug: still leave an honest outcome behind
            LOG.debug("run failed", exc_info=True)
            reason = disk_trouble(exc)
            if reason is not None:
                http.halt("disk", reason)
            else:
                recorder.fail("run", exc)
                run.fatal = f"the run stopped: {exc}"
        halt = run_halt(run, http, asset_http, received)
        if halt is None and run.fatal is None and not cancel.is_set() and run.snapshot is not None:
            try:
                check_vanished(options, recorder, run.started)  # a tripped guard is a `vanished` failure
            except Exception as exc:  # a bug must not skip end_run; without the check nothing is pruned
                LOG.debug("vanished check failed", exc_info=True)
                recorder.fail("run", exc, name="vanished check")
        return end_run(run, halt, received)


def run_halt(run: RunState, http: HttpClient, asset_http: HttpClient, signals: List[int]) -> Optional[Halt]:
    """Why the run stopped at once, if it did (the API lost, the disk full); or an API that had
    stopped answering when the work ran out, before the breaker's bounds were reached (a small
    run, or one that lost the API before it listed everything)."""
    halt = http.halted or asset_http.halted
    unanswered = http.breaker.unanswered()
    if halt is None and run.fatal is None and not signals and unanswered:
        halt = Halt("api_lost", f"lost the API: its last {unanswered} request(s) got no answer "
                                "and it did not answer again before the run ran out of work")
    return halt


def dry_run(options: Options, credentials: Credentials) -> int:
    """--dry-run: say what a run would back up and what --incremental would link, and why.

    Lists docs, pages and tables and reads each table's metadata for its row
    count; makes no export request, reads no rows, writes nothing, takes no lock.
    Reuse is decided by the run's own policy, saved files are checked the same way.
    """
    cancel = threading.Event()
    http = HttpClient(client_settings(options), credentials.token, cancel)
    api = CodaApi(http)
    recorder = RunRecorder()
    for text in credentials.warnings:
        recorder.warn(text)
    index = SnapshotIndex.load(options.output, options, warn=recorder.warn) if options.reuses_previous else None
    policy = ReusePolicy.for_run(options, utc_now())
    totals = {"docs": 0, "pages": 0, "tables": 0, "views": 0, "rows": 0, "unchanged": 0}
    with cancel_on_signals(cancel, http.abort) as received:
        try:
            check_access(api, credentials.describe())
            for doc in list_docs(api, options, recorder):
                totals["docs"] += 1
                label = f"doc {printable(doc.get('name'))} ({printable(doc['id'])})"
                if index is None:
                    print(label)
                    plan_doc(api, options, policy, index, doc, totals, recorder)
                    continue
                decision = policy.doc(doc, index.docs.get(doc["id"]))
                if decision.reuse and decision.source is not None and not intact(decision.source.all_files()):
                    decision = Decision(False, REASON_DAMAGED)
                print(f"{label}: {plan_text(decision, 'list again')}")
                if decision.reuse:
                    totals["unchanged"] += 1
                    continue
                plan_doc(api, options, policy, index, doc, totals, recorder)
        except FatalError as exc:
            print(f"coda-backup: {exc}", file=sys.stderr)
            return EXIT_FATAL
        except Cancelled:
            if http.halted is not None:
                print(f"coda-backup: {http.halted.reason}", file=sys.stderr)
            return decide_outcome(RunFacts(halt=http.halted, signal=received[0] if received else None)).exit_code
    print(f"would back up {totals['docs']} docs, {totals['pages']} pages, {totals['tables']} tables, "
          f"{totals['views']} views, {totals['rows']} rows; {totals['unchanged']} unchanged "
          f"(linked, not downloaded); {len(recorder.failures)} problems")
    return EXIT_FAILURES if recorder.failures else EXIT_OK


def plan_text(decision: Optional[Decision], verb: str) -> str:
    """`link from <snapshot> (<reason>)` or `<verb> (<reason>)`, as --dry-run prints it."""
    if decision is None:
        return verb
    if decision.reuse and decision.source is not None:
        return f"link from {decision.source.snapshot.name} ({decision.reason})"
    return f"{verb} ({decision.reason})"


def plan_doc(api: CodaApi, options: Options, policy: ReusePolicy, index: Optional[SnapshotIndex],
             doc: Dict[str, Any], totals: Dict[str, int], recorder: RunRecorder) -> None:
    """Print one doc's pages and tables for --dry-run, deciding reuse as a run would."""
    doc_id = doc["id"]
    pages, page_problem = read_all(api.iter_pages(doc))
    tables, table_problem = read_all(api.iter_tables(doc))
    for problem in (page_problem, table_problem):
        if problem is not None:
            recorder.fail("doc", problem, doc_id=doc_id, object_id=doc_id, name=doc.get("name"))
    chosen = selected_tables(options, doc, tables)
    fetched: Dict[str, Dict[str, Any]] = {}
    for ref in chosen:
        try:
            fetched[ref["id"]] = api.get_table(doc_id, ref["id"])
        except ApiError as exc:
            kind = "view" if ref.get("tableType") == "view" else "table"
            recorder.fail(kind, exc, doc_id=doc_id, object_id=ref["id"], name=ref.get("name"))

    def base_now(table: Dict[str, Any]) -> Any:
        base_id = _ref_id(table.get("parentTable")) or ""
        try:
            return (fetched.get(base_id) or api.get_table(doc_id, base_id)).get("updatedAt")
        except ApiError:
            return None

    decisions: Dict[str, Optional[Decision]] = {}
    for table_id, table in fetched.items():
        decision = None
        if index is not None:
            decision = policy.table(table, index.tables.get((doc_id, table_id)), doc.get("updatedAt"),
                                    functools.partial(base_now, table))
            if decision.reuse and decision.source is not None and not assets_reusable(
                    options.asset_hosts if options.assets else None, decision.source, None):
                decision = Decision(False, REASON_ASSETS, decision.source)
            source = decision.source
            if decision.reuse and source is not None and not intact(
                    [(source.path_of(r), r) for r in source.entry["files"] if r["role"] != "table"]):
                decision = Decision(False, REASON_DAMAGED)
        decisions[table_id] = decision

    def hosted(page_id: str) -> Dict[str, Optional[str]]:
        """A table the run would link keeps its saved CSV; one it reads again is not known yet."""
        shown: Dict[str, Optional[str]] = {}
        for ref in chosen:
            if _ref_id(ref.get("parent")) == page_id:
                decision = decisions.get(ref["id"])
                source = decision.source if decision is not None and decision.reuse else None
                shown[ref["id"]] = csv_sha256(source.entry) if source is not None else None
        return shown

    stems = page_stems(pages)
    for page in selected_pages(options, pages):
        exportable = (page.get("contentType") or "canvas") == "canvas"
        decision = None
        if index is not None:
            decision = policy.page(page, index.pages.get((doc_id, page["id"])), functools.partial(hosted, page["id"]))
            if decision.reuse and decision.source is not None and not assets_reusable(
                    options.asset_hosts if options.assets else None, decision.source,
                    doc_folder(doc) / stems[page["id"]]):
                decision = Decision(False, REASON_ASSETS, decision.source)
            source = decision.source
            if decision.reuse and source is not None and not intact(
                    [(source.path_of(r), r) for r in source.entry["files"]]):
                decision = Decision(False, REASON_DAMAGED)
        reused = decision is not None and decision.reuse
        totals["pages"] += 1
        totals["unchanged"] += int(reused)
        note = plan_text(decision, "export") if reused or exportable else "not exportable"
        print(f"  page  {printable(page.get('name'))} ({printable(page['id'])}): {note}")
    for table_id, table in fetched.items():
        kind = "view" if table.get("tableType") == "view" else "table"
        rows = table.get("rowCount")
        decision = decisions[table_id]
        totals[f"{kind}s"] += 1
        totals["rows"] += rows if isinstance(rows, int) else 0
        totals["unchanged"] += int(decision is not None and decision.reuse)
        print(f"  {kind:<5} {printable(table.get('name'))} ({printable(table_id)}): {rows} rows, "
              f"{plan_text(decision, 'read')}")


# --- CLI ----------------------------------------------------------------------


class RedactingFormatter(logging.Formatter):
    """Last line of defence: the token is replaced in every formatted log line."""

    def __init__(self, secret: str, fmt: str) -> None:
        super().__init__(fmt)
        self._secret = secret

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.replace(self._secret, "[redacted]") if self._secret else text


# A switch a config file may turn on can be turned off again on the command line (--no-...).
SWITCH: Dict[str, Any] = {"action": argparse.BooleanOptionalAction, "default": False}


HELP_EXAMPLES = """\
The token comes from CODA_API_TOKEN, else the first line of --token-file.

examples:
  first run:      export CODA_API_TOKEN=...; coda-backup -o ~/coda-backups
  nightly (cron): 30 2 * * * coda-backup -o ~/coda-backups --token-file ~/.coda-token \\
                    --incremental --quiet --log-file ~/coda-backups/backup.log
  check a backup: coda-backup -o ~/coda-backups --verify
  list the runs:  coda-backup -o ~/coda-backups --list-runs

exit codes: 0 ok, 1 finished with failures, 2 usage error, 3 fatal (token refused, API lost,
disk full or read-only), 4 output folder locked, 130/143 interrupted. Every run rewrites
DIR/last-run.json with its status, exit code and error.
"""


@dataclass(frozen=True)
class Flag:
    """One flag as --config sees it: where its value goes and what a file may give it."""

    dest: str
    options: Tuple[str, ...]  # every spelling the command line takes, --no- forms included
    kind: str  # "switch" (true/false), "list" (repeatable), "int", "float", "text"; "command": --help, --version
    convert: Optional[Callable[[str], Any]] = None  # for text: what the parser does to it
    choices: Optional[Tuple[Any, ...]] = None

    def config_keys(self) -> List[str]:
        """The keys a config file may use: each long name (keep-last and keep), not the --no- form
        a switch gets, as false says that."""
        negated = {f"--no-{option[2:]}" for option in self.options} if self.kind == "switch" else set()
        return [option[2:] for option in self.options if option.startswith("--") and option not in negated]


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag like every other usage error: one line, exit 2 (its own
    habit is a usage dump that buries the message). It keeps its own table of the flags it was
    given (`flags`, by dest), so --config checks a file against that, not argparse's internals."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.flags: Dict[str, Flag] = {}
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see --help)")

    def add_argument(self, *names: Any, **kwargs: Any) -> argparse.Action:
        return self.remember(super().add_argument(*names, **kwargs), kwargs)

    def group(self, title: str) -> "FlagGroup":
        return FlagGroup(self, self.add_argument_group(title))

    def remember(self, action: argparse.Action, kwargs: Dict[str, Any]) -> argparse.Action:
        how = kwargs.get("action", "store")
        if how in ("help", "version"):
            kind = "command"  # no value to give: no config key
        elif how == "store_true" or how is argparse.BooleanOptionalAction:
            kind = "switch"
        elif how == "append":
            kind = "list"
        else:
            kinds: Dict[Any, str] = {int: "int", float: "float"}
            kind = kinds.get(kwargs.get("type"), "text")
        choices = tuple(kwargs["choices"]) if "choices" in kwargs else None
        self.flags[action.dest] = Flag(action.dest, tuple(action.option_strings), kind, kwargs.get("type"), choices)
        return action

    def flag_for_key(self, key: str) -> Optional[Flag]:
        """The flag a config file's key names (page-format or page_format; keep or keep-last)."""
        wanted = key.replace("_", "-")
        return next((flag for flag in self.flags.values() if wanted in flag.config_keys()), None)


class FlagGroup:
    """A titled group of --help whose flags land in the parser's table too."""

    def __init__(self, parser: OneLineParser, group: Any) -> None:
        self._parser = parser
        self._group = group

    def add_argument(self, *names: Any, **kwargs: Any) -> argparse.Action:
        action: argparse.Action = self._group.add_argument(*names, **kwargs)
        return self._parser.remember(action, kwargs)


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        description="Back up a whole Coda workspace (pages as Markdown/HTML, tables and views as CSV)\n"
                    "into timestamped snapshot folders.",
        usage="%(prog)s -o DIR [options]",
        epilog=HELP_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,  # added below, so that --output is the first flag --help shows
    )
    parser.add_argument("-o", "--output", metavar="DIR", help="REQUIRED: folder that holds the snapshots")
    parser.add_argument("-h", "--help", action="help", help="show this help and exit")
    parser.add_argument("--version", action="version", version=f"coda-backup {__version__}")
    what = parser.group("what to back up")
    what.add_argument("--token-file", metavar="PATH", help="read the API token from the first line of this file")
    what.add_argument("--include-shared", **SWITCH, help="also back up docs shared with you")
    what.add_argument("--workspace-id", metavar="ID", help="only docs in this workspace (ws-...)")
    what.add_argument("--skip-hidden-pages", **SWITCH, help="leave out pages that are hidden")
    what.add_argument("--no-views", action="store_true", help="back up base tables only, not views")
    what.add_argument("--page-format", choices=("markdown", "md", "html", "both"), default=DEFAULT_PAGE_FORMAT,
                      help=f"page content format (default: {DEFAULT_PAGE_FORMAT}; md is the same as markdown)")
    what.add_argument("--html-pages", action="store_true", help="same as --page-format both")
    what.add_argument("--rows-json", **SWITCH,
                      help="also write each table's rows as NDJSON (<table>.rows.ndjson), values keyed by column id")
    what.add_argument("--csv-bom", **SWITCH,
                      help="start each CSV with a UTF-8 BOM, so Excel on Windows opens non-ASCII text right")
    what.add_argument("--index", action=argparse.BooleanOptionalAction, default=True,
                      help="write index.html, a browsable overview, at each snapshot root (default; "
                           "--no-index skips it)")
    what.add_argument("--no-extras", action="store_true",
                      help="skip formulas.json, controls.json and permissions.json (fewer requests)")
    what.add_argument("--doc", action="append", default=[], metavar="ID_OR_NAME",
                      help="back up only this doc (repeatable); a value that matches no doc is a failure (exit 1)")
    what.add_argument("--exclude-doc", action="append", default=[], metavar="ID_OR_NAME",
                      help="leave this doc out (repeatable)")
    what.add_argument("--exclude-table", action="append", default=[], metavar="GLOB",
                      help="leave out tables and views whose 'Doc/Table' name (or 'docId/tableId') matches "
                           "(repeatable), e.g. 'CRM/Archive*'")
    what.add_argument("--assets", action=argparse.BooleanOptionalAction, default=True,
                      help="save the images and attachments pages and image/attachment cells link to, under "
                           "docs/<Doc>/assets/, and point the page links at them (default; --no-assets: links only)")
    what.add_argument("--asset-host", action="append", default=[], metavar="PREFIX",
                      help=f"also save assets whose URL starts with this prefix (repeatable; "
                           f"{DEFAULT_ASSET_HOSTS[0]} always)")
    what.add_argument("--max-asset-mb", type=int, default=DEFAULT_MAX_ASSET_MB, metavar="N",
                      help=f"skip (and list in summary.json) assets larger than N MiB (default {DEFAULT_MAX_ASSET_MB})")
    how = parser.group("how to run")
    how.add_argument("--incremental", **SWITCH,
                     help="link unchanged docs, pages and tables from earlier snapshots instead of downloading "
                          "(resumes a cancelled or failed run)")
    how.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE_DAYS, metavar="DAYS",
                     help=f"with --incremental: download again, changed or not, what was last downloaded "
                          f"too long ago: each object falls due between half of DAYS and DAYS after its "
                          f"download, so refreshes spread over nights (default {DEFAULT_MAX_AGE_DAYS:g}; "
                          f"0 = never reuse); identical files are still hard-linked")
    how.add_argument("--strict-latest", **SWITCH,
                     help="ask Coda for the newest doc version (X-Coda-Doc-Version: latest); may need retries")
    how.add_argument("--retry-failed", action="store_true",
                     help="read again only the pages and tables that failed in the latest run (their docs are "
                          "listed again); link everything else")
    how.add_argument("--dry-run", action="store_true",
                     help="list what would be backed up (with --incremental: what would be linked); write nothing")
    how.add_argument("--keep-last", "--keep", dest="keep", type=int, metavar="N",
                     help="retention, applied after a run that completed without errors (or with --prune): "
                          "keep the newest N completed snapshots; the union of all --keep-* rules is kept, "
                          "the rest deleted with its .zip (never latest or a running one)")
    how.add_argument("--keep-daily", type=int, metavar="N", help="keep the newest snapshot of each of the last N "
                                                                  "days that have one (UTC)")
    how.add_argument("--keep-weekly", type=int, metavar="N",
                     help="keep the newest snapshot of each of the last N ISO weeks that have one")
    how.add_argument("--keep-monthly", type=int, metavar="N",
                     help="keep the newest snapshot of each of the last N months that have one")
    how.add_argument("--keep-within", type=int, metavar="DAYS",
                     help="keep every snapshot less than DAYS days older than the newest completed one")
    how.add_argument("--zip", **SWITCH, help="also write DIR/<snapshot>.zip after a finished run")
    how.add_argument("--max-vanished", type=float, default=DEFAULT_MAX_VANISHED, metavar="PCT",
                     help="deletion guard: when more than PCT%% of the latest snapshot's docs vanished from Coda, "
                          f"or of one doc's pages, tables and views (at least {VANISHED_MIN_OBJECTS}), the run "
                          f"ends with exit 1 and latest stays (default {DEFAULT_MAX_VANISHED:g})")
    how.add_argument("--allow-vanished", action="store_true",
                     help="accept what vanished for this run, however much (see --max-vanished)")
    how.add_argument("--keep-vanished", type=int, default=DEFAULT_KEEP_VANISHED, metavar="DAYS",
                     help="retention keeps the newest snapshot holding an object that vanished less than DAYS "
                          f"ago (default {DEFAULT_KEEP_VANISHED}; 0 = no such rule); see DIR/{VANISHED_NAME}")
    how.add_argument("--ping-url", metavar="URL",
                     help="monitoring ping (healthchecks.io style): URL/start at the start, URL on success, "
                          "URL/<exit code> otherwise; never fails the backup")
    how.add_argument("--config", metavar="FILE",
                     help="TOML file with defaults for any flag (keys like page-format); flags override it")
    runs = parser.group("run management")
    runs.add_argument("--verify", nargs="?", const=LATEST_LINK, metavar="SNAPSHOT",
                      help="re-hash a snapshot (default: latest) against its manifest and exit; "
                           "exit 1 if a file differs or the snapshot never finished")
    runs.add_argument("--list-runs", action="store_true",
                      help="list the snapshots in --output, newest first, and exit")
    runs.add_argument("--prune", action="store_true",
                      help="apply the --keep-* rules now, without a backup (no token needed); with --dry-run: "
                           "print the plan only")
    runs.add_argument("--diff", nargs="*", metavar="SNAPSHOT",
                      help="--diff [OLD [NEW]]: what changed between two snapshots (default NEW: latest, OLD: the "
                           "completed snapshot before NEW), down to rows and columns; no token, writes nothing")
    runs.add_argument("--find", metavar="PATTERN",
                      help="list the snapshots holding a doc, page, table or view whose name or id matches this "
                           "glob, newest first")
    runs.add_argument("--json", action="store_true", help="with --list-runs, --diff or --find: print JSON")
    how.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, metavar="N",
                     help=f"the most requests in flight, and tables read at once; a rendering page export "
                          f"waits on a timer, not a worker (default {DEFAULT_CONCURRENCY}; 1 = one request at a time)")
    how.add_argument("--max-retries", type=int, default=DEFAULT_MAX_RETRIES, metavar="N",
                     help=f"retries per request after the first attempt (default {DEFAULT_MAX_RETRIES})")
    how.add_argument("--retry-delay", type=float, default=DEFAULT_RETRY_DELAY, metavar="SECONDS",
                     help=f"first backoff delay, doubled on each retry, with jitter (default {DEFAULT_RETRY_DELAY:g})")
    how.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                     help="the longest one API request or export download may take, its whole answer "
                          f"included (default {DEFAULT_TIMEOUT:g})")
    how.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL, metavar="SECONDS",
                     help=f"wait between page-export status polls (default {DEFAULT_POLL_INTERVAL:g})")
    how.add_argument("--export-timeout", type=float, default=DEFAULT_EXPORT_TIMEOUT, metavar="SECONDS",
                     help=f"give up on one page export after this long (default {DEFAULT_EXPORT_TIMEOUT:g})")
    how.add_argument("--rate-limits", default=None, metavar="SPEC",
                     help=f"client-side pacing, e.g. '{rate_limits_spec(DEFAULT_RATE_LIMITS)}' (the default), "
                          "or 'none'")
    how.add_argument("--api-url", default=None, metavar="URL",
                     help=f"API base URL (default: env CODA_API_URL or {DEFAULT_API_URL})")
    logs = parser.group("logging")
    logs.add_argument("--log-level", default=DEFAULT_LOG_LEVEL, type=str.upper,
                      choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                      help=f"log detail on stderr (default {DEFAULT_LOG_LEVEL})")
    logs.add_argument("-v", "--verbose", **SWITCH, help="same as --log-level DEBUG")
    logs.add_argument("-q", "--quiet", **SWITCH, help="only errors on stderr (for cron); no progress line")
    logs.add_argument("--log-file", metavar="PATH", help="also write the log to this file")
    return parser


def read_token(token_file: Optional[str]) -> Credentials:
    """CODA_API_TOKEN, else the first line of --token-file; never logged.

    Both given: the variable wins, with a warning, so a stale variable cannot hide behind a
    token file that looks right.
    """
    token = os.environ.get("CODA_API_TOKEN", "").strip()
    if token:
        if token_file:
            return _checked(Credentials(token, "CODA_API_TOKEN", (
                f"both CODA_API_TOKEN and --token-file {token_file} are set; using CODA_API_TOKEN",), True))
        return _checked(Credentials(token, "CODA_API_TOKEN"))
    if not token_file:
        raise ConfigError("no API token: set CODA_API_TOKEN or pass --token-file PATH "
                          "(create a token in Coda under Account settings > API settings)")
    path = Path(token_file)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError(f"cannot read the token file {path}: {reason}") from None
    token = (text.splitlines() or [""])[0].strip()
    if not token:
        raise ConfigError(f"the token file {path} is empty" if not text.strip()
                          else f"the first line of the token file {path} is empty; the token goes there")
    warning = readable_by_others(path)
    return _checked(Credentials(token, f"--token-file {path}", (warning,) if warning else ()))


def _checked(credentials: Credentials) -> Credentials:
    if not re.fullmatch(r"[\x21-\x7e]+", credentials.token):
        raise ConfigError(f"the API token from {credentials.source} holds spaces or non-ASCII characters; check it")
    return credentials


def readable_by_others(path: Path) -> Optional[str]:
    """The warning for a token file that other users may read, if it is one."""
    if os.name == "posix":
        with contextlib.suppress(OSError):
            if path.stat().st_mode & 0o077:
                return f"token file {path} is readable by other users; run: chmod 600 {path}"
    return None


def rate_limits_spec(limits: Dict[str, Tuple[int, float]]) -> str:
    """The --rate-limits text for these limits, as --help shows the default."""
    return ",".join(f"{category}={count}/{seconds:g}" for category, (count, seconds) in limits.items())


def parse_rate_limits(spec: Optional[str]) -> Optional[Dict[str, Tuple[int, float]]]:
    if spec is None:
        return dict(DEFAULT_RATE_LIMITS)
    if spec.strip().lower() == "none":
        return None
    limits = dict(DEFAULT_RATE_LIMITS)
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*", part)
        if not match or match.group(1) not in DEFAULT_RATE_LIMITS or int(match.group(2)) < 1 \
                or float(match.group(3)) <= 0:
            raise ConfigError(f"--rate-limits: cannot read {part.strip()!r}; "
                              f"use CATEGORY=REQUESTS/SECONDS with a category of {', '.join(DEFAULT_RATE_LIMITS)}")
        limits[match.group(1)] = (int(match.group(2)), float(match.group(3)))
    return limits


def split_url(url: str) -> urllib.parse.SplitResult:
    """urlsplit for a URL from the command line, its port read too: a URL urlsplit cannot read
    (`http://[::1`, a port `abc` or 99999), or one with spaces or control characters, comes back
    empty, so the caller's usage error covers it instead of a traceback or a later failure."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        return urllib.parse.SplitResult("", "", "", "", "")
    if any(ord(char) <= 32 or ord(char) == 127 for char in url):
        return urllib.parse.SplitResult("", "", "", "", "")
    return parts


def api_url_from(value: Optional[str]) -> str:
    url = (value or os.environ.get("CODA_API_URL") or DEFAULT_API_URL).strip().rstrip("/")
    parts = split_url(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"--api-url must be an http(s) URL without query, like {DEFAULT_API_URL}")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        LOG.warning("--api-url uses plain http: the token would travel unencrypted")
    return url


def ping_url_from(value: Optional[str]) -> Optional[str]:
    """--ping-url: an http(s) URL; it is a secret (it often holds a key), so the message never repeats it."""
    if value is None:
        return None
    url = value.strip().rstrip("/")
    parts = split_url(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
        raise ConfigError("--ping-url must be an http(s) URL, like https://hc-ping.com/<uuid>")
    return url


def options_from_args(args: argparse.Namespace) -> Options:
    """Check the flags a parser cannot check; raise ConfigError with one clear line."""
    if not args.output:
        raise ConfigError("--output DIR is required: the folder that will hold the snapshots")
    output = Path(args.output).expanduser()
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} exists and is not a folder")
    checks = [
        (1 <= args.concurrency <= 32, "--concurrency must be between 1 and 32"),
        (0 <= args.max_retries <= 20, "--max-retries must be between 0 and 20"),
        (args.retry_delay >= 0, "--retry-delay must not be negative"),
        (0 < args.timeout < float("inf"), "--timeout must be positive"),
        (args.poll_interval >= 0, "--poll-interval must not be negative"),
        (args.export_timeout > 0, "--export-timeout must be positive"),
        (0 <= args.max_vanished <= 100, "--max-vanished must be between 0 and 100"),
        (0 <= args.max_age <= MAX_DAYS, f"--max-age must be between 0 and {MAX_DAYS} days"),
        (not (args.incremental and args.retry_failed), "--incremental and --retry-failed do not go together"),
        (args.max_asset_mb >= 1, "--max-asset-mb must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    page_format = "both" if args.html_pages else args.page_format
    formats = {"both": ("markdown", "html"), "md": ("markdown",)}.get(page_format, (page_format,))
    return Options(
        output=output, api_url=api_url_from(args.api_url), include_shared=args.include_shared,
        workspace_id=args.workspace_id, skip_hidden_pages=args.skip_hidden_pages, no_views=args.no_views,
        incremental=args.incremental, strict_latest=args.strict_latest, page_formats=formats,
        max_retries=args.max_retries, concurrency=args.concurrency, timeout=args.timeout,
        poll_interval=args.poll_interval, export_timeout=args.export_timeout, retry_delay=args.retry_delay,
        rate_limits=parse_rate_limits(args.rate_limits), rows_json=args.rows_json, extras=not args.no_extras,
        docs=tuple(args.doc), exclude_docs=tuple(args.exclude_doc), exclude_tables=tuple(args.exclude_table),
        retry_failed=args.retry_failed, retention=retention_from_args(args), zip=args.zip,
        max_vanished=args.max_vanished, allow_vanished=args.allow_vanished, keep_vanished=args.keep_vanished,
        assets=args.assets,
        asset_hosts=tuple(dict.fromkeys(DEFAULT_ASSET_HOSTS + tuple(map(asset_host_prefix, args.asset_host)))),
        max_asset_mb=args.max_asset_mb,
        max_age_days=args.max_age,
        csv_bom=args.csv_bom, index=args.index, ping_url=ping_url_from(args.ping_url),
    )


def retention_from_args(args: argparse.Namespace) -> Optional[RetentionPolicy]:
    """The --keep-* rules, or None when none was given."""
    values = {"last": args.keep, "daily": args.keep_daily, "weekly": args.keep_weekly,
              "monthly": args.keep_monthly, "within_days": args.keep_within}
    for name, value in values.items():
        if value is not None and value < 1:
            flag = "--keep-within" if name == "within_days" else f"--keep-{name}"
            raise ConfigError(f"{flag} must be at least 1")
    if args.keep_within is not None and args.keep_within > MAX_DAYS:
        raise ConfigError(f"--keep-within must be at most {MAX_DAYS} days")
    if not 0 <= args.keep_vanished <= MAX_DAYS:  # here, as --prune and --list-runs read it too
        raise ConfigError(f"--keep-vanished must be between 0 and {MAX_DAYS} days")
    policy = RetentionPolicy(**values)
    return policy if policy else None


def snapshot_output(output: Optional[str], flag: str) -> Path:
    """--output for the commands that only read snapshots: it must exist."""
    if not output:
        raise ConfigError(f"{flag} needs --output DIR")
    base = Path(output).expanduser()
    if not base.is_dir():
        raise ConfigError(f"--output {base} is not a folder")
    return base


def check_commands(cli: argparse.Namespace) -> None:
    """One command at a time, and no backup flag with a command that makes no backup (a cron
    line `--incremental --prune --keep-daily 7` would exit 0 every night and back up nothing).
    Only the command line is checked: a --config file for the nightly run may say incremental."""
    commands = [flag for flag, given in (("--verify", cli.verify is not None), ("--list-runs", cli.list_runs),
                                         ("--diff", cli.diff is not None), ("--find", cli.find is not None),
                                         ("--prune", cli.prune)) if given]
    if len(commands) > 1:
        raise ConfigError(f"{commands[0]} and {commands[1]} do not go together: one at a time")
    backup = [flag for flag, given in (("--incremental", cli.incremental), ("--retry-failed", cli.retry_failed))
              if given]
    if commands and backup:
        hint = " (a backup run with --keep-* prunes by itself after a clean run)" if cli.prune else ""
        raise ConfigError(f"{commands[0]} makes no backup: leave out {backup[0]}{hint}")


def run_verify(output: Optional[str], which: str) -> int:
    """--verify: exit 0 when every file matches the manifest, 1 listing what does not."""
    base = snapshot_output(output, "--verify")
    snapshot = read_latest(base) if which == LATEST_LINK else base / which
    if snapshot is None or not SNAPSHOT_NAME_RE.match(snapshot.name) or not snapshot.is_dir():
        raise ConfigError(f"no snapshot {which!r} in {base}")
    status = read_summary(snapshot).get("status")
    if status in INCOMPLETE_STATUSES:  # its manifest lists what it saved, not what the workspace holds
        print(f"{snapshot.name}: incomplete: the run that wrote it never finished (status {status})")
        return EXIT_FAILURES
    problems = verify_snapshot(snapshot)
    for problem in problems:
        print(problem)
    print(f"{snapshot.name}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return EXIT_FAILURES if problems else EXIT_OK


def run_list(output: Optional[str], as_json: bool, keep_vanished: int = DEFAULT_KEEP_VANISHED,
             policy: Optional[RetentionPolicy] = None) -> int:
    """--list-runs: the snapshots in --output, newest first, and which ones retention keeps for
    what vanished; with --keep-* rules, what the plan does with each."""
    base = snapshot_output(output, "--list-runs")
    runs = describe_runs(base, vanished_protection(base, utc_now(), keep_vanished))
    if policy is not None:
        plan = {decision.name: decision for decision in retention_plan(base, policy, keep_vanished)}
        for run in runs:
            decision = plan.get(run["snapshot"], RetentionDecision(run["snapshot"], True, ("no time in its name",)))
            run["retention"] = {"keep": decision.keep, "reasons": list(decision.reasons)}
    if as_json:
        print(json.dumps(runs, indent=2))
        return EXIT_OK
    if not runs:
        print(f"no snapshots in {output}")
    for run in runs:
        counts = run["counts"]
        duration = f"{run['duration_s']:.0f}s" if isinstance(run["duration_s"], (int, float)) else "?"
        print(f"{run['snapshot']}{' (latest)' if run['latest'] else ''}  {run['status']:<21} "
              f"started {run['started_at'] or '?'}  {duration}  "
              f"docs {counts.get('docs', '?')} pages {counts.get('pages', '?')} tables {counts.get('tables', '?')} "
              f"views {counts.get('views', '?')} rows {counts.get('rows', '?')}  failures {run['failures']}  "
              f"{run['size_bytes'] / 1e6:.1f} MB ({run['unique_bytes'] / 1e6:.1f} MB own)"
              + (f"  {'keep' if run['retention']['keep'] else 'delete'} ({', '.join(run['retention']['reasons'])})"
                 if "retention" in run else ""))
        if run["protected"]:
            print(f"    kept: {run['protected']}")
    return EXIT_OK


def run_prune(output: Optional[str], policy: Optional[RetentionPolicy], keep_vanished: int, dry_run: bool) -> int:
    """--prune: apply the retention rules without a backup, under the lock; --dry-run: the plan only."""
    base = snapshot_output(output, "--prune")
    if policy is None:
        raise ConfigError("--prune needs a rule: --keep-last, --keep-daily, --keep-weekly, --keep-monthly "
                          "or --keep-within")
    if dry_run:
        plan = retention_plan(base, policy, keep_vanished)
        for decision in plan:
            print(f"{'keep  ' if decision.keep else 'delete'} {decision.name}  ({', '.join(decision.reasons)})")
        print(f"would delete {sum(not d.keep for d in plan)} snapshot(s), keep {sum(d.keep for d in plan)}")
        return EXIT_OK
    with RunLock(base):
        mark_abandoned(base)
        removed = prune_snapshots(base, policy, keep_vanished)
        kept = [decision for decision in retention_plan(base, policy, keep_vanished) if decision.keep]
    for name in removed:
        print(f"deleted {name}")
    print(f"deleted {len(removed)} snapshot(s), kept {len(kept)}")
    return EXIT_OK


def resolve_snapshot(base: Path, name: str) -> Path:
    """A snapshot named on the command line: `latest` or a folder name in --output."""
    snapshot = read_latest(base) if name == LATEST_LINK else base / name
    if snapshot is None or not SNAPSHOT_NAME_RE.match(snapshot.name) or not snapshot.is_dir():
        raise ConfigError(f"no snapshot {name!r} in {base}")
    if not isinstance(load_manifest(snapshot), dict):
        raise ConfigError(f"snapshot {snapshot.name} has no readable {MANIFEST_NAME}")
    return snapshot


def run_diff(output: Optional[str], names: List[str], as_json: bool) -> int:
    """--diff [OLD [NEW]]: read two snapshots and print how they differ; no lock, writes nothing."""
    base = snapshot_output(output, "--diff")
    if len(names) > 2:
        raise ConfigError("--diff takes at most two snapshots: OLD and NEW")
    new = resolve_snapshot(base, names[1] if len(names) == 2 else LATEST_LINK)
    if names:
        old = resolve_snapshot(base, names[0])
    else:
        earlier = [folder for folder in snapshot_folders(base)
                   if snapshot_key(folder) < snapshot_key(new) and read_summary(folder).get("status") == "completed"]
        if not earlier:
            raise ConfigError(f"no completed snapshot before {new.name} to compare with; name one: --diff OLD")
        old = resolve_snapshot(base, earlier[-1].name)
    diff = diff_snapshots(old, new)
    print(json.dumps(diff, indent=2) if as_json else "\n".join(format_diff(diff)))
    return EXIT_OK


def run_find(output: Optional[str], pattern: str, as_json: bool) -> int:
    """--find PATTERN: exit 0 with the matches, newest snapshot first; exit 1 when none."""
    found = find_objects(snapshot_output(output, "--find"), pattern)
    if as_json:
        print(json.dumps(found, indent=2))
    for item in [] if as_json else found:
        where = printable(item["name"]) if item["kind"] == "doc" else \
            f"{printable(item['doc_name'])} / {printable(item['name'])}"
        print(f"{item['snapshot']}  {item['kind']:<5} {where} ({printable(item['id'])})  "
              f"updatedAt {item['updatedAt'] or '?'}  {printable(item['path'])}")
    if not found and not as_json:
        print(f"no snapshot holds an object matching {pattern!r}")
    return EXIT_OK if found else EXIT_FAILURES


def reparse_with_config(parser: OneLineParser, cli: argparse.Namespace,
                        argv: Optional[List[str]]) -> argparse.Namespace:
    """Parse again with the config file's defaults; a repeatable flag given on the command
    line replaces the file's list instead of adding to it."""
    apply_config(parser, cli.config)
    args = parser.parse_args(argv)
    for flag in parser.flags.values():
        if flag.kind == "list" and getattr(cli, flag.dest):
            setattr(args, flag.dest, getattr(cli, flag.dest))
    return args


def apply_config(parser: OneLineParser, path: str) -> None:
    """Make a TOML file's keys the parser's defaults, so command-line flags still win."""
    if sys.version_info < (3, 11):
        raise ConfigError("--config needs Python 3.11 or newer (tomllib); pass the flags on the command line")
    import tomllib

    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read --config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path} is not valid TOML: {exc}") from None
    defaults = {}
    for key, value in data.items():
        flag = parser.flag_for_key(key)
        if flag is None or flag.kind == "command" or flag.dest == "config":
            raise ConfigError(f"--config {path}: unknown key {key!r}")
        if flag.dest in ONE_RUN_KEYS:
            raise ConfigError(f"--config {path}: {key!r} is for one run and has no --no- form to undo it; "
                              f"give --{flag.dest.replace('_', '-')} on the command line")
        defaults[flag.dest] = config_value(flag, key, value)
    parser.set_defaults(**defaults)


# Flags a config file may not set: commands, and switches meant for one run that the command line
# could not turn off again (allow-vanished = true would switch the deletion guard off every night).
ONE_RUN_KEYS = frozenset({"allow_vanished", "dry_run", "retry_failed", "verify", "list_runs", "diff", "find",
                          "prune"})


def config_value(flag: Flag, key: str, value: Any) -> Any:
    """Check one config value against what the flag accepts."""
    if flag.kind == "switch":
        valid = isinstance(value, bool)
    elif flag.kind == "list":
        valid = isinstance(value, list) and all(isinstance(item, str) for item in value)
    elif flag.kind == "int":
        valid = isinstance(value, int) and not isinstance(value, bool)
    elif flag.kind == "float":
        valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        valid = isinstance(value, str)
        value = flag.convert(value) if valid and flag.convert is not None else value
    if valid and flag.choices is not None and value not in flag.choices:
        valid = False
    if not valid:
        raise ConfigError(f"--config: bad value {value!r} for {key!r}")
    return value


def configure_logging(level: str, stream: Any, quiet: bool, secret: str) -> logging.Handler:
    handler: logging.Handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter(secret, LOG_FORMAT))
    handler.setLevel(logging.ERROR if quiet else getattr(logging, level))
    LOG.addHandler(handler)
    LOG.setLevel(getattr(logging, level))
    LOG.propagate = False
    return handler


def log_file_handler(path: str, level: str, secret: str) -> logging.Handler:
    """--log-file: appends, created 0600 (the log names docs and pages)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600))
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot open --log-file {path}: {exc.strerror or exc}") from None
    handler.setFormatter(RedactingFormatter(secret, LOG_FORMAT))
    handler.setLevel(getattr(logging, level))
    LOG.addHandler(handler)
    return handler


def flushed(code: int) -> int:
    """Flush what a command printed while main can still handle a closed pipe (else at exit)."""
    sys.stdout.flush()
    return code


def quiet_stdout() -> None:
    """Point stdout at devnull after a broken pipe, so the flush at exit cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: Optional[List[str]] = None) -> int:
    """Parse flags, run, and turn every expected failure into one line and an exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check_commands(args)
        if args.config:
            args = reparse_with_config(parser, args, argv)
    except SystemExit as exc:  # --help, --version: argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except ConfigError as exc:
        print(f"coda-backup: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    status_line = StatusLine(sys.stderr) if sys.stderr.isatty() and not args.quiet else None
    secret = os.environ.get("CODA_API_TOKEN", "").strip()
    level = "DEBUG" if args.verbose else args.log_level
    handlers = [configure_logging(level, status_line or sys.stderr, args.quiet, secret)]
    try:
        if args.log_file:
            handlers.append(log_file_handler(args.log_file, level, secret))
        if args.verify is not None:
            return flushed(run_verify(args.output, args.verify))
        if args.list_runs:
            return flushed(run_list(args.output, args.json, args.keep_vanished, retention_from_args(args)))
        if args.diff is not None:
            return flushed(run_diff(args.output, args.diff, args.json))
        if args.find is not None:
            return flushed(run_find(args.output, args.find, args.json))
        if args.prune:
            return flushed(run_prune(args.output, retention_from_args(args), args.keep_vanished, args.dry_run))
        options = options_from_args(args)
        started = utc_now()
        try:
            credentials = read_token(args.token_file)
        except ConfigError as exc:
            if not args.dry_run:
                record_run_that_never_started(options, started, EXIT_USAGE, str(exc), secret, ping=True)
            raise
        for handler in handlers:
            handler.setFormatter(RedactingFormatter(credentials.token, LOG_FORMAT))
        if args.dry_run:
            return flushed(dry_run(options, credentials))
        try:
            return run_with_pings(options, credentials, status_line)
        except LockedError as exc:  # run_with_pings has pinged
            record_run_that_never_started(options, started, EXIT_LOCKED, str(exc), credentials.token)
            raise
    except ConfigError as exc:
        print(f"coda-backup: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LockedError as exc:
        print(f"coda-backup: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except FatalError as exc:
        print(f"coda-backup: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        print("coda-backup: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except BrokenPipeError:  # `--list-runs | head -1`: the reader has all it wants
        quiet_stdout()
        return EXIT_OK
    except OSError as exc:  # the disk, not the API: full, read-only, permissions
        print(f"coda-backup: cannot write the backup: {exc}", file=sys.stderr)
        return EXIT_FATAL
    finally:
        for handler in handlers:
            LOG.removeHandler(handler)
            handler.close()


if __name__ == "__main__":
    sys.exit(main())
