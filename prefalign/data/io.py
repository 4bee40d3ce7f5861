"""Read a data file (or a hub dataset) into rows of plain Python values, loudly.

Structured files are ``.jsonl``, ``.json``, ``.csv`` and ``.parquet``, each optionally ``.gz``. Any
other file is plain text, one row per non-blank line (e.g. ``rt-polarity.pos``). A path that does
not exist but looks like ``org/name`` is loaded with ``datasets.load_dataset`` at the split asked
for (default ``train``); a local file has no splits, so asking one for another split is an error.

Every row carries where it came from (``line 12`` for line-based files, the line where a CSV record
starts, ``row 12`` for JSON arrays, parquet and hub datasets; all 1-based), so later checks can name
it. Anything that makes the whole input unreadable is a one-line `UserError`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.errors import UserError

STRUCTURED = (".jsonl", ".json", ".csv", ".parquet")
GZIP_MAGIC = b"\x1f\x8b"
DEFAULT_SPLIT = "train"


@dataclass
class Table:
    """Rows read from one source."""

    source: str
    """The path or hub id as the user gave it."""
    kind: str
    """``jsonl``, ``json``, ``csv``, ``parquet``, ``text`` or ``hub``."""
    columns: list[str]
    """Column names (for JSON: every key of any row, in order of first appearance; a row may lack some)."""
    rows: list[tuple[str, dict[str, Any]]]
    """``(where, row)`` pairs, ``where`` like ``"line 3"``."""


def file_kind(path: str | Path) -> str:
    """``jsonl``/``json``/``csv``/``parquet`` from the suffix (a trailing ``.gz`` ignored), else ``text``."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for ext in STRUCTURED:
        if name.endswith(ext):
            return ext[1:]
    return "text"


def looks_like_hub_id(source: str) -> bool:
    """``org/name`` with no data-file suffix and no leading ``.``, ``/`` or ``~``."""
    return (
        source.count("/") == 1
        and not source.startswith((".", "/", "~"))
        and all(source.split("/"))
        and file_kind(source) == "text"
        and not source.lower().endswith((".txt", ".gz"))
    )


def read_table(source: str | Path, *, split: str = DEFAULT_SPLIT, text_column: str = "prompt") -> Table:
    """Read ``source`` into a `Table`; plain-text lines become rows ``{text_column: line}``.

    ``split`` is the split of a hub dataset; a local file accepts only the default, ``train``.
    """
    src = str(source)
    path = Path(src).expanduser()
    if not path.exists():
        if looks_like_hub_id(src):
            return _read_hub(src, split)
        raise UserError(
            f"{src}: file not found; give a .jsonl/.json/.csv/.parquet (optionally .gz) or text file, "
            "or a hub dataset id org/name"
        )
    if split != DEFAULT_SPLIT:  # refused, not ignored: the user would train on rows they did not ask for
        raise UserError(
            f"{src}: is a local file, but split {split!r} was asked for; a split applies to hub "
            "datasets only: drop the split flag, or give the file that holds that split"
        )
    if path.is_dir():
        raise UserError(f"{src}: is a directory; give a data file (.jsonl/.json/.csv/.parquet, optionally .gz)")
    data = _read_bytes(path, src)
    if not _strip_bom(data)[0].strip():  # a BOM alone is how some editors save an empty UTF-8 file
        raise UserError(f"{src}: file is empty; it needs at least one row")
    kind = file_kind(path)
    if kind == "parquet":
        return _parse_parquet(data, src)
    if kind == "csv":
        return _parse_csv(data, src)
    if kind == "json" and _strip_bom(data)[0].lstrip().startswith(b"["):
        return _parse_json_array(data, src)
    if kind in ("json", "jsonl"):  # a .json file that is not an array is taken as JSON lines
        return _parse_jsonl(data, src, kind)
    return _parse_text(data, src, text_column)


