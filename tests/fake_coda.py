"""A threaded, in-process fake of the Coda REST API v1 for coda-backup's tests and benchmark.

Why a fake: the backup tool must survive the real API's habits (opaque page tokens, clamped limits,
asynchronous page exports with signed download links on another host, 429s, 5xx, resets, stale
reads) and we want to prove that over real HTTP, without a network, a token or a live workspace.
Everything here is stdlib only and runs on Python 3.9+.

Three servers run on 127.0.0.1 with random ports:

* the API host, ``fake.api_url`` (``http://127.0.0.1:<port>/apis/v1``), which checks the bearer
  token and serves the JSON endpoints described in ``/work/shared/coda-api.md``;
* the download host, ``fake.download_url``, which plays the signed-blob store for page exports
  and, like S3, refuses requests that carry an ``Authorization`` header;
* the asset host, ``fake.assets_url``, which plays codahosted.io: the images and attachments
  that pages and cells link to (``fake.add_asset``), served without any credential, at URLs
  shaped like ``/docs/<docId>/blobs/bl-<id>/<200 hex characters>``; it logs request headers
  like the others, so tests can prove the token never reaches it.

Typical use::

    with FakeCoda(token="test-token", seed=0) as fake:
        data = build_sample_workspace(fake)
        fake.max_limit = 2                      # force pagination
        fake.add_fault(r"/rows$", status=503)   # one scripted 503
        ... run the CLI against fake.api_url ...
        posts = fake.requests("POST", r"/export$")

Dataset objects (:class:`Doc`, :class:`Page`, :class:`Table`, :class:`Row`) are plain mutable
Python objects; tests change them between runs.  Timestamps come from a fake clock that only moves
forward (one second per change), so ``updatedAt`` comparisons are deterministic.

Switches are plain attributes, settable at any time (see :class:`FakeCoda`): ``latency``,
``export_delay``, ``rate_limits``, ``retry_after``, ``fault_rate``, ``fault_kinds``,
``timeout_sleep``, ``repeat_token``, ``endless_tokens``, ``duplicate_ids``, ``download_stall``,
``trickle_interval``, ``max_limit``, ``gzip``, ``views_follow_base``; per page ``export_fail_times``,
``export_expire_times``, ``download_expire_times``; per doc ``forbidden``, ``stale_times``,
``acl_forbidden``, ``listed``; ``asset_latency`` on the asset host; per table ``set_calculated()``
(a formula result that changes while only the doc's ``updatedAt`` moves).  ``hold()`` keeps one
request waiting.  ``lose_api()`` plays an API that is gone for good (connections reset, or refused).

:class:`PingReceiver` is a separate small listener playing a monitoring service (healthchecks.io)
for ``--ping-url``: it records each ping's path, headers and text body, and can hang.

Every request lands in ``fake.log`` as a :class:`RequestRecord`; ``fake.requests(...)`` filters
it.  Handler bugs never pass silently: they answer 500 and are appended to ``fake.errors``.
"""

from __future__ import annotations

import base64
import collections
import collections.abc
import contextlib
import functools
import gzip
import hashlib
import html
import http
import itertools
import json
import random
import re
import socket
import string
import struct
import sys
import threading
import time
import traceback
import urllib.parse
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Pattern,
    Sequence,
    Set,
    Tuple,
    Union,
)

# --- constants ---------------------------------------------------------------------------

API_PREFIX = "/apis/v1"
DEFAULT_LIMIT = 25
COLUMN_LIMIT = 100  # the only documented per-endpoint maximum
DEFAULT_MAX_LIMIT = 200
FAULT_KINDS: Tuple[str, ...] = (
    "429", "429-retry-after", "500", "502", "503", "504", "reset", "timeout", "truncated", "notjson",
)
# Only scripted, never drawn at random: bodies that end late, never, or decode to too much.
BODY_KINDS: Tuple[str, ...] = ("trickle", "trickle-close", "endless", "gzip-bomb")
SCRIPTED_KINDS: Tuple[str, ...] = ("status",) + FAULT_KINDS + BODY_KINDS
TRICKLE_PIECE = 64  # bytes a "trickle" body sends at a time
GZIP_BOMB_BYTES = 160 << 20  # what a "gzip-bomb" body decodes to (from about 160 KB)
# An "endless" body stops after this much all the same, so that a client with no bound of its own
# fails its test instead of hanging it.
ENDLESS_BYTES = 256 << 20
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
EXPORT_FORMATS = {"markdown": "text/markdown; charset=utf-8", "html": "text/html; charset=utf-8"}
VALUE_FORMATS = frozenset({"simple", "simpleWithArrays", "rich"})
JSON_TYPE = "application/json; charset=utf-8"
XML_TYPE = "application/xml"
BROWSER_BASE = "https://coda.io"

_EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)
_ALNUM = string.ascii_letters + string.digits
_NOT_JSON_BODY = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>Service temporarily unavailable</h1></body></html>"
)

CellValue = Any
RowFilter = Callable[[Dict[str, CellValue]], bool]
RowFactory = Callable[[int], Union[Sequence[CellValue], Mapping[str, CellValue]]]


# --- small helpers -----------------------------------------------------------------------

