"""Where records come from: `--data` entries -> (location, record) pairs.

An entry is a local file (JSONL, JSON, CSV, Parquet, Arrow), a glob of them (`data/*.jsonl`),
a `datasets.save_to_disk` folder, or a hub dataset id (`owner/name`); a saved DatasetDict or a
hub dataset takes a split as `ENTRY:SPLIT` (default: train, or its only split). The same file
given twice (by two names or through a glob) is refused: its examples would count twice.

Saved datasets, Arrow and Parquet files and hub ids go through `datasets` (typed columns,
memory-mapped, the hub cache). Text formats are read here instead, because each error must name
the file and the line, which `datasets` cannot do ("An error occurred while generating the
dataset" over a pyarrow traceback), and because pandas, under `datasets`' CSV reader, loses
what a data error must say: it renames duplicated columns to `x.1`, fills a short row with
NaN (reported later as a missing field that is in the header), and turns `5` into a number.
So: JSONL line by line; JSON with `json` (a list of objects, or JSON Lines in a .json file);
CSV with the `csv` module (every cell text, an empty cell "", a duplicated column or a row
with the wrong number of cells refused naming the line).
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..commands.common import looks_like_hub_id
from ..errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Source:
    """One thing to read: `kind` (a SUFFIXES value, 'saved' or 'hub'), `name` (a path or an id),
    `split` (saved DatasetDicts and hub ids), `given` (the --data entry it came from)."""

    kind: str
    name: str
    split: str | None = None
    given: str = ""

    def key(self) -> tuple[str, str | None]:
        return (os.path.realpath(self.name) if self.kind != "hub" else self.name, self.split)


# ---------------------------------------------------------------------------- entries -> sources
def _split_suffix(entry: str) -> tuple[str, str | None]:
    """'PATH_OR_ID:SPLIT' -> (PATH_OR_ID, SPLIT); an entry that exists as given has none."""
    base, sep, split = entry.rpartition(":")
    if not sep or os.path.exists(entry) or not split or not all(c.isalnum() or c in "_.-" for c in split):
        return entry, None
    return base, split


def _data_files_in(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)[:5]


def sources_of(entry: str) -> list[Source]:
    """The sources one --data entry names (a glob: every match, sorted)."""
    name, split = _split_suffix(str(entry))
    if GLOB_CHARS & set(name) and not os.path.exists(name):
        matches = sorted(glob.glob(os.path.expanduser(name), recursive=True))
        files = [m for m in matches if Path(m).suffix.lower() in SUFFIXES and Path(m).is_file()]
        if not files:
            raise DataError(f"{entry}: no data file matches this pattern "
                            f"({len(matches)} match(es), none a {'/'.join(SUFFIXES)} file)")
        return [Source(SUFFIXES[Path(f).suffix.lower()], f, given=str(entry)) for f in files]
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if any((path / m).exists() for m in SAVED_MARKERS):
            return [Source("saved", str(path), split, str(entry))]
        found = _data_files_in(path)
        hint = (f"it holds data files such as {', '.join(found)}: give those (a glob works: "
                f"{path}/*{Path(found[0]).suffix})") if found else "it holds no data file"
        raise DataError(f"{path}: is a folder, not a dataset saved with datasets' save_to_disk; {hint}")
    if path.is_file():
        kind = SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}, "
                            "a folder written by datasets' save_to_disk, or a hub dataset id")
        return [Source(kind, str(path), given=str(entry))]
    if looks_like_hub_id(name) and not name.startswith(("./", "../")) and path.suffix.lower() not in SUFFIXES:
        return [Source("hub", name, split, str(entry))]
    raise DataError(f"{name}: no such data file")


def resolve_sources(entries: list[str]) -> list[Source]:
    """Every source of every entry; the same file (or dataset and split) twice is an error."""
    seen: dict[tuple[str, str | None], Source] = {}
    out = []
    for entry in entries:
        for source in sources_of(entry):
            first = seen.setdefault(source.key(), source)
            if first is not source:
                names = first.given if first.given == source.given else f"{first.given} and {source.given}"
                raise DataError(f"{source.name}: given twice ({names}); its examples would count twice: "
                                "give it once")
            out.append(source)
    return out


# ---------------------------------------------------------------------------- reading
def _cut(err: object, limit: int) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a text file; anything not UTF-8 is a DataError naming the file,
    the line and the encoding it looks like."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise DataError(f"{path}, line 1: the file is UTF-16 text; save it as UTF-8")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}, line {line_no}: not UTF-8 text (byte {err.start + 1} of the line: "
                    f"{err.reason}; Latin-1 or another legacy encoding?); save the file as UTF-8"
                ) from None
            yield line_no, text.removeprefix("\ufeff") if line_no == 1 else text


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    for line_no, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            yield f"line {line_no}", json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {line_no}: not valid JSON ({err.msg} at column {err.colno}); "
                "each line of a .jsonl file must be one JSON object"
            ) from None


def _json(path: Path) -> Iterator[tuple[str, Any]]:
    text = "".join(line for _, line in utf8_lines(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON Lines in a .json file, as datasets reads them too
            yield from _jsonl(path)
            return
        raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}: the one list inside
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (objects), got a {type(data).__name__}")
    for i, record in enumerate(data, start=1):
        yield f"record {i}", record


def _csv(path: Path) -> Iterator[tuple[str, Any]]:
    for _ in utf8_lines(path):  # a clear error for files that are not UTF-8
        pass
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise DataError(f"{path}: empty CSV file (no header line of column names)")
            twice = sorted({h for h in header if header.count(h) > 1})
            if twice:
                raise DataError(f"{path}, line 1: column(s) {', '.join(map(repr, twice))} appear twice in the "
                                "header; each column needs its own name")
            line = reader.line_num
            for row in reader:
                where, line = f"line {line + 1}", reader.line_num
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}, {where}: {len(row)} cells for {len(header)} columns "
                                    f"({', '.join(header)}); quote cells that contain commas")
                yield where, dict(zip(header, row))
        except csv.Error as err:
            raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({err})") from None


def _table(source: Source) -> Any:
    """A datasets.Dataset for Parquet and Arrow files, saved folders and hub ids."""
    import datasets

    datasets.disable_progress_bars()
    name = source.name
    try:
        if source.kind == "arrow":
            try:
                return datasets.Dataset.from_file(name)
            except Exception:  # noqa: BLE001 - not datasets' stream format: an Arrow IPC file
                return datasets.load_dataset("arrow", data_files=name, split="train")
        if source.kind == "parquet":
            return datasets.load_dataset("parquet", data_files=name, split="train")
        if source.kind == "saved":
            return _pick_split(datasets.load_from_disk(name), source)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "cannot read it"
        raise DataError(f"{name}: could not read it as {source.kind} data ({_cut(err, 160)})") from None
    return _hub_table(source)


def _pick_split(data: Any, source: Source) -> Any:
    if not hasattr(data, "keys"):  # one Dataset
        if source.split not in (None, "train"):
            raise DataError(f"{source.name}: a single dataset, no split {source.split!r}; drop ':{source.split}'")
        return data
    splits = list(data.keys())
    split = source.split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
    if split not in splits:
        raise DataError(f"{source.name}: {'no split ' + repr(source.split) if source.split else 'several splits'}"
                        f" ({', '.join(splits)}); choose one as {source.name}:SPLIT")
    return data[split]


def _hub_table(source: Source) -> Any:
    """A hub dataset's split: from the cache when offline; one DataError line when it cannot be
    had (offline and not cached, no network, no such dataset)."""
    import datasets
    import huggingface_hub
    from huggingface_hub import constants

    name, split = source.name, source.split or "train"
    offline = constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE
    if not offline:
        try:  # one quick request instead of datasets' minute of retries when there is no network
            huggingface_hub.HfApi().dataset_info(name, timeout=10)
        except huggingface_hub.errors.RepositoryNotFoundError:
            raise DataError(f"{name}: no such local file, and no such dataset on the Hub (or it is "
                            "private: log in with `hf auth login`)") from None
        except Exception as err:  # noqa: BLE001 - network errors come in many types
            raise DataError(f"{name}: no such local file, and the Hub cannot be reached to fetch it as a "
                            f"dataset ({type(err).__name__}: {_cut(err, 80)}); with no network, set "
                            "HF_HUB_OFFLINE=1 to use the local cache, or give a local file") from None
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001
        if offline:
            raise DataError(f"{name}: no such local file, and not in the local cache of hub datasets "
                            "(HF_HUB_OFFLINE=1 is set: download it once while online, or give a local file)") from None
        raise DataError(f"{name}: could not load this hub dataset's {split!r} split "
                        f"({type(err).__name__}: {_cut(err, 160)})") from None


def read_source(source: Source) -> Iterator[tuple[str, Any]]:
    """(location, record) for every record of one source: 'line N' for text files (CSV line
    numbers count the header), 'record N' for JSON lists, 'row N' for tables."""
    path = Path(source.name)
    if source.kind == "jsonl":
        yield from _jsonl(path)
    elif source.kind == "json":
        yield from _json(path)
    elif source.kind == "csv":
        yield from _csv(path)
    else:
        for i, record in enumerate(_table(source), start=1):
            yield f"row {i}", record


def describe(source: Source) -> str:
    """How errors name a source: the path, or the hub id / folder with its split."""
    return f"{source.name}:{source.split}" if source.split else source.name