def _read_bytes(path: Path, src: str) -> bytes:
    """The file's bytes, gunzipped when the name ends in ``.gz`` (and refused when name and content disagree)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{src}: cannot read the file ({e.strerror or e}); check its permissions") from None
    named_gz = path.name.lower().endswith(".gz")
    if not named_gz:
        if raw.startswith(GZIP_MAGIC):
            raise UserError(f"{src}: is gzip-compressed but not named .gz; rename it to {path.name}.gz")
        return raw
    if not raw.startswith(GZIP_MAGIC):
        raise UserError(f"{src}: named .gz but is not gzip data; gzip it, or drop .gz from the name if it is plain")
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{src}: corrupt or truncated gzip data ({e}); re-create or re-download the file") from None


def _decode(data: bytes, src: str, lineno: int | None = None, offset: int = 0) -> str:
    """UTF-8 text; an invalid byte is reported by line and byte offset in the (decompressed) file."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = lineno if lineno is not None else data.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{src}: line {line}: invalid UTF-8 (byte {e.object[e.start]:#04x} at byte offset "
            f"{offset + e.start}); re-save the file as UTF-8"
        ) from None


def _strip_bom(data: bytes) -> tuple[bytes, int]:
    """``(data without a UTF-8 byte-order mark, the mark's length)``: offsets in errors stay the file's."""
    return (data[3:], 3) if data.startswith(b"\xef\xbb\xbf") else (data, 0)


def _parse_jsonl(data: bytes, src: str, kind: str) -> Table:
    rows: list[tuple[str, dict]] = []
    body, offset = _strip_bom(data)
    for lineno, raw in enumerate(body.split(b"\n"), start=1):
        line_start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        text = _decode(raw, src, lineno, line_start)
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            _refuse_one_object(data, src, kind)
            raise UserError(
                f"{src}: line {lineno}: invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise UserError(f"{src}: line {lineno}: expected a JSON object per line, got {type_name(row)}")
        rows.append((f"line {lineno}", row))
    return Table(src, kind, _all_keys(rows), rows)


def _all_keys(rows: list[tuple[str, dict]]) -> list[str]:
    """Every key of any row, in order of first appearance: a column the first row omits is still a column."""
    return list(dict.fromkeys(key for _, row in rows for key in row))


def _refuse_one_object(data: bytes, src: str, kind: str) -> None:
    """A .json file holding one object over several lines (``{"train": [...]}``) is not rows: say so, rather
    than report its second line as bad JSON lines."""
    if kind != "json":
        return
    try:
        whole = json.loads(_strip_bom(data)[0])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return
    if isinstance(whole, dict):
        keys = ", ".join(map(repr, list(whole)[:5]))
        raise UserError(
            f"{src}: holds one JSON object (keys: {keys}), not rows; a .json file must be an array of row "
            "objects ([{...}, {...}]) or JSON lines (one object per line): extract the rows into such a file"
        )


def _parse_json_array(data: bytes, src: str) -> Table:
    body, bom = _strip_bom(data)
    text = _decode(body, src, offset=bom)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{src}: line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}); "
            "a .json file must hold one array of row objects, or JSON lines"
        ) from None
    if not items:
        raise UserError(f"{src}: the JSON array has no rows; it needs at least one row object")
    rows = []
    for i, row in enumerate(items, start=1):
        if not isinstance(row, dict):
            raise UserError(
                f"{src}: row {i}: expected a JSON object, got {type_name(row)}; "
                "a .json file must be an array of row objects"
            )
        rows.append((f"row {i}", row))
    return Table(src, "json", _all_keys(rows), rows)


