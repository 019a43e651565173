"""Reading a source log for `raycg.data.logmap`: a CSV (with or without a header row) or
Parquet file as string columns, and parsing one column with errors that name the file, the
column, how many rows and the first bad one with its line (CSV) or row (Parquet).
"""
from __future__ import annotations

import csv
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raycg.data.hashing import hashed_id
from raycg.data.schema import EventSchemaError


class ConversionError(EventSchemaError):
    """Malformed source log: names the file, the column, how many rows and an example."""


class SourceFile:
    """The input's columns as strings (nulls for empty cells), by name or 0-based position,
    and where a row is for error messages (CSV line numbers count the header)."""

    def __init__(self, path: str, fmt: str | None = None, header: bool = True, delimiter: str = ","):
        if not os.path.isfile(path):
            raise ConversionError(f"{path}: no such file")
        self.path = path
        self.format = fmt or ("parquet" if path.endswith((".parquet", ".pq")) else "csv")
        if self.format not in ("csv", "parquet"):
            raise ConversionError(f"{path}: format '{self.format}': expected csv or parquet")
        self.header = header if self.format == "csv" else True
        self.delimiter = delimiter
        if self.format == "parquet":
            try:
                self.names = list(pq.read_schema(path).names)
            except Exception as e:
                raise ConversionError(f"{path}: cannot read Parquet schema: {e}") from e
            return
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            row = next(csv.reader(f, delimiter=delimiter), None)
        if not row:
            raise ConversionError(f"{path}: empty file" + (" (no header row)" if header else ""))
        self.names = [c.strip() for c in row] if header else [f"f{i}" for i in range(len(row))]

    def display(self, column: str) -> str:
        """How a column is named in messages: its header name, or `column 3` without one."""
        return column if self.header else f"column {column[1:]}"

    def key(self, column: str) -> str:
        """The column in meta keys (missing_<key>): its name, or column_3."""
        return column if self.header else f"column_{column[1:]}"

    def where(self, i: int) -> str:
        if self.format == "parquet":
            return f"row {i}"
        return f"line {i + (2 if self.header else 1)}"

    def resolve(self, ref, field: str) -> str:
        """A mapping's column reference (name, position or list of alternative names) -> column."""
        if isinstance(ref, bool) or ref is None:
            raise ConversionError(f"mapping: columns.{field}: expected a column name or position, got {ref!r}")
        if isinstance(ref, int):
            if self.header:
                raise ConversionError(f"{self.path}: columns.{field} = {ref} is a position, but the file has a "
                                      "header row; name the column (or set header: false)")
            if not 0 <= ref < len(self.names):
                raise ConversionError(f"{self.path}: columns.{field} = {ref}: the file has {len(self.names)} "
                                      f"columns (positions 0..{len(self.names) - 1})")
            return f"f{ref}"
        alternatives = [ref] if isinstance(ref, str) else list(ref)
        if not self.header:
            raise ConversionError(f"{self.path}: columns.{field} = {ref!r}: the file has no header row "
                                  "(header: false), so columns are positions 0, 1, ...")
        for name in alternatives:
            if name in self.names:
                return name
        alt = f" (or {', '.join(repr(a) for a in alternatives[1:])})" if len(alternatives) > 1 else ""
        raise ConversionError(f"{self.path}: missing required column '{alternatives[0]}'{alt}"
                              f" for {field}; file has columns {self.names}")

    def read(self, columns: list[str]) -> pa.Table:
        columns = list(dict.fromkeys(columns))
        if self.format == "parquet":
            try:
                table = pq.read_table(self.path, columns=columns)
            except Exception as e:
                raise ConversionError(f"{self.path}: cannot read Parquet: {e}") from e
            out = {}
            for name in columns:
                col = table.column(name).combine_chunks()
                if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
                    col = pc.cast(pc.cast(col, pa.timestamp("s", tz="UTC")), pa.int64())
                out[name] = pc.cast(col, pa.string())
            return pa.table(out)
        try:
            table = pacsv.read_csv(
                self.path,
                read_options=pacsv.ReadOptions(autogenerate_column_names=not self.header),
                parse_options=pacsv.ParseOptions(delimiter=self.delimiter),
                convert_options=pacsv.ConvertOptions(
                    include_columns=columns, column_types={c: pa.string() for c in columns},
                    strings_can_be_null=True),
            )
        except (pa.ArrowInvalid, OSError) as e:
            raise ConversionError(f"{self.path}: cannot parse CSV: {e}") from e
        return table.combine_chunks()


def missing_mask(arr: pa.Array) -> np.ndarray:
    trimmed = pc.utf8_trim_whitespace(arr)
    return np.asarray(pc.fill_null(pc.equal(trimmed, ""), True))


class _Column:
    """One source column being parsed: errors name the file, the column and the first bad row."""

    def __init__(self, src: SourceFile, column: str, arr: pa.Array):
        self.src, self.column, self.arr = src, column, arr
        self.missing = missing_mask(arr)
        self.n = len(arr)

    def fail(self, bad: np.ndarray, what: str, hint: str = "") -> None:
        i = int(np.flatnonzero(bad)[0])
        raise ConversionError(
            f"{self.src.path}: column '{self.src.display(self.column)}' has {int(bad.sum())} of {self.n} rows "
            f"{what}, e.g. {self.arr[i].as_py()!r} at {self.src.where(i)}{hint}")

    def ids(self, what: str = "non-negative integer ids") -> np.ndarray:
        """Exact int64 (no float round trip); "123.0" is accepted, "-1", "1.5", "abc" are errors;
        0 where missing."""
        trimmed = pc.utf8_trim_whitespace(pc.fill_null(self.arr, ""))
        ok = np.asarray(pc.match_substring_regex(trimmed, r"^\+?[0-9]+(\.0*)?$"))
        bad = ~self.missing & ~ok
        if bad.any():
            self.fail(bad, f"that are not {what}")
        digits = pc.replace_substring_regex(pc.replace_substring_regex(trimmed, r"\.0*$", ""), r"^\+", "")
        digits = pc.if_else(pa.array(self.missing), "0", digits)
        try:
            return pc.cast(digits, pa.int64()).to_numpy(zero_copy_only=False).astype(np.int64)
        except pa.ArrowInvalid as e:
            raise ConversionError(f"{self.src.path}: column '{self.src.display(self.column)}' has ids that do "
                                  f"not fit int64: {e}") from e

    def strings(self, lowercase: bool = False) -> np.ndarray:
        """Object array of stripped strings, None where missing."""
        s = pc.utf8_trim_whitespace(pc.fill_null(self.arr, ""))
        if lowercase:
            s = pc.utf8_lower(s)
        values = np.asarray(s.to_pylist(), dtype=object)
        values[self.missing] = None
        return values

    def hashed(self, salt: str, lowercase: bool = True) -> np.ndarray:
        values = self.strings(lowercase)
        cache: dict = {}
        return np.asarray([0 if v is None else cache.setdefault(v, hashed_id(salt, v)) for v in values.tolist()],
                          dtype=np.int64)

    def floats(self) -> np.ndarray:
        values = pd.to_numeric(pd.Series(self.arr.to_pandas()).str.strip(), errors="coerce").to_numpy(np.float64)
        bad = ~self.missing & ~np.isfinite(values)
        if bad.any():
            self.fail(bad, "that are not numbers")
        return np.where(self.missing, np.nan, values)