def iso_time(tick: int) -> str:
    """Render a fake-clock tick (seconds since 2024-01-01) the way Coda prints timestamps."""
    return (_EPOCH + timedelta(seconds=tick)).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def simple_text(value: CellValue) -> str:
    """Text of one value inside a ``valueFormat=simple`` array (strings verbatim, rest as JSON)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def display_text(value: CellValue) -> str:
    """A row's ``name``: its display-column value as a string ("" for None, arrays comma-joined)."""
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(simple_text(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def markdown_to_html(title: str, markdown: str) -> str:
    """A deliberately small Markdown rendering, enough for an HTML export to differ from Markdown."""
    blocks: List[str] = []
    for block in re.split(r"\n\s*\n", markdown.strip()):
        lines = block.splitlines()
        heading = re.match(r"(#{1,6})\s+(.*)", block)
        if heading and len(lines) == 1:
            level = len(heading.group(1))
            blocks.append(f"<h{level}>{html.escape(heading.group(2))}</h{level}>")
        elif lines and all(line.startswith(("- ", "* ")) for line in lines):
            items = "".join(f"<li>{html.escape(line[2:])}</li>" for line in lines)
            blocks.append(f"<ul>{items}</ul>")
        elif lines:
            blocks.append("<p>" + "<br>".join(html.escape(line) for line in lines) + "</p>")
    body = "\n".join(blocks)
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head><body>\n{body}\n</body></html>\n"
    )


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, rem = divmod(number, 62)
        digits.append(_ALNUM[rem])
    return "".join(reversed(digits))


def _slug(name: str) -> str:
    """The readable part of a Coda browser link (``Launch-Status``)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:40] or "Untitled"


def _status_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class _Clock:
    """A fake clock that only moves forward, one second per change, shared by one fake."""

    def __init__(self) -> None:
        self._now = 0
        self._lock = threading.Lock()

    def tick(self) -> int:
        with self._lock:
            self._now += 1
            return self._now

    def now(self) -> int:
        with self._lock:
            return self._now


# --- dataset -----------------------------------------------------------------------------

@dataclass
class Column:
    """One table column; ``format_extra`` is merged into the API ``format`` object."""

    id: str
    name: str
    type: str = "text"
    is_array: bool = False
    calculated: bool = False
    formula: Optional[str] = None
    format_extra: Dict[str, Any] = field(default_factory=dict)


class Row:
    """One row: values keyed by column id.  ``name`` overrides the display-column text if set."""

    __slots__ = ("id", "values", "created", "updated", "name")

    def __init__(
        self, row_id: str, values: Dict[str, CellValue], created: int, updated: int,
        name: Optional[str] = None,
    ) -> None:
        self.id = row_id
        self.values = values
        self.created = created
        self.updated = updated
        self.name = name

    def __repr__(self) -> str:
        return f"Row({self.id!r}, {self.values!r})"


class LazyRows(Sequence[Row]):
    """Rows generated on demand from their index, so a 200 000-row table costs almost nothing.

    Why: the benchmark needs huge tables, and serving one page must stay O(page size).  A row
    fetched from here is a fresh object each time, so change it through ``Table.set_cell`` (which
    stores an override) rather than by mutating the returned ``Row``.  ``append`` adds real rows
    after the generated ones.
    """

    def __init__(self, table: Table, count: int, make_values: RowFactory, id_prefix: str) -> None:
        self._table = table
        self._count = count
        self._make_values = make_values
        self._id_prefix = id_prefix
        self._created = table._updated
        self._overrides: Dict[int, Row] = {}
        self._extra: List[Row] = []

    def __len__(self) -> int:
        return self._count + len(self._extra)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._row(i) for i in range(*index.indices(len(self)))]
        return self._row(self._normalize(index))

    def __setitem__(self, index: int, row: Row) -> None:
        index = self._normalize(index)
        if index >= self._count:
            self._extra[index - self._count] = row
        else:
            self._overrides[index] = row

    def append(self, row: Row) -> None:
        self._extra.append(row)

    def _normalize(self, index: int) -> int:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("row index out of range")
        return index

    def _row(self, index: int) -> Row:
        if index >= self._count:
            return self._extra[index - self._count]
        override = self._overrides.get(index)
        if override is not None:
            return override
        # Generated ids are 7 characters after "i-", random ones 6, so they can never collide.
        row_id = f"i-{self._id_prefix}{_base62(index, 5)}"
        values = self._table._resolve_values(self._make_values(index))
        return Row(row_id, values, self._created, self._created)


class Page:
    """A page of a doc.  Change ``content`` (or ``html``) and call ``touch()`` to edit it.

    ``html=None`` means "render ``content`` to simple HTML at export time".  The three
    ``*_times`` counters script export trouble for this page (see :class:`FakeCoda`).
    """

    def __init__(
        self, doc: Doc, page_id: str, name: str, parent: Optional[Page], hidden: bool,
        content: str, html_text: Optional[str], content_type: str, subtitle: str,
    ) -> None:
        self.doc = doc
        self.id = page_id
        self.name = name
        self.parent = parent
        self.hidden = hidden
        self.content = content
        self.html = html_text
        self.content_type = content_type
        self.subtitle = subtitle
        self.export_fail_times = 0
        self.export_expire_times = 0
        self.download_expire_times = 0
        self._created = self._updated = doc.fake._clock.tick()

    def __repr__(self) -> str:
        return f"Page({self.id!r}, {self.name!r})"

    @property
    def created_at(self) -> str:
        return iso_time(self._created)

    @property
    def updated_at(self) -> str:
        return iso_time(self._updated)

    @property
    def children(self) -> List[Page]:
        return [page for page in self.doc.pages if page.parent is self]

    @property
    def is_effectively_hidden(self) -> bool:
        page: Optional[Page] = self
        while page is not None:
            if page.hidden:
                return True
            page = page.parent
        return False

    def render(self, output_format: str) -> str:
        """The export body for ``markdown`` or ``html`` as of now."""
        if output_format == "html":
            return self.html if self.html is not None else markdown_to_html(self.name, self.content)
        return self.content

    def touch(self) -> None:
        """Mark the page content changed (also changes the doc)."""
        self._updated = self.doc.fake._clock.tick()
        self.doc.touch()


class Table:
    """A base table (``tableType`` "table") or a view of one (``tableType`` "view").

    A view shares its base table's columns and shows the base rows that pass ``row_filter``
    (called with the row's values keyed by column id; None keeps all).  Edit rows through the base
    table; a view's ``updatedAt`` is the later of its own and its base table's.
    """

    def __init__(
        self, doc: Doc, table_id: str, name: str, parent_page: Page, table_type: str = "table",
        base: Optional[Table] = None, row_filter: Optional[RowFilter] = None,
    ) -> None:
        self.doc = doc
        self.id = table_id
        self.name = name
        self.parent_page = parent_page
        self.table_type = table_type
        self.base = base
        self.row_filter = row_filter
        self.layout = "default"
        self.sorts: List[Dict[str, Any]] = []
        self._columns: List[Column] = []
        self._rows: Union[List[Row], LazyRows] = []
        self._created = self._updated = doc.fake._clock.tick()

    def __repr__(self) -> str:
        return f"Table({self.id!r}, {self.name!r}, {self.table_type!r})"

    # -- read side
    @property
    def is_view(self) -> bool:
        return self.base is not None

    @property
    def columns(self) -> List[Column]:
        return self.base.columns if self.base is not None else self._columns

    @property
    def rows(self) -> Sequence[Row]:
        """Rows in table order; for a filtered view a new list each call (O(base rows))."""
        if self.base is None:
            return self._rows
        base_rows = self.base.rows
        if self.row_filter is None:
            return base_rows
        keep = self.row_filter
        return [row for row in base_rows if keep(row.values)]

    @property
    def created_at(self) -> str:
        return iso_time(self._created)

    @property
    def updated_at(self) -> str:
        return iso_time(self.updated_tick)

    @property
    def updated_tick(self) -> int:
        if self.base is not None:
            if self.doc.fake.views_follow_base:
                return max(self._updated, self.base.updated_tick)
        return self._updated

    def column(self, name_or_id: str) -> Column:
        """The column with this id, else the first column with this name."""
        for column in self.columns:
            if column.id == name_or_id:
                return column
        for column in self.columns:
            if column.name == name_or_id:
                return column
        raise KeyError(f"table {self.name!r} has no column {name_or_id!r}")

    # -- write side (every change touches the table and the doc)
    def add_column(self, spec: Union[str, Mapping[str, Any]]) -> Column:
        self._require_base("add columns")
        column = self.doc.fake._make_column(spec)
        self._columns.append(column)
        self.touch()
        return column

    def remove_column(self, name_or_id: str) -> Column:
        """Delete a column; rows drop its values (as Coda does)."""
        self._require_base("remove columns")
        column = self.column(name_or_id)
        with self.doc.fake._state_lock:
            self._columns.remove(column)
            self.touch()
        return column

    def add_row(self, values: Mapping[str, CellValue], name: Optional[str] = None) -> Row:
        """Append a row; ``values`` keyed by column id or name (first column with that name)."""
        self._require_base("add rows")
        fake = self.doc.fake
        with fake._state_lock:
            tick = fake._clock.tick()
            row = Row(fake._new_id("i-", 6), self._resolve_values(values), tick, tick, name)
            self._rows.append(row)
            self.touch()
        return row

    def set_cell(self, row_index: int, column: str, value: CellValue) -> None:
        """Change one cell (by column name or id); bumps the row's and the table's updatedAt."""
        self._require_base("edit cells")
        fake = self.doc.fake
        with fake._state_lock:
            old = self._rows[row_index]
            values = dict(old.values)
            values[self.column(column).id] = value
            self._rows[row_index] = Row(old.id, values, old.created, fake._clock.tick(), old.name)
            self.touch()

    def set_calculated(self, row_index: int, column: str, value: CellValue) -> None:
        """Change what a calculated (formula or lookup) column shows in one row, as a change
        elsewhere in the doc would: Coda's row and table updatedAt ignore calculated values, so
        only the doc's updatedAt moves (see coda-api.md, "Change signals")."""
        self._require_base("edit cells")
        if not self.column(column).calculated:
            raise ValueError(f"column {column!r} is not calculated")
        fake = self.doc.fake
        with fake._state_lock:
            old = self._rows[row_index]
            values = dict(old.values)
            values[self.column(column).id] = value
            self._rows[row_index] = Row(old.id, values, old.created, old.updated, old.name)
            self.doc.touch()

    def remove_row(self, row_index: int) -> Row:
        self._require_base("remove rows")
        if isinstance(self._rows, LazyRows):
            raise TypeError("rows made by fill_rows cannot be removed")
        with self.doc.fake._state_lock:
            row = self._rows.pop(row_index)
            self.touch()
        return row

    def fill_rows(self, count: int, make_values: RowFactory) -> None:
        """Replace the rows by ``count`` lazily generated ones.

        ``make_values(index)`` returns a list aligned with the columns (fastest) or a mapping keyed
        by column id or name.  It must be deterministic: a row is rebuilt on every read.
        """
        self._require_base("fill rows")
        prefix = "".join(self.doc.fake._ids.choice(_ALNUM) for _ in range(2))
        with self.doc.fake._state_lock:
            self.touch()
            self._rows = LazyRows(self, count, make_values, prefix)

    def touch(self) -> None:
        """Mark the table changed (also changes the doc, not the parent page, as in Coda)."""
        self._updated = self.doc.fake._clock.tick()
        self.doc.touch()

    def _require_base(self, what: str) -> None:
        if self.base is not None:
            raise TypeError(f"{self.name!r} is a view; {what} on its base table")

    def _resolve_values(
        self, values: Union[Sequence[CellValue], Mapping[str, CellValue]],
    ) -> Dict[str, CellValue]:
        if isinstance(values, collections.abc.Mapping):
            return {self.column(key).id: value for key, value in values.items()}
        return {column.id: value for column, value in zip(self.columns, values)}


@dataclass
class Formula:
    id: str
    name: str
    value: CellValue
    parent: Optional[Page] = None


@dataclass
class Control:
    id: str
    name: str
    value: CellValue
    control_type: str = "textbox"
    parent: Optional[Page] = None


class Doc:
    """A Coda doc with its pages, tables/views, formulas, controls and sharing data.

    ``forbidden`` makes every ``/docs/{id}...`` request answer 403 (the doc is still listed);
    ``stale_times`` makes that many requests carrying ``X-Coda-Doc-Version: latest`` answer 400;
    ``acl_forbidden`` makes the ``/acl/...`` endpoints answer 403; ``listed=False`` hides the doc
    from ``GET /docs`` (a doc the user never opened) while it stays reachable by id.
    """

    def __init__(
        self, fake: FakeCoda, doc_id: str, name: str, owned: bool, workspace_id: str,
        folder_id: str,
    ) -> None:
        self.fake = fake
        self.id = doc_id
        self.name = name
        self.owned = owned
        self.workspace_id = workspace_id
        self.folder_id = folder_id
        self.folder_name = "My docs" if owned else "Shared with me"
        self.owner_email = fake.user_email if owned else "colleague@example.com"
        self.owner_name = fake.user_name if owned else "Pat Colleague"
        self.pages: List[Page] = []
        self.tables: List[Table] = []  # tables and views, in creation order
        self.formulas: List[Formula] = []
        self.controls: List[Control] = []
        self.permissions: List[Dict[str, Any]] = [
            {"id": f"perm-{doc_id}-1", "access": "write",
             "principal": {"type": "email", "email": self.owner_email}},
            {"id": f"perm-{doc_id}-2", "access": "readonly",
             "principal": {"type": "domain", "domain": "example.com"}},
        ]
        self.acl_settings: Dict[str, bool] = {
            "allowEditorsToChangePermissions": False, "allowCopying": True,
            "allowViewersToRequestEditing": True,
        }
        self.acl_metadata: Dict[str, bool] = {
            "canShare": owned, "canShareWithWorkspace": owned, "canShareWithOrg": False,
            "canCopy": True,
        }
        self.forbidden = False
        self.acl_forbidden = False
        self.stale_times = 0
        self.listed = True
        self._deleted_page_ids: Set[str] = set()
        self._created = self._updated = fake._clock.tick()

    def __repr__(self) -> str:
        return f"Doc({self.id!r}, {self.name!r})"

    @property
    def created_at(self) -> str:
        return iso_time(self._created)

    @property
    def updated_at(self) -> str:
        return iso_time(self._updated)

    def touch(self) -> None:
        self._updated = self.fake._clock.tick()

    # -- builders
    def add_page(
        self, name: str, parent: Optional[Page] = None, hidden: bool = False,
        content: Optional[str] = None, html: Optional[str] = None, content_type: str = "canvas",
        page_id: Optional[str] = None, subtitle: str = "",
    ) -> Page:
        """Add a page; ``content`` defaults to a small Markdown body naming the page."""
        if parent is not None and parent.doc is not self:
            raise ValueError("parent page belongs to another doc")
        if content is None:
            content = f"# {name}\n\nThis is the page {name}.\n"
        with self.fake._state_lock:
            page = Page(
                self, page_id or self.fake._new_id("canvas-", 7), name, parent, hidden, content,
                html, content_type, subtitle,
            )
            self.pages.append(page)
            self.touch()
        return page

    def add_table(
        self, name: str, columns: Optional[Sequence[Union[str, Mapping[str, Any]]]] = None,
        rows: Optional[Sequence[Mapping[str, CellValue]]] = None,
        parent_page: Optional[Page] = None, table_id: Optional[str] = None,
    ) -> Table:
        """Add a base table.  Without ``parent_page`` it goes on the doc's first page.

        ``columns``: names (text columns) or dicts ``{"name", "type", "isArray", "id",
        "calculated", "formula", "format"}``; default one column "Name".  ``rows``: dicts keyed by
        column name or id.
        """
        with self.fake._state_lock:
            page = parent_page or self._default_page()
            table = Table(self, table_id or self.fake._new_id("grid-", 6), name, page)
            for spec in columns if columns is not None else ["Name"]:
                table._columns.append(self.fake._make_column(spec))
            self.tables.append(table)
            for values in rows or ():
                table.add_row(values)
            self.touch()
        return table

    def add_view(
        self, table: Table, name: str, parent_page: Optional[Page] = None,
        row_filter: Optional[RowFilter] = None, view_id: Optional[str] = None,
    ) -> Table:
        """Add a view of ``table`` (on the table's page unless ``parent_page`` is given)."""
        if table.doc is not self or table.is_view:
            raise ValueError("a view needs a base table of the same doc")
        with self.fake._state_lock:
            view = Table(
                self, view_id or self.fake._new_id("table-", 6), name,
                parent_page or table.parent_page, "view", table, row_filter,
            )
            self.tables.append(view)
            self.touch()
        return view

    def add_formula(self, name: str, value: CellValue, parent: Optional[Page] = None) -> Formula:
        formula = Formula(self.fake._new_id("f-", 8), name, value, parent)
        self.formulas.append(formula)
        self.touch()
        return formula

    def add_control(
        self, name: str, value: CellValue, control_type: str = "textbox",
        parent: Optional[Page] = None,
    ) -> Control:
        control = Control(self.fake._new_id("ctrl-", 8), name, value, control_type, parent)
        self.controls.append(control)
        self.touch()
        return control

    def remove_page(self, page: Page) -> None:
        """Delete a page with its subpages and the tables/views on them (as Coda does).

        Views whose base table disappears go too.  Deleted page ids answer 410 afterwards.
        """
        with self.fake._state_lock:
            doomed = {page.id}
            for candidate in self.pages:  # pages are added after their parents, so one pass works
                if candidate.parent is not None and candidate.parent.id in doomed:
                    doomed.add(candidate.id)
            self.pages = [p for p in self.pages if p.id not in doomed]
            self._deleted_page_ids |= doomed
            for table in list(self.tables):
                if table.parent_page.id in doomed and table in self.tables:
                    self.remove_table(table)
            self.touch()

    def remove_table(self, table: Table) -> None:
        """Delete a table (and its views) or a view."""
        with self.fake._state_lock:
            gone = {table.id}
            gone |= {t.id for t in self.tables if t.base is not None and t.base.id in gone}
            self.tables = [t for t in self.tables if t.id not in gone]
            self.touch()

    # -- lookups (by id, then by name, like Coda's *IdOrName parameters)
    def page(self, id_or_name: str) -> Optional[Page]:
        return _find(self.pages, id_or_name)

    def table(self, id_or_name: str) -> Optional[Table]:
        return _find(self.tables, id_or_name)

    def pages_in_order(self) -> List[Page]:
        """Pages depth first (parent before children), siblings in creation order."""
        children: Dict[Optional[str], List[Page]] = collections.defaultdict(list)
        for page in self.pages:
            children[page.parent.id if page.parent else None].append(page)
        ordered: List[Page] = []
        stack = list(reversed(children[None]))
        while stack:
            page = stack.pop()
            ordered.append(page)
            stack.extend(reversed(children[page.id]))
        return ordered

    def _default_page(self) -> Page:
        top = [page for page in self.pages if page.parent is None]
        return top[0] if top else self.add_page("Untitled")


def _matches(pattern: Optional[Union[str, Pattern[str]]], path: str) -> bool:
    return pattern is not None and re.search(pattern, path) is not None


def _find(objects: Sequence[Any], id_or_name: str) -> Optional[Any]:
    for obj in objects:
        if obj.id == id_or_name:
            return obj
    for obj in objects:
        if obj.name == id_or_name:
            return obj
    return None


# --- request plumbing --------------------------------------------------------------------

@dataclass
class RequestRecord:
    """One request as the fake saw it.

    ``path`` is relative to /apis/v1 on the API host; ``status`` 0 means the connection was reset;
    ``ended`` is taken when the reply is ready, just before it is written; ``client_port`` tells
    connections apart (requests that share one came over a kept-alive connection).
    """

    host: str
    method: str
    path: str
    query: Dict[str, str]
    headers: Dict[str, str]
    body: Any
    target: str = ""
    status: int = 0
    started: float = 0.0
    ended: float = 0.0
    fault: Optional[str] = None
    client_port: int = 0


@dataclass
class _Request:
    host: str
    method: str
    target: str
    path: str
    query: Dict[str, str]
    headers: Dict[str, str]
    body: Any
    client_port: int = 0


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    content_type: str = JSON_TYPE
    headers: Dict[str, str] = field(default_factory=dict)
    reset: bool = False
    no_length: bool = False  # no Content-Length: the body ends when the connection closes
    # Sent instead of `body`, piece by piece with `pause` seconds between (Content-Length `length`,
    # or none with no_length): a body that trickles, or one that never ends.
    pieces: Optional[Iterator[bytes]] = None
    length: int = 0
    pause: float = 0.0


@dataclass
class _Ctx:
    """What a route handler needs: the request, decoded path params, the gated doc, dry-run flag.

    ``dry_run`` is set when a "truncated" fault needs the real body but must not change state.
    """

    request: _Request
    params: Dict[str, str]
    doc: Optional[Doc]
    dry_run: bool


@dataclass
class _ScriptedFault:
    pattern: Pattern[str]
    method: Optional[str]
    status: int
    times: Optional[int]
    kind: str
    headers: Dict[str, str]
    body: Any
    host: str


class Hold:
    """See :meth:`FakeCoda.hold`."""

    def __init__(self, pattern: Pattern[str], method: Optional[str], stopping: threading.Event) -> None:
        self.pattern = pattern
        self.method = method
        self.reached = threading.Event()
        self._released = threading.Event()
        self._stopping = stopping
        self._taken = False
        self._lock = threading.Lock()

    def release(self) -> None:
        self._released.set()

    def wait_if_matching(self, request: Any) -> None:
        if (self.method is not None and request.method != self.method) or not self.pattern.search(request.path):
            return
        with self._lock:
            if self._taken:
                return
            self._taken = True
        self.reached.set()
        while not (self._released.wait(0.02) or self._stopping.is_set()):
            pass


@dataclass
class _Export:
    id: str
    doc: Doc
    page: Page
    output_format: str
    content: bytes
    started: float
    state: str = "inProgress"  # inProgress | complete | failed


@dataclass
class _Blob:
    content: bytes
    content_type: str
    page: Page


@dataclass
class _Asset:
    """One file on the asset host: ``status`` other than 200 is answered every time (404 gone,
    500 broken); ``location`` makes it a 302 redirect; ``chunked`` sends it without a length."""

    content: bytes
    content_type: str
    status: int = 200
    location: Optional[str] = None
    chunked: bool = False


class _HttpError(Exception):
    def __init__(self, status: int, message: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message or _status_phrase(status))
        self.status = status
        self.message = message or _status_phrase(status)
        self.headers = headers or {}


@functools.lru_cache(maxsize=1)
def _gzip_bomb() -> bytes:
    """A gzip body of about 160 KB that decodes to GZIP_BOMB_BYTES of spaces (made once)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    spaces = b" " * (1 << 20)
    return b"".join([packer.compress(spaces) for _ in range(GZIP_BOMB_BYTES >> 20)] + [packer.flush()])


def _json_reply(status: int, payload: Any, headers: Optional[Dict[str, str]] = None) -> _Reply:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    return _Reply(status, body, JSON_TYPE, dict(headers or {}))


def _error_reply(status: int, message: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None) -> _Reply:
    phrase = _status_phrase(status)
    payload = {"statusCode": status, "statusMessage": phrase, "message": message or phrase}
    return _json_reply(status, payload, headers)


def _xml_error(status: int, code: str, message: str) -> _Reply:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{html.escape(message)}</Message></Error>"
    )
    return _Reply(status, body.encode("utf-8"), XML_TYPE)


# (method, path pattern relative to /apis/v1, handler method name)
_ROUTES: List[Tuple[str, Pattern[str], str]] = [
    (method, re.compile(pattern), handler)
    for method, pattern, handler in [
        ("GET", r"/whoami", "_get_whoami"),
        ("GET", r"/docs", "_list_docs"),
        ("GET", r"/docs/(?P<doc>[^/]+)", "_get_doc"),
        ("GET", r"/docs/(?P<doc>[^/]+)/pages", "_list_pages"),
        ("GET", r"/docs/(?P<doc>[^/]+)/pages/(?P<page>[^/]+)", "_get_page"),
        ("POST", r"/docs/(?P<doc>[^/]+)/pages/(?P<page>[^/]+)/export", "_begin_export"),
        ("GET", r"/docs/(?P<doc>[^/]+)/pages/(?P<page>[^/]+)/export/(?P<export>[^/]+)",
         "_export_status"),
        ("GET", r"/docs/(?P<doc>[^/]+)/tables", "_list_tables"),
        ("GET", r"/docs/(?P<doc>[^/]+)/tables/(?P<table>[^/]+)", "_get_table"),
        ("GET", r"/docs/(?P<doc>[^/]+)/tables/(?P<table>[^/]+)/columns", "_list_columns"),
        ("GET", r"/docs/(?P<doc>[^/]+)/tables/(?P<table>[^/]+)/columns/(?P<column>[^/]+)",
         "_get_column"),
        ("GET", r"/docs/(?P<doc>[^/]+)/tables/(?P<table>[^/]+)/rows", "_list_rows"),
        ("GET", r"/docs/(?P<doc>[^/]+)/tables/(?P<table>[^/]+)/rows/(?P<row>[^/]+)", "_get_row"),
        ("GET", r"/docs/(?P<doc>[^/]+)/formulas", "_list_formulas"),
        ("GET", r"/docs/(?P<doc>[^/]+)/formulas/(?P<formula>[^/]+)", "_get_formula"),
        ("GET", r"/docs/(?P<doc>[^/]+)/controls", "_list_controls"),
        ("GET", r"/docs/(?P<doc>[^/]+)/controls/(?P<control>[^/]+)", "_get_control"),
        ("GET", r"/docs/(?P<doc>[^/]+)/acl/permissions", "_list_permissions"),
        ("GET", r"/docs/(?P<doc>[^/]+)/acl/settings", "_get_acl_settings"),
        ("GET", r"/docs/(?P<doc>[^/]+)/acl/metadata", "_get_acl_metadata"),
    ]
]


# --- HTTP servers ------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    """One listening socket of the fake; ``kind`` is "api", "download" or "assets"."""

    daemon_threads = True
    block_on_close = True  # server_close() joins handler threads; stop() unblocks them first
    # A run opens a connection per worker and export thread at once. socketserver's default
    # backlog of 5 overflows then, and the kernel drops the SYNs beyond it: the client sends them
    # again after a second, so about one run in fifteen stalled for a second.
    request_queue_size = 128

    def __init__(self, fake: FakeCoda, kind: str) -> None:
        self.fake = fake
        self.kind = kind
        super().__init__(("127.0.0.1", 0), _Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """After lose_api(), a new connection to the API host is reset before a byte is read."""
        if self.kind == "api" and self.fake.api_lost:
            self.fake._count_lost()
            with contextlib.suppress(OSError):
                request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that hang up; record anything else for the tests to see."""
        if isinstance(sys.exc_info()[1], (ConnectionError, socket.timeout)):
            return
        self.fake._record_error(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    """Thin adapter: parse the request, ask the fake for a reply, write it (or reset)."""

    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections are closed after this, like a real server
    # Headers and body go out in two sends; without TCP_NODELAY every keep-alive request
    # would wait ~40 ms for a delayed ACK.
    disable_nagle_algorithm = True
    server: _Server

    @property
    def server_version(self) -> str:  # type: ignore[override]
        return {"download": "AmazonS3", "assets": "fake-codahosted"}.get(self.server.kind, "coda-fake")

    def setup(self) -> None:
        self.timeout = self.server.fake.idle_timeout  # read by StreamRequestHandler.setup
        super().setup()
        if not self.server.fake._register_connection(self.connection):
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._unregister_connection(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence: tests read ``fake.log`` instead."""

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _dispatch(self) -> None:
        fake = self.server.fake
        request = self._read_request()
        if self.server.kind == "api" and fake.api_lost:  # a kept-alive connection: reset, no answer
            fake._count_lost()
            self._reset()
            return
        # The request stops counting as in flight before its reply is written: a client that
        # sends its next request the moment it reads this reply must not look concurrent.
        with fake._tracked(request) as record:
            reply = fake._respond(request, record)
            record.status = 0 if reply.reset else reply.status
        self._send(reply, request)
        if fake._stopping.is_set():
            self.close_connection = True

    def _read_request(self) -> _Request:
        split = urllib.parse.urlsplit(self.path)
        kind = self.server.kind
        path = split.path
        if kind == "api" and (path == API_PREFIX or path.startswith(API_PREFIX + "/")):
            path = path[len(API_PREFIX):] or "/"
        query = {
            key: values[0]
            for key, values in urllib.parse.parse_qs(split.query, keep_blank_values=True).items()
        }
        headers = {key.lower(): value for key, value in self.headers.items()}
        length = int(headers.get("content-length") or 0)
        raw_body = self.rfile.read(length) if length > 0 else b""
        body: Any = None
        if raw_body:
            try:
                body = json.loads(raw_body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                body = None
        return _Request(kind, self.command, self.path, path, query, headers, body, int(self.client_address[1]))

    def _send(self, reply: _Reply, request: _Request) -> None:
        if reply.reset:
            self._reset()
            return
        body = reply.body
        headers = dict(reply.headers)
        fake = self.server.fake
        if (fake.gzip and body and "gzip" in request.headers.get("accept-encoding", "")
                and "Content-Encoding" not in headers):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            if reply.no_length:
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(reply.length if reply.pieces is not None else len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if reply.pieces is None:
                self.wfile.write(body)
                return
            for piece in reply.pieces:
                if fake._stopping.is_set():
                    break
                self.wfile.write(piece)
                self.wfile.flush()
                fake._pause(reply.pause)
            self.close_connection = True
        except OSError:  # the client hung up (e.g. after its own timeout)
            self.close_connection = True

    def _reset(self) -> None:
        """Abort the connection so the client sees ECONNRESET instead of a clean close."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0),
            )
        # The socket really closes (with RST) once finish() closes rfile's reference to it.
        self.connection.close()


# --- the fake ----------------------------------------------------------------------------

class FakeCoda:
    """The fake Coda service: dataset, switches, request log and the two HTTP servers.

    Switches (plain attributes, any time):

    * ``latency``: seconds slept at the start of every API request (counted as in flight).
    * ``export_delay``: seconds an export stays "inProgress" after its POST.
    * ``rate_limits``: None or ``{"read": (limit, window_s), "write": ..., "list_docs": ...}``;
      429 when a category is over its limit.  ``rate_model`` says how the limit is counted, since
      Coda does not say: ``"window"`` (default) allows at most ``limit`` accepted requests in any
      ``window_s``; ``"bucket"`` is a token bucket holding ``limit`` tokens that refill at
      ``limit / window_s`` per second (a burst of ``limit``, then a steady rate).  ``retry_after``:
      None or seconds sent as ``Retry-After`` with those 429s.
    * ``fault_rate`` / ``fault_kinds``: random faults on API requests, drawn from a
      ``random.Random`` seeded from ``seed`` (one draw per authorized request, plus one choice
      when it faults), so the same seed and request order give the same faults.
    * ``timeout_sleep``: how long a "timeout" fault stalls before answering normally.
    * ``repeat_token``: regex; list endpoints whose path matches hand back the same
      ``nextPageToken`` forever after the first page.
    * ``endless_tokens``: regex; list endpoints whose path matches never end: every page carries a
      fresh ``nextPageToken``, and past the last item the listing starts over (as a mock made from
      the OpenAPI description answers every page with the same example items).
    * ``duplicate_ids``: regex; on list endpoints whose path matches, every page after the first
      starts with the last item of the page before (a list that shifted between two requests).
    * ``download_stall``: seconds the download host waits before it answers (cut short by stop()).
    * ``trickle_interval``: seconds between the pieces of a "trickle" fault's body.
    * ``max_limit``: server maximum for ``limit`` (columns are also capped at 100).
    * ``gzip``: gzip bodies (both hosts) for clients that accept it.

    Observations: ``log``, ``requests()``, ``max_in_flight``, ``rate_limited`` (every 429 the API
    host sent: rate limiter, random and scripted faults), ``errors`` (handler tracebacks).
    """

    def __init__(self, token: str = "test-token", seed: int = 0) -> None:
        self.token = token
        self.seed = seed
        self.docs: List[Doc] = []
        # identity of the token's user
        self.user_name = "Test User"
        self.user_email = "user@example.com"
        self.token_name = "coda-backup tests"
        self.workspace_id = "ws-1"
        self.workspace_names: Dict[str, str] = {"ws-1": "Acme Workspace", "ws-2": "Partner Workspace"}
        # switches
        self.latency = 0.0
        self.export_delay = 0.0
        self.rate_limits: Optional[Dict[str, Tuple[int, float]]] = None
        self.rate_model = "window"
        self.rate_clock: Callable[[], float] = time.monotonic  # tests may step a clock of their own
        self.retry_after: Optional[int] = None
        self.fault_rate = 0.0
        self.fault_kinds: Tuple[str, ...] = FAULT_KINDS
        self.timeout_sleep = 0.5
        self.repeat_token: Optional[Union[str, Pattern[str]]] = None
        self.endless_tokens: Optional[Union[str, Pattern[str]]] = None
        self.duplicate_ids: Optional[Union[str, Pattern[str]]] = None
        self.download_stall = 0.0
        self.trickle_interval = 0.05
        self.max_limit = DEFAULT_MAX_LIMIT
        self.gzip = False
        # Whether Coda bumps a view's updatedAt when its base table changes is not documented;
        # False lets tests play the worst case.
        self.views_follow_base = True
        # Seconds a keep-alive connection may sit idle before the server closes it, as load
        # balancers do (applies to connections opened after it is set).
        self.idle_timeout = 60.0
        # lose_api(): every API request is reset from then on; lost_connections counts them.
        self.api_lost = False
        self.lost_connections = 0
        # Test hooks on the API host, called on the handler thread: before_api(request) before
        # anything else (to look at the disk mid-run), after_api(request, reply) once the reply
        # is ready (to script a fault for a later page of a listing, which add_fault cannot).
        self.before_api: List[Callable[[Any], None]] = []
        self.after_api: List[Callable[[Any, Any], None]] = []
        # observations
        self.log: List[RequestRecord] = []
        # False: requests are served but not logged (a test's own look at the truth, after a run
        # whose log other tests of its class read: see support.SharedRunTestCase).
        self.log_requests = True
        self.errors: List[str] = []
        self.max_in_flight = 0
        self.rate_limited = 0
        # internals
        self._clock = _Clock()
        self._ids = random.Random(seed)
        self._fault_rng = random.Random(f"{seed}:faults")
        self._used_ids: Set[str] = set()
        self._lock = threading.Lock()  # log, counters, faults, rate windows
        self._state_lock = threading.RLock()  # dataset, exports, blobs
        self._in_flight = 0
        self._accepted: Dict[str, Deque[float]] = collections.defaultdict(collections.deque)
        self._buckets: Dict[str, Tuple[float, float]] = {}  # category -> (tokens, when counted)
        self._faults: List[_ScriptedFault] = []
        self._exports: Dict[str, _Export] = {}
        self._blobs: Dict[str, _Blob] = {}
        self._assets: Dict[str, _Asset] = {}
        self.asset_latency = 0.0
        self._stopping = threading.Event()
        self._connections: Set[socket.socket] = set()
        self._servers: List[_Server] = []
        self._threads: List[threading.Thread] = []

    # -- lifecycle
    def start(self) -> FakeCoda:
        """Start both servers on random ports; returns self."""
        if self._servers:
            raise RuntimeError("FakeCoda already started")
        self._stopping.clear()
        self._servers = [_Server(self, "api"), _Server(self, "download"), _Server(self, "assets")]
        for server in self._servers:
            # stop() waits for each serve loop's next poll, and most tests start and stop a fake:
            # a short poll keeps that wait small (the idle wake-ups cost next to no CPU).
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.005},
                name=f"fake-coda-{server.kind}", daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Shut both servers down: stop accepting, cut idle keep-alive connections, join threads."""
        if not self._servers:
            return
        with self._lock:
            self._stopping.set()  # cuts latency/timeout sleeps short too
            connections = list(self._connections)
        # shutdown() waits for the serve loop's next poll; do both servers at once.
        stoppers = [threading.Thread(target=server.shutdown) for server in self._servers]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for server in self._servers:
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers = []
        self._threads = []

    def __enter__(self) -> FakeCoda:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self._port('api')}{API_PREFIX}"

    @property
    def download_url(self) -> str:
        return f"http://127.0.0.1:{self._port('download')}"

    @property
    def assets_url(self) -> str:
        """The asset host's prefix, with its final "/" (what ``--asset-host`` takes)."""
        return f"http://127.0.0.1:{self._port('assets')}/"

    def _port(self, kind: str) -> int:
        for server in self._servers:
            if server.kind == kind:
                return int(server.server_address[1])
        raise RuntimeError("FakeCoda is not started")

    # -- dataset
    def add_doc(
        self, name: str, owned: bool = True, workspace_id: str = "ws-1",
        doc_id: Optional[str] = None, folder_id: Optional[str] = None,
    ) -> Doc:
        """Add a doc; ``owned=False`` makes it a doc shared with the user."""
        with self._state_lock:
            doc = Doc(
                self, doc_id or self._new_id("", 10), name, owned, workspace_id,
                folder_id or f"fl-{workspace_id}-{'mine' if owned else 'shared'}",
            )
            self.docs.append(doc)
        return doc

    def get_doc(self, doc_id: str) -> Optional[Doc]:
        return next((doc for doc in self.docs if doc.id == doc_id), None)

    def remove_doc(self, doc: Doc) -> None:
        with self._state_lock:
            self.docs = [d for d in self.docs if d is not doc]

    def remove_page(self, doc: Doc, page: Page) -> None:
        doc.remove_page(page)

    def remove_table(self, doc: Doc, table: Table) -> None:
        doc.remove_table(table)

    def _new_id(self, prefix: str, length: int) -> str:
        with self._lock:
            while True:
                candidate = prefix + "".join(self._ids.choice(_ALNUM) for _ in range(length))
                if candidate not in self._used_ids:
                    self._used_ids.add(candidate)
                    return candidate

    def _make_column(self, spec: Union[str, Mapping[str, Any]]) -> Column:
        if isinstance(spec, str):
            return Column(self._new_id("c-", 6), spec)
        return Column(
            id=spec.get("id") or self._new_id("c-", 6),
            name=spec["name"],
            type=spec.get("type", "text"),
            is_array=bool(spec.get("isArray", False)),
            calculated=bool(spec.get("calculated", False)),
            formula=spec.get("formula"),
            format_extra=dict(spec.get("format", {})),
        )

    # -- faults
    def add_fault(
        self, path: str, method: Optional[str] = "GET", status: int = 500,
        times: Optional[int] = 1, kind: str = "status", headers: Optional[Dict[str, str]] = None,
        body: Any = None, host: str = "api",
    ) -> None:
        """Script a fault for requests whose path matches the regex ``path`` (re.search).

        ``method=None`` matches any method; ``times=None`` means forever.  Scripted faults are
        checked before random ones; the first matching one wins.  ``kind`` is "status" (answer
        ``status`` with ``body``/``headers``; body None → the usual error body) or one of
        :data:`FAULT_KINDS` or :data:`BODY_KINDS`: "trickle" sends the real answer
        ``TRICKLE_PIECE`` bytes every ``trickle_interval`` seconds ("trickle-close" the same with no
        Content-Length and ``Connection: close``: the body ends when the connection does), "endless" a 200 whose body
        never ends (well, after ``ENDLESS_BYTES``), "gzip-bomb" a 200 gzip body that decodes to ``GZIP_BOMB_BYTES``.
        """
        if kind not in SCRIPTED_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        if host not in ("api", "download", "assets"):
            raise ValueError(f"unknown host {host!r}")
        fault = _ScriptedFault(
            re.compile(path), method.upper() if method else None, status, times, kind,
            dict(headers or {}), body, host,
        )
        with self._lock:
            self._faults.append(fault)

    def lose_api(self, refuse: bool = False) -> None:
        """Play an API that is gone for good: from now on every API request, new connection or
        kept-alive, is reset without any HTTP answer (counted in ``lost_connections``, not logged).
        ``refuse=True`` also closes the API host's listening socket, so new connections are refused
        (ECONNREFUSED). Safe to call from a hook on a handler thread; the download host stays up.
        """
        self.api_lost = True
        if refuse:
            for server in self._servers:
                if server.kind == "api":
                    server.shutdown()  # returns at the serve loop's next poll (never call it on that loop)
                    server.socket.close()

    def _count_lost(self) -> None:
        with self._lock:
            self.lost_connections += 1

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def hold(self, path: str, method: Optional[str] = "GET") -> Hold:
        """Keep the first API request whose path matches the regex waiting, before it is answered,
        until ``release()`` (or the fake stops): a test can then interrupt the client at a known
        point instead of sleeping and hoping.  ``reached`` is set when the request arrives."""
        hold = Hold(re.compile(path), method.upper() if method else None, self._stopping)
        self.before_api.append(hold.wait_if_matching)
        return hold

    # -- observations
    def requests(
        self, method: Optional[str] = None, path: Optional[str] = None,
        host: Optional[str] = "api",
    ) -> List[RequestRecord]:
        """Logged requests filtered by method, path regex (re.search) and host (None = both)."""
        pattern = re.compile(path) if path is not None else None
        with self._lock:
            records = list(self.log)
        return [
            record for record in records
            if (host is None or record.host == host)
            and (method is None or record.method == method.upper())
            and (pattern is None or pattern.search(record.path))
        ]

    def clear_log(self) -> None:
        """Forget logged requests and restart ``max_in_flight``/``rate_limited`` counting."""
        with self._lock:
            self.log.clear()
            self.max_in_flight = self._in_flight
            self.rate_limited = 0

    # -- connection bookkeeping (so stop() never waits on an idle keep-alive connection)
    def _register_connection(self, connection: socket.socket) -> bool:
        with self._lock:
            if self._stopping.is_set():
                return False
            self._connections.add(connection)
            return True

    def _unregister_connection(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _record_error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the fake stops so stop() stays fast."""
        if seconds > 0:
            self._stopping.wait(seconds)

    @contextlib.contextmanager
    def _tracked(self, request: _Request) -> Iterator[RequestRecord]:
        """Log the request and count it as in flight (API host) while its reply is computed."""
        record = RequestRecord(
            host=request.host, method=request.method, path=request.path,
            query=dict(request.query), headers=dict(request.headers), body=request.body,
            target=request.target, started=time.monotonic(), client_port=request.client_port,
        )
        api = request.host == "api"
        with self._lock:
            if self.log_requests:
                self.log.append(record)
            if api:
                self._in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            yield record
        finally:
            record.ended = time.monotonic()
            with self._lock:
                if api:
                    self._in_flight -= 1
                    if record.status == 429:
                        self.rate_limited += 1

    # -- request pipeline
    def _respond(self, request: _Request, record: RequestRecord) -> _Reply:
        try:
            if request.host == "download":
                return self._respond_download(request, record)
            if request.host == "assets":
                return self._respond_asset(request, record)
            return self._respond_api(request, record)
        except Exception:  # a bug in the fake: answer 500 and keep the traceback for the tests
            self._record_error(traceback.format_exc())
            return _error_reply(500, "fake_coda internal error")

    def _respond_api(self, request: _Request, record: RequestRecord) -> _Reply:
        """Hooks around the reply; see :attr:`before_api` and :attr:`after_api`."""
        for hook in list(self.before_api):
            hook(request)
        reply = self._answer_api(request, record)
        for after in list(self.after_api):
            after(request, reply)
        return reply

    def _answer_api(self, request: _Request, record: RequestRecord) -> _Reply:
        """Latency, auth, faults (scripted, then random), rate limit, then the route."""
        self._pause(self.latency)
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return _error_reply(401)
        fault = self._take_scripted_fault(request)
        kind = fault.kind if fault else self._draw_random_fault()
        if kind is not None:
            record.fault = kind
            reply = self._fault_reply(kind, fault, lambda: self._route(request, dry_run=True))
            if reply is not None:
                return reply
        limited = self._rate_limit(request)
        if limited is not None:
            return limited
        return self._route(request, dry_run=False)

    def _respond_download(self, request: _Request, record: RequestRecord) -> _Reply:
        self._pause(self.download_stall)
        fault = self._take_scripted_fault(request)
        if fault is not None:
            record.fault = fault.kind
            reply = self._fault_reply(
                fault.kind, fault, lambda: self._download(request, dry_run=True),
            )
            if reply is not None:
                return reply
        return self._download(request, dry_run=False)

    def _respond_asset(self, request: _Request, record: RequestRecord) -> _Reply:
        """codahosted.io: files by path, no credential needed (one sent is answered 400, as S3
        does, so a leak would also show as a failure)."""
        self._pause(self.asset_latency)
        fault = self._take_scripted_fault(request)
        if fault is not None:
            record.fault = fault.kind
            reply = self._fault_reply(fault.kind, fault, lambda: _Reply(500))
            if reply is not None:
                return reply
        if request.method != "GET":
            return _xml_error(405, "MethodNotAllowed", "The specified method is not allowed.")
        if "authorization" in request.headers or "cookie" in request.headers:
            return _xml_error(400, "InvalidArgument", "No credentials expected")
        with self._state_lock:
            asset = self._assets.get(request.path)
        if asset is None:
            return _xml_error(404, "NoSuchKey", "The specified key does not exist.")
        if asset.location is not None:
            return _Reply(302, b"", "text/plain", {"Location": asset.location})
        if asset.status != 200:
            return _xml_error(asset.status, _status_phrase(asset.status).replace(" ", ""),
                              _status_phrase(asset.status))
        return _Reply(200, asset.content, asset.content_type, no_length=asset.chunked)

    def add_asset(
        self, doc: Doc, content: bytes = b"", content_type: str = "image/png", status: int = 200,
        redirect_to: Optional[str] = None, chunked: bool = False,
    ) -> str:
        """Put a file on the asset host; return its URL (the fake must be started).

        The URL has codahosted.io's shape: ``/docs/<docId>/blobs/bl-<id>/<200 hex characters>``.
        ``status`` 404/500 makes it answer that every time; ``redirect_to`` (a URL) makes it a 302.
        """
        blob_id = self._new_id("bl-", 10)
        digest = hashlib.sha512(content + blob_id.encode()).hexdigest()
        digest += hashlib.sha256(digest.encode()).hexdigest()[:72]
        path = f"/docs/{doc.id}/blobs/{blob_id}/{digest}"
        with self._state_lock:
            self._assets[path] = _Asset(content, content_type, status, redirect_to, chunked)
        return self.assets_url + path.lstrip("/")

    def _take_scripted_fault(self, request: _Request) -> Optional[_ScriptedFault]:
        with self._lock:
            for fault in self._faults:
                if (fault.host == request.host
                        and (fault.method is None or fault.method == request.method)
                        and fault.pattern.search(request.path)):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def _draw_random_fault(self) -> Optional[str]:
        kinds = tuple(self.fault_kinds)
        if self.fault_rate <= 0 or not kinds:
            return None
        with self._lock:
            if self._fault_rng.random() >= self.fault_rate:
                return None
            return self._fault_rng.choice(kinds)

    def _fault_reply(
        self, kind: str, fault: Optional[_ScriptedFault], real: Callable[[], _Reply],
    ) -> Optional[_Reply]:
        """The reply for one fault; None means "go on normally" (after a "timeout" stall)."""
        if kind == "status":
            assert fault is not None
            return self._scripted_status_reply(fault)
        if kind == "429":
            return _error_reply(429)
        if kind == "429-retry-after":
            return _error_reply(429, headers={"Retry-After": "0"})
        if kind in ("500", "502", "503", "504"):
            return _error_reply(int(kind))
        if kind == "reset":
            return _Reply(0, reset=True)
        if kind == "timeout":
            self._pause(self.timeout_sleep)
            return None
        if kind == "truncated":
            body = real().body
            return _Reply(200, body[: len(body) // 2], JSON_TYPE)
        if kind == "notjson":
            return _Reply(200, _NOT_JSON_BODY, "text/html; charset=utf-8")
        if kind in ("trickle", "trickle-close"):
            reply = real()
            body = reply.body
            reply.pieces = (body[start:start + TRICKLE_PIECE] for start in range(0, len(body), TRICKLE_PIECE))
            reply.length, reply.pause = len(body), self.trickle_interval
            reply.no_length = kind == "trickle-close"
            return reply
        if kind == "endless":
            filler = b"x" * 65536
            return _Reply(200, content_type=JSON_TYPE, no_length=True,
                          pieces=itertools.chain([b'{"items": ["'],
                                                 itertools.repeat(filler, ENDLESS_BYTES // len(filler))))
        if kind == "gzip-bomb":
            return _Reply(200, _gzip_bomb(), JSON_TYPE, headers={"Content-Encoding": "gzip"})
        raise ValueError(f"unknown fault kind {kind!r}")

    @staticmethod
    def _scripted_status_reply(fault: _ScriptedFault) -> _Reply:
        if fault.body is None:
            if fault.host in ("download", "assets"):
                reply = _xml_error(fault.status, _status_phrase(fault.status).replace(" ", ""),
                                   _status_phrase(fault.status))
            else:
                reply = _error_reply(fault.status)
        elif isinstance(fault.body, (bytes, str)):
            raw = fault.body.encode("utf-8") if isinstance(fault.body, str) else fault.body
            reply = _Reply(fault.status, raw, "text/plain; charset=utf-8")
        else:
            reply = _json_reply(fault.status, fault.body)
        reply.headers.update(fault.headers)
        return reply

    def _rate_limit(self, request: _Request) -> Optional[_Reply]:
        """One limit per category, counted as ``rate_model`` says; rejected requests do not count."""
        limits = self.rate_limits
        if not limits:
            return None
        if request.method in WRITE_METHODS:
            category = "write"
        elif request.path == "/docs":
            category = "list_docs"
        else:
            category = "read"
        rule = limits.get(category)
        if rule is None:
            return None
        limit, window = rule
        now = self.rate_clock()
        with self._lock:
            if self.rate_model == "bucket":
                tokens, counted = self._buckets.get(category, (float(limit), now))
                tokens = min(float(limit), tokens + (now - counted) * limit / window)
                allowed = tokens >= 1.0
                self._buckets[category] = (tokens - 1.0 if allowed else tokens, now)
            else:
                stamps = self._accepted[category]
                while stamps and stamps[0] <= now - window:
                    stamps.popleft()
                allowed = len(stamps) < limit
                if allowed:
                    stamps.append(now)
        if allowed:
            return None
        headers = {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
        return _error_reply(429, headers=headers)

    def _route(self, request: _Request, dry_run: bool) -> _Reply:
        allowed: List[str] = []
        for method, pattern, handler_name in _ROUTES:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            if method != request.method:
                allowed.append(method)
                continue
            params = {key: urllib.parse.unquote(value) for key, value in match.groupdict().items()}
            with self._state_lock:
                try:
                    doc = self._gate_doc(params["doc"], request, dry_run) if "doc" in params else None
                    handler: Callable[[_Ctx], _Reply] = getattr(self, handler_name)
                    return handler(_Ctx(request, params, doc, dry_run))
                except _HttpError as error:
                    return _error_reply(error.status, error.message, error.headers)
        if allowed:
            return _error_reply(405, headers={"Allow": ", ".join(sorted(set(allowed)))})
        return _error_reply(404, "The requested resource could not be found.")

    def _gate_doc(self, doc_id: str, request: _Request, dry_run: bool) -> Doc:
        doc = self.get_doc(doc_id)
        if doc is None:
            raise _HttpError(404, "Could not find a doc with the specified ID.")
        if doc.forbidden:
            raise _HttpError(403, "You do not have access to this doc.")
        if doc.stale_times > 0 and request.headers.get("x-coda-doc-version", "").lower() == "latest":
            if not dry_run:
                doc.stale_times -= 1
            raise _HttpError(400, "Doc is not yet up to date.")
        return doc

    # -- pagination
    def _paginate(
        self, ctx: _Ctx, select: Callable[[Dict[str, str]], Sequence[Any]],
        render: Callable[[Any, int, Dict[str, str]], Dict[str, Any]], cap: Optional[int] = None,
    ) -> Dict[str, Any]:
        """One page of a list; other params are ignored when ``pageToken`` is given (Coda does that)."""
        request = ctx.request
        token = request.query.get("pageToken")
        if token is not None:
            offset, params = self._decode_token(token, request.path)
        else:
            offset, params = 0, {k: v for k, v in request.query.items() if k != "pageToken"}
        limit = self._limit(params, cap)
        items = select(params)
        endless = _matches(self.endless_tokens, request.path)
        start = offset % len(items) if endless and items else offset
        chunk = items[start: start + limit]
        indexed = [(start + i, item) for i, item in enumerate(chunk)]
        if start > 0 and _matches(self.duplicate_ids, request.path):
            indexed.insert(0, (start - 1, items[start - 1]))
        payload: Dict[str, Any] = {
            "items": [render(item, index, params) for index, item in indexed],
            "href": self._href(request.path, params),
        }
        next_token: Optional[str] = None
        if token is not None and self._repeats(request.path):
            next_token = token  # the broken-server mode: the same token forever
        elif offset + limit < len(items) or endless:
            next_token = self._encode_token(request.path, offset + limit, params)
        if next_token is not None:
            payload["nextPageToken"] = next_token
            payload["nextPageLink"] = (
                f"{self.api_url}{request.path}?pageToken={urllib.parse.quote(next_token, safe='')}"
            )
        return payload

    def _limit(self, params: Dict[str, str], cap: Optional[int]) -> int:
        raw = params.get("limit")
        if raw is None:
            limit = DEFAULT_LIMIT
        else:
            try:
                limit = int(raw)
            except ValueError:
                raise _HttpError(400, f"Invalid limit: {raw!r}") from None
            if limit < 1:
                raise _HttpError(400, "limit must be at least 1")
        ceiling = max(1, int(self.max_limit))
        if cap is not None:
            ceiling = min(ceiling, cap)
        return min(limit, ceiling)

    def _repeats(self, path: str) -> bool:
        pattern = self.repeat_token
        return pattern is not None and re.search(pattern, path) is not None

    @staticmethod
    def _encode_token(path: str, offset: int, params: Dict[str, str]) -> str:
        raw = json.dumps({"p": path, "o": offset, "q": params}, separators=(",", ":"), sort_keys=True)
        return base64.urlsafe_b64encode(raw.encode("utf-8")).decode("ascii").rstrip("=")

    @staticmethod
    def _decode_token(token: str, path: str) -> Tuple[int, Dict[str, str]]:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            data = json.loads(raw.decode("utf-8"))
            offset, params = data["o"], data["q"]
            valid = (data["p"] == path and isinstance(offset, int) and offset >= 0
                     and isinstance(params, dict))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            valid = False
        if not valid:
            raise _HttpError(400, "Invalid page token.")
        return offset, {str(k): str(v) for k, v in params.items()}

    def _href(self, path: str, params: Dict[str, str]) -> str:
        query = urllib.parse.urlencode(params)
        return f"{self.api_url}{path}" + (f"?{query}" if query else "")

    # -- JSON shapes
    def _doc_href(self, doc: Doc) -> str:
        return f"{self.api_url}/docs/{doc.id}"

    def _workspace_ref(self, workspace_id: str) -> Dict[str, Any]:
        return {
            "id": workspace_id, "type": "workspace", "organizationId": "org-fake1",
            "browserLink": f"{BROWSER_BASE}/docs?workspaceId={workspace_id}",
            "name": self.workspace_names.get(workspace_id, f"Workspace {workspace_id}"),
        }

    def _doc_json(self, doc: Doc) -> Dict[str, Any]:
        base_tables = [t for t in doc.tables if not t.is_view]
        return {
            "id": doc.id, "type": "doc", "href": self._doc_href(doc),
            "browserLink": f"{BROWSER_BASE}/d/{_slug(doc.name)}_d{doc.id}",
            "name": doc.name, "owner": doc.owner_email, "ownerName": doc.owner_name,
            "docSize": {
                "totalRowCount": sum(len(t.rows) for t in base_tables),
                "tableAndViewCount": len(doc.tables), "pageCount": len(doc.pages),
                "overApiSizeLimit": False,
            },
            "createdAt": doc.created_at, "updatedAt": doc.updated_at,
            "folder": {
                "id": doc.folder_id, "type": "folder",
                "browserLink": f"{BROWSER_BASE}/folders/{doc.folder_id}", "name": doc.folder_name,
            },
            "workspace": self._workspace_ref(doc.workspace_id),
            "workspaceId": doc.workspace_id, "folderId": doc.folder_id,
        }

    def _page_ref(self, page: Page) -> Dict[str, Any]:
        return {
            "id": page.id, "type": "page",
            "href": f"{self._doc_href(page.doc)}/pages/{page.id}",
            "browserLink": f"{BROWSER_BASE}/d/_d{page.doc.id}/{_slug(page.name)}_su{page.id[-5:]}",
            "name": page.name,
        }

    def _page_json(self, page: Page) -> Dict[str, Any]:
        payload = self._page_ref(page)
        payload.update({
            "subtitle": page.subtitle, "contentType": page.content_type,
            "isHidden": page.hidden, "isEffectivelyHidden": page.is_effectively_hidden,
            "children": [self._page_ref(child) for child in page.children],
            "authors": [{"@context": "http://schema.org/", "@type": "Person",
                         "name": page.doc.owner_name, "email": page.doc.owner_email}],
            "createdAt": page.created_at, "updatedAt": page.updated_at,
        })
        if page.parent is not None:
            payload["parent"] = self._page_ref(page.parent)
        return payload

    def _table_ref(self, table: Table) -> Dict[str, Any]:
        return {
            "id": table.id, "type": "table", "tableType": table.table_type,
            "href": f"{self._doc_href(table.doc)}/tables/{table.id}",
            "browserLink": f"{BROWSER_BASE}/d/_d{table.doc.id}#_tu{table.id}",
            "name": table.name, "parent": self._page_ref(table.parent_page),
        }

    def _table_json(self, table: Table) -> Dict[str, Any]:
        payload = self._table_ref(table)
        if table.base is not None:
            payload["parentTable"] = self._table_ref(table.base)
        display = table.columns[0] if table.columns else None
        payload.update({
            "displayColumn": {
                "id": display.id if display else "", "type": "column",
                "href": f"{payload['href']}/columns/{display.id if display else ''}",
            },
            "rowCount": len(table.rows), "sorts": list(table.sorts), "layout": table.layout,
            "createdAt": table.created_at, "updatedAt": table.updated_at,
        })
        return payload

    def _column_json(self, table: Table, column: Column, index: int) -> Dict[str, Any]:
        payload: Dict[str, Any] = {
            "id": column.id, "type": "column",
            "href": f"{self._doc_href(table.doc)}/tables/{table.id}/columns/{column.id}",
            "name": column.name, "display": index == 0, "calculated": column.calculated,
            "format": {"type": column.type, "isArray": column.is_array, **column.format_extra},
        }
        if column.formula is not None:
            payload["formula"] = column.formula
        return payload

    def _row_renderer(
        self, table: Table, params: Dict[str, str],
    ) -> Callable[[Row, int, Dict[str, str]], Dict[str, Any]]:
        """Build the per-row renderer once per request (columns and formats resolved up front)."""
        value_format = params.get("valueFormat", "simple")
        if value_format not in VALUE_FORMATS:
            raise _HttpError(400, f"Invalid valueFormat: {value_format!r}")
        use_names = params.get("useColumnNames", "false").lower() == "true"
        columns = list(table.columns)
        keys = [column.name if use_names else column.id for column in columns]
        display_id = columns[0].id if columns else ""
        table_href = f"{self._doc_href(table.doc)}/tables/{table.id}"
        browser = f"{BROWSER_BASE}/d/_d{table.doc.id}#_tu{table.id}"

        def render(row: Row, index: int, _params: Dict[str, str]) -> Dict[str, Any]:
            values: Dict[str, Any] = {}
            for key, column in zip(keys, columns):
                value = row.values.get(column.id, "")
                if value_format == "simple" and isinstance(value, list):
                    value = ",".join(simple_text(item) for item in value)
                values[key] = value
            name = row.name if row.name is not None else display_text(row.values.get(display_id))
            return {
                "id": row.id, "type": "row", "href": f"{table_href}/rows/{row.id}", "name": name,
                "index": index, "browserLink": f"{browser}/_ru{row.id}",
                "createdAt": iso_time(row.created), "updatedAt": iso_time(row.updated),
                "values": values,
            }

        return render

    # -- lookups that raise the right HTTP error
    def _page(self, ctx: _Ctx) -> Page:
        assert ctx.doc is not None
        key = ctx.params["page"]
        page = ctx.doc.page(key)
        if page is None:
            if key in ctx.doc._deleted_page_ids:
                raise _HttpError(410, "This page has been deleted.")
            raise _HttpError(404, "Could not find a page with the specified ID or name.")
        return page

    def _table(self, ctx: _Ctx) -> Table:
        assert ctx.doc is not None
        table = ctx.doc.table(ctx.params["table"])
        if table is None:
            raise _HttpError(404, "Could not find a table with the specified ID or name.")
        return table

    def _check_acl(self, ctx: _Ctx) -> Doc:
        assert ctx.doc is not None
        if ctx.doc.acl_forbidden:
            raise _HttpError(403, "You do not have permission to view sharing settings.")
        return ctx.doc

    # -- route handlers: account and docs
    def _get_whoami(self, ctx: _Ctx) -> _Reply:
        return _json_reply(200, {
            "name": self.user_name, "loginId": self.user_email, "type": "user",
            "pictureLink": "https://cdn.coda.io/avatars/default_avatar.png", "scoped": False,
            "tokenName": self.token_name, "href": f"{self.api_url}/whoami",
            "workspace": self._workspace_ref(self.workspace_id),
        })

    def _list_docs(self, ctx: _Ctx) -> _Reply:
        def select(params: Dict[str, str]) -> List[Doc]:
            docs = [doc for doc in self.docs if doc.listed]
            if params.get("isOwner", "").lower() == "true":
                docs = [doc for doc in docs if doc.owned]
            if params.get("workspaceId"):
                docs = [doc for doc in docs if doc.workspace_id == params["workspaceId"]]
            if params.get("folderId"):
                docs = [doc for doc in docs if doc.folder_id == params["folderId"]]
            if params.get("query"):
                docs = [doc for doc in docs if params["query"].lower() in doc.name.lower()]
            return docs

        return _json_reply(200, self._paginate(ctx, select, lambda doc, i, p: self._doc_json(doc)))

    def _get_doc(self, ctx: _Ctx) -> _Reply:
        assert ctx.doc is not None
        return _json_reply(200, self._doc_json(ctx.doc))

    # -- pages and exports
    def _list_pages(self, ctx: _Ctx) -> _Reply:
        assert ctx.doc is not None
        pages = ctx.doc.pages_in_order()
        return _json_reply(200, self._paginate(
            ctx, lambda params: pages, lambda page, i, p: self._page_json(page),
        ))

    def _get_page(self, ctx: _Ctx) -> _Reply:
        return _json_reply(200, self._page_json(self._page(ctx)))

    def _export_href(self, page: Page, export_id: str) -> str:
        return f"{self._doc_href(page.doc)}/pages/{page.id}/export/{export_id}"

    def _begin_export(self, ctx: _Ctx) -> _Reply:
        assert ctx.doc is not None
        page = self._page(ctx)
        body = ctx.request.body
        output_format = body.get("outputFormat") if isinstance(body, dict) else None
        if output_format not in EXPORT_FORMATS:
            raise _HttpError(400, 'outputFormat must be "markdown" or "html".')
        if page.content_type != "canvas":
            raise _HttpError(400, f"Pages of type {page.content_type} cannot be exported.")
        export_id = "dry-run"
        if not ctx.dry_run:
            export_id = self._new_id("", 24)
            self._exports[export_id] = _Export(
                export_id, ctx.doc, page, output_format,
                page.render(output_format).encode("utf-8"), time.monotonic(),
            )
        return _json_reply(202, {
            "id": export_id, "status": "inProgress", "href": self._export_href(page, export_id),
        })

    def _export_status(self, ctx: _Ctx) -> _Reply:
        page = self._page(ctx)
        export = self._exports.get(ctx.params["export"])
        if export is None or export.page is not page:
            raise _HttpError(404, "Could not find an export with the specified ID.")
        href = self._export_href(page, export.id)
        if export.state == "inProgress":
            if page.export_expire_times > 0:
                if not ctx.dry_run:  # as if the request expired: forget it, the client must POST again
                    page.export_expire_times -= 1
                    del self._exports[export.id]
                raise _HttpError(404, "Could not find an export with the specified ID.")
            if time.monotonic() - export.started < self.export_delay:
                return _json_reply(200, {"id": export.id, "status": "inProgress", "href": href})
            failing = page.export_fail_times > 0
            if ctx.dry_run:
                state = "failed" if failing else "complete"
            else:
                if failing:
                    page.export_fail_times -= 1
                export.state = state = "failed" if failing else "complete"
        else:
            state = export.state
        if state == "failed":
            return _json_reply(200, {
                "id": export.id, "status": "failed", "href": href, "error": "Export failed",
            })
        return _json_reply(200, {
            "id": export.id, "status": "complete", "href": href,
            "downloadLink": self._new_download_link(export, ctx.dry_run),
        })

    def _new_download_link(self, export: _Export, dry_run: bool) -> str:
        """A fresh signed-looking link per poll, as Coda hands out a new one each time."""
        key = "dry-run"
        if not dry_run:
            key = self._new_id("", 32)
            self._blobs[key] = _Blob(
                export.content, EXPORT_FORMATS[export.output_format], export.page,
            )
        signature = hashlib.sha256(key.encode("ascii")).hexdigest()
        return (
            f"{self.download_url}/blobs/{key}?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Expires=300&X-Amz-Signature={signature}"
        )

    def _download(self, request: _Request, dry_run: bool) -> _Reply:
        """The blob store: no Authorization allowed, expiring links, S3-style XML errors."""
        if request.method != "GET":
            return _xml_error(405, "MethodNotAllowed",
                              "The specified method is not allowed against this resource.")
        if "authorization" in request.headers:
            return _xml_error(400, "InvalidArgument", "Only one auth mechanism allowed")
        match = re.fullmatch(r"/blobs/([^/]+)", request.path)
        with self._state_lock:
            blob = self._blobs.get(match.group(1)) if match else None
            if blob is None:
                return _xml_error(404, "NoSuchKey", "The specified key does not exist.")
            if blob.page.download_expire_times > 0:
                if not dry_run:
                    blob.page.download_expire_times -= 1
                return _xml_error(403, "AccessDenied", "Request has expired")
        etag = hashlib.sha256(blob.content).hexdigest()[:32]
        return _Reply(200, blob.content, blob.content_type, {"ETag": f'"{etag}"'})

    # -- tables, columns, rows
    def _list_tables(self, ctx: _Ctx) -> _Reply:
        assert ctx.doc is not None
        tables = list(ctx.doc.tables)

        def select(params: Dict[str, str]) -> List[Table]:
            wanted = {kind.strip() for kind in params.get("tableTypes", "table,view").split(",")}
            wanted.discard("")
            if not wanted or not wanted <= {"table", "view"}:
                raise _HttpError(400, "tableTypes must be table, view or both.")
            return [table for table in tables if table.table_type in wanted]

        return _json_reply(200, self._paginate(
            ctx, select, lambda table, i, p: self._table_ref(table),
        ))

    def _get_table(self, ctx: _Ctx) -> _Reply:
        return _json_reply(200, self._table_json(self._table(ctx)))

    def _list_columns(self, ctx: _Ctx) -> _Reply:
        table = self._table(ctx)
        columns = list(enumerate(table.columns))
        return _json_reply(200, self._paginate(
            ctx, lambda params: columns,
            lambda item, i, p: self._column_json(table, item[1], item[0]), cap=COLUMN_LIMIT,
        ))

    def _get_column(self, ctx: _Ctx) -> _Reply:
        table = self._table(ctx)
        try:
            column = table.column(ctx.params["column"])
        except KeyError:
            raise _HttpError(404, "Could not find a column with the specified ID or name.") from None
        payload = self._column_json(table, column, table.columns.index(column))
        payload["parent"] = self._table_ref(table)
        return _json_reply(200, payload)

    def _list_rows(self, ctx: _Ctx) -> _Reply:
        table = self._table(ctx)
        renderer: Dict[str, Callable[[Row, int, Dict[str, str]], Dict[str, Any]]] = {}

        def select(params: Dict[str, str]) -> Sequence[Row]:
            renderer["render"] = self._row_renderer(table, params)  # validates valueFormat first
            rows = table.rows
            if params.get("syncToken"):
                since = self._decode_sync_token(params["syncToken"], table)
                rows = [row for row in rows if row.updated > since]
            return rows

        payload = self._paginate(
            ctx, select, lambda row, i, params: renderer["render"](row, i, params),
        )
        payload["nextSyncToken"] = self._encode_sync_token(table)
        return _json_reply(200, payload)

    def _get_row(self, ctx: _Ctx) -> _Reply:
        table = self._table(ctx)
        render = self._row_renderer(table, ctx.request.query)
        key = ctx.params["row"]
        for index, row in enumerate(table.rows):
            if row.id == key or (row.name or display_text(
                    row.values.get(table.columns[0].id if table.columns else ""))) == key:
                payload = render(row, index, ctx.request.query)
                payload["parent"] = self._table_ref(table)
                return _json_reply(200, payload)
        raise _HttpError(404, "Could not find a row with the specified ID or name.")

    def _encode_sync_token(self, table: Table) -> str:
        raw = json.dumps({"t": table.id, "c": self._clock.now()}, separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode("utf-8")).decode("ascii").rstrip("=")

    @staticmethod
    def _decode_sync_token(token: str, table: Table) -> int:
        try:
            data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            if data["t"] == table.id and isinstance(data["c"], int):
                return int(data["c"])
        except (ValueError, KeyError, TypeError):
            pass
        raise _HttpError(400, "Invalid sync token.")

    # -- formulas, controls, sharing
    def _formula_ref(self, doc: Doc, formula: Formula) -> Dict[str, Any]:
        payload: Dict[str, Any] = {
            "id": formula.id, "type": "formula",
            "href": f"{self._doc_href(doc)}/formulas/{formula.id}", "name": formula.name,
        }
        if formula.parent is not None:
            payload["parent"] = self._page_ref(formula.parent)
        return payload

    def _control_ref(self, doc: Doc, control: Control) -> Dict[str, Any]:
        payload: Dict[str, Any] = {
            "id": control.id, "type": "control",
            "href": f"{self._doc_href(doc)}/controls/{control.id}", "name": control.name,
        }
        if control.parent is not None:
            payload["parent"] = self._page_ref(control.parent)
        return payload

    def _list_formulas(self, ctx: _Ctx) -> _Reply:
        doc = ctx.doc
        assert doc is not None
        formulas = list(doc.formulas)
        return _json_reply(200, self._paginate(
            ctx, lambda params: formulas, lambda f, i, p: self._formula_ref(doc, f),
        ))

    def _get_formula(self, ctx: _Ctx) -> _Reply:
        assert ctx.doc is not None
        formula = _find(ctx.doc.formulas, ctx.params["formula"])
        if formula is None:
            raise _HttpError(404, "Could not find a formula with the specified ID or name.")
        payload = self._formula_ref(ctx.doc, formula)
        payload["value"] = formula.value
        return _json_reply(200, payload)

    def _list_controls(self, ctx: _Ctx) -> _Reply:
        doc = ctx.doc
        assert doc is not None
        controls = list(doc.controls)
        return _json_reply(200, self._paginate(
            ctx, lambda params: controls, lambda c, i, p: self._control_ref(doc, c),
        ))

    def _get_control(self, ctx: _Ctx) -> _Reply:
        assert ctx.doc is not None
        control = _find(ctx.doc.controls, ctx.params["control"])
        if control is None:
            raise _HttpError(404, "Could not find a control with the specified ID or name.")
        payload = self._control_ref(ctx.doc, control)
        payload["controlType"] = control.control_type
        payload["value"] = control.value
        return _json_reply(200, payload)

    def _list_permissions(self, ctx: _Ctx) -> _Reply:
        permissions = list(self._check_acl(ctx).permissions)
        return _json_reply(200, self._paginate(
            ctx, lambda params: permissions, lambda perm, i, p: dict(perm),
        ))

    def _get_acl_settings(self, ctx: _Ctx) -> _Reply:
        return _json_reply(200, dict(self._check_acl(ctx).acl_settings))

    def _get_acl_metadata(self, ctx: _Ctx) -> _Reply:
        return _json_reply(200, dict(self._check_acl(ctx).acl_metadata))


# --- sample data -------------------------------------------------------------------------

HOSTILE_NAMES: Tuple[str, ...] = (
    "../x", "CON", "a/b", "trailing dot.", "x" * 300, "🚀 Launch 🎉", "aux.txt", "nul",
)


def build_sample_workspace(fake: FakeCoda) -> Dict[str, Any]:
    """Create a small but nasty workspace and return handles to its parts.

    Keys of the returned dict:

    * ``doc``: owned doc "Product Launch Hub" (ws-1) holding almost everything below.
    * ``page_a`` > ``page_b`` > ``page_c``: "Launch Status" > "Milestones" > "Week 1".
    * ``roadmap``: visible top page "Roadmap"; ``hidden_page``: its hidden child "Internal Notes";
      ``hidden_child``: "Draft Ideas", not hidden itself but effectively hidden.
    * ``dup_pages``: two top-level pages both named "Meeting Notes".
    * ``hostile_pages``: dict name -> page for every name in :data:`HOSTILE_NAMES`.
    * ``sync_page``: "Synced Roadmap" with contentType "syncPage" (export answers 400).
    * ``tasks``: table "Tasks" on page_a; columns Task, Status, Status (duplicate name), Tags
      (multiselect, isArray, list values), Meta (dict values), Points (int), Estimate (float),
      Done (bool), Notes (text with nulls, commas, quotes, newlines); 5 rows.
    * ``tasks_columns``: its Column objects in order (``tasks_columns[2]`` is the second Status).
    * ``view``: "Open Tasks", a view of Tasks keeping rows with Done false (3 rows).
    * ``empty_table``: "Empty Table", two columns, no rows.
    * ``wide_table``: "Wide Table", 60 columns, 3 rows.
    * ``big_table``: "Big Table", 120 rows, columns Name and Number.
    * ``hostile_tables``: tables named "a/b" and "CON" (on the hostile pages "CON" and "../x").
    * ``formula``: formula "Total Points" (= 29); ``control``: control "Launch Date" (datePicker).
    * ``doc2``: second owned doc "Team Wiki: Q3/Q4 <draft>?" (hostile characters) with
      ``doc2_page`` "Home" and ``doc2_table`` "Glossary".
    * ``shared_doc``: "Partner Roadmap" (owned=False) with page "Overview" and table "Partners".
    * ``other_ws_doc``: owned doc "Other Workspace Doc" in workspace "ws-2" with page "Welcome".
    """
    doc = fake.add_doc("Product Launch Hub", owned=True, workspace_id="ws-1")
    page_a = doc.add_page("Launch Status", subtitle="Where the launch stands",
                          content="# Launch Status\n\nWe are **on track**.\n\n- Beta done\n- GA next\n")
    page_b = doc.add_page("Milestones", parent=page_a)
    page_c = doc.add_page("Week 1", parent=page_b, content="# Week 1\n\nKick-off 🚀 and «planning».\n")
    roadmap = doc.add_page("Roadmap")
    hidden_page = doc.add_page("Internal Notes", parent=roadmap, hidden=True)
    hidden_child = doc.add_page("Draft Ideas", parent=hidden_page)
    dup_pages = (
        doc.add_page("Meeting Notes", content="# Meeting Notes\n\nFirst of two.\n"),
        doc.add_page("Meeting Notes", content="# Meeting Notes\n\nSecond of two.\n"),
    )
    hostile_pages = {name: doc.add_page(name) for name in HOSTILE_NAMES}
    sync_page = doc.add_page("Synced Roadmap", content_type="syncPage", content="")

    tasks = doc.add_table("Tasks", parent_page=page_a, columns=[
        "Task",
        "Status",
        {"name": "Status", "type": "select"},
        {"name": "Tags", "type": "select", "isArray": True},
        {"name": "Meta", "type": "packObject"},
        {"name": "Points", "type": "number", "format": {"precision": 0}},
        {"name": "Estimate", "type": "number", "format": {"precision": 2}},
        {"name": "Done", "type": "checkbox"},
        "Notes",
    ])
    cols = list(tasks.columns)
    second_status = cols[2].id
    sample_rows: List[Dict[str, CellValue]] = [
        {"Task": "Write launch plan", "Status": "Done", second_status: "Green",
         "Tags": ["planning", "docs"], "Meta": {"@type": "StructuredValue", "owner": "Ana"},
         "Points": 5, "Estimate": 2.5, "Done": True, "Notes": "Ready, \"final\" version"},
        {"Task": "Design review", "Status": "In progress", second_status: "Amber",
         "Tags": ["design"], "Meta": {"nested": {"level": 2, "items": [1, 2]}},
         "Points": 8, "Estimate": 4.75, "Done": False, "Notes": "Line one\nLine two"},
        {"Task": "Pricing page", "Status": None, second_status: None,
         "Tags": [], "Meta": None, "Points": 0, "Estimate": 0.1, "Done": False, "Notes": None},
        {"Task": "Ünïcødé ✓ task", "Status": "Blocked", second_status: "Red",
         "Tags": ["a,b", "c"], "Meta": {}, "Points": -3, "Estimate": 1e-3, "Done": False,
         "Notes": "  leading and trailing spaces  "},
        {"Task": "Ship it", "Status": "Done", second_status: "Green",
         "Tags": ["launch"], "Meta": {"list": ["x", None, True]}, "Points": 19,
         "Estimate": 12.0, "Done": True, "Notes": "=SUM(A1:A2)"},
    ]
    for values in sample_rows:
        tasks.add_row(values)
    done_id = tasks.column("Done").id
    view = doc.add_view(tasks, "Open Tasks", parent_page=page_b,
                        row_filter=lambda values: values.get(done_id) is False)

    empty_table = doc.add_table("Empty Table", columns=["Name", "Value"], parent_page=roadmap)
    wide_table = doc.add_table(
        "Wide Table", columns=[f"Col {i:02d}" for i in range(60)], parent_page=roadmap,
    )
    for r in range(3):
        wide_table.add_row({f"Col {i:02d}": f"r{r}c{i}" for i in range(60)})
    big_table = doc.add_table(
        "Big Table", columns=["Name", {"name": "Number", "type": "number"}], parent_page=page_c,
    )
    for i in range(120):
        big_table.add_row({"Name": f"Item {i:03d}", "Number": i})
    hostile_tables = [
        doc.add_table("a/b", columns=["Name"], rows=[{"Name": "slash"}],
                      parent_page=hostile_pages["CON"]),
        doc.add_table("CON", columns=["Name"], rows=[{"Name": "device"}],
                      parent_page=hostile_pages["../x"]),
    ]
    formula = doc.add_formula("Total Points", 29, parent=page_a)
    control = doc.add_control("Launch Date", "2024-06-01", control_type="datePicker", parent=page_a)

    doc2 = fake.add_doc("Team Wiki: Q3/Q4 <draft>?", owned=True, workspace_id="ws-1")
    doc2_page = doc2.add_page("Home", content="# Home\n\nWelcome to the wiki.\n")
    doc2_table = doc2.add_table("Glossary", columns=["Term", "Meaning"], parent_page=doc2_page,
                                rows=[{"Term": "API", "Meaning": "Application programming interface"}])

    shared_doc = fake.add_doc("Partner Roadmap", owned=False, workspace_id="ws-1")
    shared_page = shared_doc.add_page("Overview")
    shared_doc.add_table("Partners", columns=["Partner", "Tier"], parent_page=shared_page,
                         rows=[{"Partner": "Globex", "Tier": "Gold"}])

    other_ws_doc = fake.add_doc("Other Workspace Doc", owned=True, workspace_id="ws-2")
    other_ws_doc.add_page("Welcome")

    return {
        "doc": doc, "page_a": page_a, "page_b": page_b, "page_c": page_c, "roadmap": roadmap,
        "hidden_page": hidden_page, "hidden_child": hidden_child, "dup_pages": dup_pages,
        "hostile_pages": hostile_pages, "sync_page": sync_page, "tasks": tasks,
        "tasks_columns": cols, "view": view, "empty_table": empty_table,
        "wide_table": wide_table, "big_table": big_table, "hostile_tables": hostile_tables,
        "formula": formula, "control": control, "doc2": doc2, "doc2_page": doc2_page,
        "doc2_table": doc2_table, "shared_doc": shared_doc, "other_ws_doc": other_ws_doc,
    }


def asset_bytes(label: str, size: int, head: bytes = b"") -> bytes:
    """Deterministic file content of ``size`` bytes (a hash chain), after an optional magic ``head``."""
    chunks = [head]
    block = label.encode("utf-8")
    while sum(len(chunk) for chunk in chunks) < size:
        block = hashlib.sha256(block).digest()
        chunks.append(block * 64)
    return b"".join(chunks)[:size]


PNG_HEAD = b"\x89PNG\r\n\x1a\n"


def build_asset_workspace(fake: FakeCoda, faulty: bool = True) -> Dict[str, Any]:
    """A doc whose pages and table link to files on the asset host (``fake.assets_url``).

    * ``gallery``: page "Gallery": Markdown ``![photo.png](…)``, ``[spec.pdf](…)``, an image with a
      title, a link to another website; its HTML export has ``<img src>``/``<a href>`` for the
      same files plus a page-level attachment (``notes``) that Markdown drops, as Coda does.
    * ``details``: "Details", a child of Gallery (one folder deeper), showing ``photo`` again.
    * ``files``: table "Files" on Gallery with an ``image`` column (a URL string, an ImageObject,
      an empty cell, a URL of another website) and an ``attachments`` column (two files, one
      file, an empty list; ``isArray`` false, as Coda misreports it).
    * ``faulty`` adds, on Details: ``gone`` (404), ``broken`` (500 every time), ``huge`` (1 MiB + 1
      byte, over ``--max-asset-mb 1``), ``huge_stream`` (the same without Content-Length) and
      ``moved`` (a 302 to ``target`` on the same host).

    * ``plain``: page "Plain" with table "Notes": no assets at all.

    Returns ``{"doc", "gallery", "details", "files", "plain", "urls": {key: URL}, "content": {key: bytes}}``.
    """
    doc = fake.add_doc("Asset Gallery", owned=True, workspace_id="ws-1")
    content = {
        "photo": asset_bytes("photo", 3000, PNG_HEAD),
        "diagram": b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="4" height="4"/></svg>',
        "spec": asset_bytes("spec", 5000, b"%PDF-1.7\n"),
        "notes": b"page-level attachment\n",
        "sheet": asset_bytes("sheet", 700, b"PK\x03\x04"),
    }
    types = {"photo": "image/png", "diagram": "image/svg+xml", "spec": "application/pdf",
             "notes": "text/plain; charset=utf-8", "sheet": "application/octet-stream"}
    urls = {key: fake.add_asset(doc, data, types[key]) for key, data in content.items()}
    elsewhere = "https://example.com/elsewhere.png"
    markdown = (
        f"# Gallery\n\n![photo.png]({urls['photo']})\n\nThe spec: [spec.pdf]({urls['spec']}).\n\n"
        f'![diagram.svg]({urls["diagram"]} "Diagram")\n\nSee [another site]({elsewhere}).\n'
    )
    page_html = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Gallery</title></head><body>\n'
        f'<h1>Gallery</h1>\n<p><img src="{urls["photo"]}" alt="photo.png"></p>\n'
        f'<p>The spec: <a href="{urls["spec"]}">spec.pdf</a>.</p>\n'
        f"<p><img src='{urls['diagram']}' data-coda-mime-type=\"image/svg+xml\"></p>\n"
        f'<p>See <a href="{elsewhere}">another site</a>.</p>\n'
        f'<div class="attachments"><a href="{urls["notes"]}">notes.txt</a></div>\n</body></html>\n'
    )
    gallery = doc.add_page("Gallery", content=markdown, html=page_html)
    details_md = f"# Details\n\n![photo again]({urls['photo']})\n"
    if faulty:
        content["huge"] = asset_bytes("huge", 1024 * 1024 + 1)
        content["target"] = asset_bytes("target", 1500, PNG_HEAD)
        urls["gone"] = fake.add_asset(doc, b"", "image/png", status=404)
        urls["broken"] = fake.add_asset(doc, b"", "application/zip", status=500)
        urls["huge"] = fake.add_asset(doc, content["huge"], "video/mp4")
        urls["huge_stream"] = fake.add_asset(doc, content["huge"], "video/mp4", chunked=True)
        urls["target"] = fake.add_asset(doc, content["target"], "image/png")
        urls["moved"] = fake.add_asset(doc, b"", redirect_to=urls["target"])
        details_md += (
            f"\n![gone.png]({urls['gone']})\n\n[broken.zip]({urls['broken']})\n\n"
            f"[huge.mp4]({urls['huge']})\n\n[stream.mp4]({urls['huge_stream']})\n\n![moved]({urls['moved']})\n"
        )
    details_html = re.sub(r"!\[([^\]]*)\]\(([^)]*)\)", r'<img src="\2" alt="\1">', details_md)
    details_html = re.sub(r"\[([^\]]*)\]\(([^)]*)\)", r'<a href="\2">\1</a>', details_html)
    details = doc.add_page("Details", parent=gallery, content=details_md,
                           html=f"<!DOCTYPE html>\n<html><body>\n{details_html}</body></html>\n")
    files = doc.add_table("Files", parent_page=gallery, columns=[
        "Name", {"name": "Photo", "type": "image"}, {"name": "Files", "type": "attachments"},
    ], rows=[
        {"Name": "one photo, two files", "Photo": urls["photo"], "Files": [urls["spec"], urls["notes"]]},
        {"Name": "an image object, one file",
         "Photo": {"@type": "ImageObject", "name": "diagram.svg", "url": urls["diagram"]},
         "Files": [urls["sheet"]]},
        {"Name": "empty", "Photo": None, "Files": []},
        {"Name": "another site", "Photo": elsewhere, "Files": None},
    ])
    plain = doc.add_page("Plain", content="# Plain\n\nNo files here.\n")
    doc.add_table("Notes", columns=["Note"], rows=[{"Note": "text only"}], parent_page=plain)
    return {"doc": doc, "gallery": gallery, "details": details, "files": files, "plain": plain,
            "urls": urls, "content": content}


def _spread(total: int, buckets: int) -> List[int]:
    """Split ``total`` into ``buckets`` near-equal non-negative parts."""
    if buckets <= 0:
        return []
    share, extra = divmod(total, buckets)
    return [share + (1 if i < extra else 0) for i in range(buckets)]


def build_large_workspace(
    fake: FakeCoda, docs: int = 10, pages: int = 300, tables: int = 60, rows: int = 100_000,
    seed: int = 0, assets: bool = False,
) -> Dict[str, Any]:
    """A benchmark workspace: owned docs in ws-1 with pages, tables and lazily generated rows.

    Pages, tables and rows are spread evenly (docs, then tables).  Every fifth page of a doc is a
    child of the page before it.  Each table has six columns (Name, Count, Ratio, Flag, Tags,
    Note); rows are generated from their index (see :meth:`Table.fill_rows`), so building and
    memory are O(docs + pages + tables) and one rows page costs O(page size).

    ``assets`` (the fake must be started) puts files on the asset host: every doc's pages share a
    logo, every third page has an image of its own (20 kB) and every sixth a 100 kB attachment
    link; the first doc gains a table "Attachments" of 50 rows with an image column and an
    attachments column (none, one or two files a row).

    Returns ``{"docs": [Doc], "pages": [Page], "tables": [Table], "rows": total_rows, "assets": n}``
    (``tables`` without the Attachments table, ``assets`` the number of distinct asset URLs).
    """
    columns: List[Union[str, Mapping[str, Any]]] = [
        "Name", {"name": "Count", "type": "number"}, {"name": "Ratio", "type": "number"},
        {"name": "Flag", "type": "checkbox"}, {"name": "Tags", "type": "select", "isArray": True},
        "Note",
    ]
    tags = ("alpha", "beta", "gamma", "delta")
    body = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 8
    all_docs: List[Doc] = []
    asset_urls: List[str] = []
    all_pages: List[Page] = []
    all_tables: List[Table] = []
    table_rows = _spread(rows, max(tables, 1))

    def make_factory(table_no: int) -> RowFactory:
        def make(index: int) -> List[CellValue]:
            mix = (index * 2654435761 + seed * 97 + table_no) % 1000
            return [
                f"Row {table_no}-{index}", mix, mix / 7.0, mix % 2 == 0,
                [tags[mix % 4], tags[(mix // 4) % 4]] if mix % 3 else [],
                f"Note {index}: {body[: mix % 60]}",
            ]
        return make

    for doc_no, (page_count, table_count) in enumerate(
            zip(_spread(pages, docs), _spread(tables, docs))):
        doc = fake.add_doc(f"Bench Doc {doc_no:02d}", owned=True, workspace_id="ws-1")
        all_docs.append(doc)
        doc_pages: List[Page] = []
        for page_no in range(page_count):
            parent = doc_pages[-1] if page_no % 5 == 4 and doc_pages else None
            name = f"Page {doc_no:02d}-{page_no:03d}"
            text = f"# {name}\n\n{body}\n"
            if assets:
                text += _bench_page_assets(fake, doc, name, page_no, asset_urls)
            doc_pages.append(doc.add_page(name, parent=parent, content=text))
        for table_no in range(table_count):
            number = len(all_tables)
            parent_page = doc_pages[table_no % len(doc_pages)] if doc_pages else None
            table = doc.add_table(f"Table {number:03d}", columns=columns, parent_page=parent_page)
            table.fill_rows(table_rows[number], make_factory(number))
            all_tables.append(table)
        all_pages.extend(doc.pages)
        if assets and doc_no == 0:
            _bench_attachments_table(fake, doc, doc_pages[0] if doc_pages else None, asset_urls)
    return {"docs": all_docs, "pages": all_pages, "tables": all_tables,
            "rows": sum(len(t.rows) for t in all_tables), "assets": len(set(asset_urls))}


def _bench_page_assets(fake: FakeCoda, doc: Doc, name: str, page_no: int, urls: List[str]) -> str:
    """Markdown links to a doc-wide logo and, on some pages, an image and a file of their own."""
    if page_no == 0 or not urls or f"/docs/{doc.id}/" not in urls[-1]:
        urls.append(fake.add_asset(doc, asset_bytes(f"logo {doc.id}", 4000, PNG_HEAD)))
    logo = next(url for url in reversed(urls) if f"/docs/{doc.id}/" in url)
    text = f"\n![logo.png]({logo})\n"
    if page_no % 3 == 0:
        urls.append(fake.add_asset(doc, asset_bytes(f"image {name}", 20_000, PNG_HEAD)))
        text += f"\n![{name}.png]({urls[-1]})\n"
    if page_no % 6 == 0:
        urls.append(fake.add_asset(doc, asset_bytes(f"file {name}", 100_000, b"%PDF-1.7\n"), "application/pdf"))
        text += f"\n[{name}.pdf]({urls[-1]})\n"
    return text


def _bench_attachments_table(fake: FakeCoda, doc: Doc, page: Optional[Page], urls: List[str]) -> None:
    table = doc.add_table("Attachments", parent_page=page, columns=[
        "Name", {"name": "Photo", "type": "image"}, {"name": "Files", "type": "attachments"},
    ])
    for index in range(50):
        urls.append(fake.add_asset(doc, asset_bytes(f"photo {index}", 20_000, PNG_HEAD)))
        photo = urls[-1]
        files = []
        for number in range(index % 3):
            urls.append(fake.add_asset(doc, asset_bytes(f"file {index} {number}", 100_000, b"PK\x03\x04"),
                                       "application/zip"))
            files.append(urls[-1])
        table.add_row({"Name": f"Row {index}", "Photo": photo, "Files": files})


# --- a monitoring service ----------------------------------------------------------------

@dataclass
class Ping:
    """One ping as the monitoring service saw it."""

    method: str
    path: str
    headers: Dict[str, str]
    body: str


class PingReceiver:
    """A healthchecks.io-like listener on 127.0.0.1 for ``--ping-url`` tests.

    ``url`` is the check's ping URL; every request lands in ``pings``.  Switches: ``status``
    (the answer), ``hang`` (read the request, never answer until the receiver is closed: a server that
    times the client out).  Use as a context manager.
    """

    def __init__(self) -> None:
        self.pings: List[Ping] = []
        self.status = 200
        self.hang = False
        self._released = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                """Silence: tests read ``pings``."""

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode("utf-8", "replace") if length > 0 else ""
                with receiver._lock:
                    receiver.pings.append(Ping(self.command, urllib.parse.urlsplit(self.path).path,
                                               {k.lower(): v for k, v in self.headers.items()}, body))
                if receiver.hang:
                    receiver._released.wait(30)
                    self.close_connection = True
                    return
                self.send_response(receiver.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            do_GET = do_HEAD = do_POST

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="fake-ping", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/ping/check-key-5f3a"

    def paths(self) -> List[str]:
        with self._lock:
            return [ping.path for ping in self.pings]

    def __enter__(self) -> PingReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