def _parse_csv(data: bytes, src: str) -> Table:
    body, bom = _strip_bom(data)
    text = _decode(body, src, offset=bom)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # HH-style transcripts exceed the 128 KiB default
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    lines = io.StringIO(text, newline="").readlines()  # split where the reader splits (not at \u2028 etc.)
    try:
        columns = list(reader.fieldnames or [])
        duplicated = sorted({name for name in columns if name and columns.count(name) > 1})  # '': trailing commas
        if duplicated:
            raise UserError(
                f"{src}: line {reader.line_num}: the header names {', '.join(map(repr, duplicated))} more than once; "
                "rename or drop the repeated columns (a later one would overwrite the first)"
            )
        end = reader.line_num
        for row in reader:
            # the reader skips blank lines between records: the record starts at the first non-blank line after
            # the previous one (a quoted field's blank lines come after its first line)
            start = end + 1
            while start < reader.line_num and not lines[start - 1].strip():
                start += 1
            end, where = reader.line_num, f"line {start}"
            if None in row:
                raise UserError(
                    f"{src}: {where}: more fields than the header's {len(columns)}; quote fields that contain commas"
                )
            missing = [k for k, v in row.items() if v is None]
            if missing:
                raise UserError(
                    f"{src}: {where}: fewer fields than the header (no value for {missing[0]!r}); "
                    "every row needs one value per column"
                )
            rows.append((where, row))
    except csv.Error as e:
        raise UserError(f"{src}: line {reader.line_num}: malformed CSV ({e}); check the quoting") from None
    if not rows:
        raise UserError(f"{src}: has a header ({', '.join(columns)}) but no rows")
    return Table(src, "csv", columns, rows)


def _parse_parquet(data: bytes, src: str) -> Table:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{src}: reading parquet needs pyarrow: run `pip install pyarrow`") from None
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{src}: not a readable parquet file ({first}); re-export it") from None
    if table.num_rows == 0:
        raise UserError(f"{src}: the parquet file has no rows")
    rows = [(f"row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]
    return Table(src, "parquet", list(table.column_names), rows)


def _parse_text(data: bytes, src: str, column: str) -> Table:
    rows = []
    body, offset = _strip_bom(data)
    for lineno, raw in enumerate(body.split(b"\n"), start=1):
        line_start, offset = offset, offset + len(raw) + 1
        raw = raw.rstrip(b"\r")
        if raw.strip():
            rows.append((f"line {lineno}", {column: _decode(raw, src, lineno, line_start)}))
    return Table(src, "text", [column], rows)


def _read_hub(source: str, split: str) -> Table:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{source}: loading a hub dataset needs `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "could not load"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{source}: not a local file, and loading it as a hub dataset (split {split!r}) failed: "
            f"{first} (offline? HF_HUB_OFFLINE=1 reads only the local cache)"
        ) from None
    if len(ds) == 0:
        raise UserError(f"{source}: split {split!r} has no rows")
    rows = [(f"row {i}", row) for i, row in enumerate(ds, start=1)]
    return Table(source, "hub", list(ds.column_names), rows)


def progress(items, desc: str, unit: str = "row"):
    """A tqdm bar on stderr that appears only if the loop runs over a second, and only on a terminal."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, delay=1.0, disable=None, leave=False)


def type_name(value: Any) -> str:
    """A JSON-ish type name for messages: string, number, list, object, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def row_field(source: str, where: str, row: dict[str, Any], name: str, needs: str) -> Any:
    """``row[name]``; a missing column is a `UserError` naming the file, the row and ``needs`` (what every row of
    the data needs)."""
    if name not in row:
        raise UserError(f"{source}: {where}: missing column {name!r}; {needs}")
    return row[name]


def text_field(source: str, where: str, row: dict[str, Any], name: str, needs: str, list_hint: str = "") -> str:
    """`row_field` that must be a string; another type is a `UserError` naming which (``list_hint``: what a list
    there may mean, said in parentheses)."""
    value = row_field(source, where, row, name, needs)
    if not isinstance(value, str):
        hint = f" ({list_hint})" if list_hint and isinstance(value, list) else ""
        raise UserError(f"{source}: {where}: {name!r} must be a string, got {type_name(value)}{hint}; fix the row")
    return value
