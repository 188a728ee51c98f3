"""traces.tracedat checked against trace-cmd itself, on the lab's samples and on hand-built files.

Every event of every sample (traces/samples/*.dat.xz) is compared with
``trace-cmd report -R -t`` (raw fields, full timestamps): ts, cpu, pid, comm, event
and each field's text. How libtraceevent prints a field is worked out from the
event's format and print fmt (the conversion it is printed with, if any, else by its
type, size and signedness), so values compare exactly as text. Damaged copies check
TraceFileError and partial reads. Tiny files written here cover what the samples do
not have — time extends, absolute timestamps, padding, long events, lost-event flags,
time going back on a CPU, symbol aliases — and are checked against trace-cmd too.
"""

from __future__ import annotations

import heapq
import lzma
import random
import re
import shutil
import struct
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from traces.calls import calls
from traces.tracedat import TraceFile, TraceFileError, read_events

SAMPLES = REPO / "traces" / "samples"
SAMPLE_NAMES = sorted(p.name for p in SAMPLES.glob("*.dat.xz"))
TRACE_CMD = shutil.which("trace-cmd")
needs_trace_cmd = pytest.mark.skipif(TRACE_CMD is None, reason="trace-cmd is not installed")


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    """The samples decompressed once per test module: name -> path."""
    where = tmp_path_factory.mktemp("samples")
    paths = {}
    for name in SAMPLE_NAMES:
        path = where / name.removesuffix(".xz")
        path.write_bytes(lzma.decompress((SAMPLES / name).read_bytes()))
        paths[name] = path
    return paths


@pytest.fixture(params=SAMPLE_NAMES)
def sample(request, unpacked) -> Path:
    return unpacked[request.param]


def sample_named(unpacked, part: str) -> Path:
    return next(path for name, path in unpacked.items() if part in name)


# ---------------------------------------------------------------- trace-cmd report


def report(path: Path, *flags: str) -> str:
    done = subprocess.run([TRACE_CMD, "report", *flags, "-i", str(path)], capture_output=True, check=True)
    return done.stdout.decode("utf-8", "replace")


LINE = re.compile(r"^\s*(?P<comm>.*)-(?P<pid>\d+)\s+\[(?P<cpu>\d+)\]\s+(?P<ts>\d+(?:\.\d+)?): "
                  r"(?P<event>[^\s:]+): (?P<text>.*)$")
DROPPED = re.compile(r"^CPU:(?P<cpu>\d+) \[(?:(?P<count>\d+) )?EVENTS DROPPED\]$")


@dataclass
class Line:
    comm: str
    pid: int
    cpu: int
    ts: int
    event: str
    text: str
    dropped: int | None  # "CPU:n [k EVENTS DROPPED]" before it: k, or -1 without a count


def parse_report(text: str) -> list[Line]:
    """``trace-cmd report -R -t`` as lines; a field that printed a newline continues its line."""
    lines: list[Line] = []
    dropped = None
    for raw in text.removesuffix("\n").split("\n"):
        if raw.startswith("cpus="):
            continue
        if match := DROPPED.match(raw):
            dropped = int(match["count"]) if match["count"] else -1
        elif match := LINE.match(raw):
            secs, _, frac = match["ts"].partition(".")
            ts = int(secs) * 10**9 + int(frac.ljust(9, "0")) if frac else int(secs)
            lines.append(Line(match["comm"], int(match["pid"]), int(match["cpu"]), ts, match["event"],
                              match["text"].lstrip(" "), dropped))
            dropped = None
        elif lines:
            lines[-1].text += "\n" + raw
    return lines


def split_fields(text: str, names: list[str]) -> dict[str, str]:
    """' a=1 b=x y' with the names in order -> {"a": "1", "b": "x y"}."""
    values, pos = {}, 0
    for i, name in enumerate(names):
        prefix = f"{name}=" if i == 0 else f" {name}="
        assert text.startswith(prefix, pos), (text, name)
        start = pos + len(prefix)
        end = text.find(f" {names[i + 1]}=", start) if i + 1 < len(names) else len(text)
        values[name], pos = text[start:end], end
    return values


# ---------------------------------------------------------------- how libtraceevent prints a field


@dataclass
class Conv:
    spec: str  # "%016lx"
    letter: str  # d u i x X o s p
    ls: int  # -2 hh, -1 h, 0, 1 l, 2 ll
    arg: str | None


def split_print_fmt(print_fmt: str) -> tuple[str, list[str]]:
    match = re.match(r'\s*"((?:[^"\\]|\\.)*)"\s*,?(.*)$', print_fmt, re.S)
    if not match:
        return "", []
    args, depth, current, quote = [], 0, "", False
    for ch in match[2]:
        if ch == '"':
            quote = not quote
        if not quote and ch in "([":
            depth += 1
        elif not quote and ch in ")]":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            args.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        args.append(current.strip())
    return match[1], args


def print_items(fmt: str, args: list[str]) -> list:
    """The format split as libtraceevent's parse_args does: literal strings and conversions."""
    items, i, a = [], 0, 0
    while i < len(fmt):
        if fmt[i] == "%" and fmt[i + 1:i + 2] != "%":
            j, ls = i + 1, 0
            while j < len(fmt):
                c = fmt[j]
                if c in "hlLzZ":
                    ls = {"h": ls - 1, "l": ls + 1, "L": 2}.get(c, 1)
                elif c == "*":
                    a += 1
                elif c not in "#.-0123456789":
                    if c == "p" and fmt[j + 1:j + 2] in ("s", "S", "f", "F"):
                        j += 1
                    if c in "duixXosp":
                        items.append(Conv(fmt[i:j + 1], c, ls, args[a] if a < len(args) else None))
                        a += 1
                    else:
                        items.append(f">{c}<")
                    break
                j += 1
            i = j + 1
        else:
            text = []
            while i < len(fmt) and not (fmt[i] == "%" and fmt[i + 1:i + 2] != "%"):
                if fmt[i] == "\\" and i + 1 < len(fmt):
                    text.append({"n": "\n", "t": "\t", "r": "\r"}.get(fmt[i + 1], fmt[i + 1]))
                    i += 2
                elif fmt[i] == "%":
                    text.append("%")
                    i += 2
                else:
                    text.append(fmt[i])
                    i += 1
            items.append("".join(text))
    return items


def closing_paren(text: str) -> int:
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return i
    return len(text)


def field_ref(arg: str) -> tuple[str, list[str]] | None:
    """``(void *)REC->func`` -> ("func", ["void *"]); None for anything but a (cast) field."""
    arg, casts = arg.strip(), []
    while arg.startswith("("):
        end = closing_paren(arg)
        inner, rest = arg[1:end].strip(), arg[end + 1:].strip()
        if not rest:
            arg = inner
            continue
        if "REC" in inner or not re.fullmatch(r"[\w\s*]+", inner):
            return None
        casts.append(inner)
        arg = rest
    match = re.fullmatch(r"REC->(\w+)", arg)
    return (match[1], casts) if match else None


def cast_mask(value: int, cast: str) -> int:
    """What libtraceevent's eval_type_str does to a value: truncate to the cast's size."""
    if cast.endswith("*"):
        return value
    name = cast.removeprefix("unsigned ").strip()
    bits = {"u8": 8, "s8": 8, "char": 8, "u16": 16, "s16": 16, "short": 16, "u32": 32, "s32": 32,
            "int": 32}.get(name if cast.startswith("unsigned ") else cast)
    return value & ((1 << bits) - 1) if bits else value


def printing_rules(fmt, payload) -> dict[str, tuple | None]:
    """For each field: (Conv, casts, has_0x) if its value goes through the print fmt, else None
    (printed raw), emulating libtraceevent's print_field() walk over the parsed format."""
    fmt_text, args = split_print_fmt(fmt.print_fmt)
    items = print_items(fmt_text, args)
    rules: dict[str, tuple | None] = {}
    at: int | None = 0
    for fld in payload:
        rules[fld.name] = None
        if not items or at is None or fld.is_array or fld.is_dynamic:
            continue
        has_0x, k = False, at
        for _ in range(len(items)):
            item = items[k]
            if isinstance(item, str):
                has_0x = len(item) > 1 and item.endswith("0x")
            else:
                ref = field_ref(item.arg) if item.arg else None
                if ref and ref[0] == fld.name:
                    rules[fld.name] = (item, ref[1], has_0x)
                    at = k + 1 if k + 1 < len(items) else None
                    break
                has_0x = False
            k = (k + 1) % len(items)
    return rules


class Symbols:
    """kallsyms looked up as libtraceevent does, written plainly (the reader parses it with numpy).

    Absolute and '$' symbols are skipped; the rest, in reverse file order, are stably sorted
    by address; glibc's bsearch finds a symbol equal to the address or the one below it
    (not past the last symbol).
    """

    def __init__(self, text: bytes):
        entries = []
        for line in text.decode().split("\n"):
            parts = line.split()
            if len(parts) >= 3 and parts[1] not in "Aa" and not parts[2].startswith("$"):
                entries.append((int(parts[0], 16), parts[2]))
        self.entries = sorted(reversed(entries), key=lambda e: e[0])

    def name(self, addr: int) -> str:
        lo, hi, table = 0, len(self.entries), self.entries
        while lo < hi:
            mid = (lo + hi) // 2
            after = table[mid + 1][0] if mid + 1 < len(table) else 0
            if addr == table[mid][0] or table[mid][0] < addr < after:
                return table[mid][1]
            lo, hi = (lo, mid) if addr < table[mid][0] else (mid + 1, hi)
        return hex(addr)


def render(value, fld, rule, symbols: Symbols) -> str:
    """The text libtraceevent prints for a field's value (the value as read_events gives it)."""
    if fld.is_array or fld.is_dynamic or fld.size not in (1, 2, 4, 8):
        if isinstance(value, str):  # char arrays: the text up to the NUL
            assert printable(value.encode()), value
            return value
        head = value.split(b"\0", 1)[0]
        if fld.is_string and printable(head):  # libtraceevent prints u8 arrays as text too, if it can
            return head.decode()
        return "ARRAY[" + ", ".join(f"{b:02x}" for b in value) + "]"
    value = int(value)
    raw = value & ((1 << (8 * fld.size)) - 1)
    if rule is None:
        if fld.is_pointer:
            return f"0x{raw:x}"
        if fld.signed:
            if fld.size == 4 and fld.is_long:
                return f"0x{raw:x}"
            return {2: "%2d", 1: "%1d"}.get(fld.size, "%d") % value
        return f"0x{raw:x}" if fld.is_long else str(raw)
    conv, casts, has_0x = rule
    for cast in reversed(casts):
        raw = cast_mask(raw, cast)
    if conv.letter == "p":
        assert conv.spec[-1] in "sf", f"unexpected pointer format {conv.spec}"
        return symbols.name(raw)
    bits = {-2: 8, -1: 16, 0: 32, 1: 64, 2: 64}[conv.ls]
    number = raw & ((1 << bits) - 1)
    if conv.letter in "di" and number >> (bits - 1):
        number -= 1 << bits
    spec = re.sub(r"[hlLzZ]", "", conv.spec)
    spec = spec[:-1] + "d" if conv.letter == "u" else spec
    return ("0x" if has_0x else "") + spec % number


def printable(data: bytes) -> bool:
    """C isprint() or isspace() for every byte, as libtraceevent's is_printable_array()."""
    return all(0x20 <= b < 0x7F or b in b"\t\n\v\f\r" for b in data)


def column_name(name: str) -> str:
    base = ("ts", "cpu", "pid", "comm", "system", "event", "func_name")
    return f"field_{name}" if name in base else name


def assert_like_trace_cmd(path: Path) -> tuple[pd.DataFrame, list[Line]]:
    """read_events(path) equals ``trace-cmd report -R -t``, event for event and field for field."""
    frame, trace = read_events(path), TraceFile.open(path)
    symbols = Symbols(trace.kallsyms.text)
    lines = parse_report(report(path, "-R", "-t"))
    assert len(frame) == len(lines)
    fmts = {(f.system, f.name): f for f in trace.formats.values()}
    layouts = {}
    mismatches = []
    columns = list(frame.columns)
    for i, (row, line) in enumerate(zip(frame.itertuples(index=False, name=None), lines, strict=True)):
        got = dict(zip(columns, row, strict=True))
        head = (got["ts"], got["cpu"], got["pid"], got["comm"], got["event"])
        want = (line.ts, line.cpu, line.pid, line.comm, line.event)
        if head != want:
            mismatches.append((i, head, want))
            continue
        key = (got["system"], got["event"])
        if key not in layouts:
            payload = [f for f in fmts[key].fields if not f.name.startswith("common_")]
            layouts[key] = (payload, printing_rules(fmts[key], payload))
        payload, rules = layouts[key]
        texts = split_fields(line.text, [f.name for f in payload])
        for n, fld in enumerate(payload):
            text = render(got[column_name(fld.name)], fld, rules[fld.name], symbols)
            if fld.name == "func" and text != got["func_name"]:
                mismatches.append((i, "func_name", got["func_name"], text))
            if n == len(payload) - 1:
                text = text.removesuffix("\n")  # trace-cmd drops a line's last newline
            if text != texts[fld.name]:
                mismatches.append((i, fld.name, text, texts[fld.name]))
        if len(mismatches) > 10:
            break
    assert not mismatches, mismatches
    return frame, lines


# ---------------------------------------------------------------- the samples


@needs_trace_cmd
def test_sample_events_match_trace_cmd_report(sample):
    frame, _ = assert_like_trace_cmd(sample)
    assert len(frame) > 5000
    assert {"funcgraph_entry", "funcgraph_exit"} <= set(frame["event"])
    assert frame["func"].dtype == "UInt64" and frame["calltime"].dtype == "Int64"


def test_sample_frame_columns(sample):
    frame = read_events(sample)
    assert list(frame.columns[:6]) == ["ts", "cpu", "pid", "comm", "system", "event"]
    assert frame.columns[-1] == "func_name"
    assert [str(frame[c].dtype) for c in ("ts", "cpu", "pid")] == ["int64"] * 3
    assert all(isinstance(frame[c].dropna().iloc[0], str) for c in ("comm", "system", "event", "func_name"))
    assert frame["ts"].is_monotonic_increasing
    assert "common_type" not in frame and "common_pid" not in frame and "common_flags" in frame
    assert frame.loc[frame["event"] == "funcgraph_exit", "func_name"].notna().all()
    assert frame.loc[frame["event"] == "kvm_unmap_hva_range", "func"].isna().all()


@needs_trace_cmd
def test_sample_header_facts_match_trace_cmd(sample):
    trace = TraceFile.open(sample)
    summary = subprocess.run([TRACE_CMD, "dump", "--summary", "-i", str(sample)], capture_output=True,
                             text=True, check=True).stdout
    assert f"{trace.version}\t[Version]" in summary
    assert f"{trace.page_size}\t[Page size, bytes]" in summary
    if trace.version == 7:
        assert f"{trace.compression}\t[Compression algorithm]" in summary
    uname = report(sample, "--uname").splitlines()
    assert uname[0] == f"cpus={trace.cpus}" and uname[1] == trace.uname
    clock = subprocess.run([TRACE_CMD, "dump", "--clock", "-i", str(sample)], capture_output=True, text=True,
                           check=True).stdout
    assert f"[{trace.clock}]" in clock
    assert trace.cpus == 2 and trace.uname.startswith("Linux kvmlab ")


@needs_trace_cmd
def test_sample_lost_events_match_trace_cmd_stat(sample):
    trace = TraceFile.open(sample)
    blocks = report(sample, "--stat").split("CPU: ")[1:]
    shown = {}
    for block in blocks:
        lines = block.strip().splitlines()
        values = dict(line.split(":", 1) for line in lines[1:] if ":" in line and "data recorded" not in line)
        shown[int(lines[0])] = {k.strip().replace(" ", "_"): v.strip() for k, v in values.items()}
    lost = trace.lost_events()
    assert sorted(shown) == sorted(lost) == [0, 1]
    for cpu, stat in shown.items():
        for key in ("entries", "overrun", "commit_overrun", "dropped_events", "read_events"):
            assert lost[cpu][key] == int(stat[key]), (cpu, key)
        assert trace.cpu_stats[cpu]["bytes"] == int(stat["bytes"])
        assert trace.cpu_stats[cpu]["now_ts_ns"] == int(stat["now_ts"].replace(".", "")) * 1000
    frame = read_events(sample)
    for cpu, row in lost.items():
        assert row["recorded"] == int((frame["cpu"] == cpu).sum())
        assert row["missed_pages"] == row["missed_events"] == 0 and row["lost"] == 0


def test_sample_unrecorded_entries(unpacked):
    """The stats are read while trace-cmd still drains the buffers: "entries" may be in the file."""
    drained = TraceFile.open(sample_named(unpacked, "lookup-v6.dat")).lost_events()
    assert drained[1]["entries"] == 19697 and drained[1]["recorded"] == 19697 + 3841
    assert drained[1]["unrecorded"] == 0
    cut = TraceFile.open(sample_named(unpacked, "undrained"))
    assert {cpu: row["unrecorded"] for cpu, row in cut.lost_events().items()} == {0: 22, 1: 115}
    assert cut.describe_losses() == ["CPU 0: 22 events left in the kernel buffer, not recorded",
                                     "CPU 1: 115 events left in the kernel buffer, not recorded"]


@needs_trace_cmd
def test_sample_calls_match_trace_cmd(sample):
    frame = read_events(sample)
    table = calls(frame)
    exits = [line for line in parse_report(report(sample, "-R", "-t")) if line.event == "funcgraph_exit"]
    # the first field is func on every kernel (5.10 prints depth last, 6.1 second)
    assert Counter(table["function"]) == Counter(line.text.split()[0].removeprefix("func=") for line in exits)
    rows = frame[frame["event"] == "funcgraph_exit"]
    assert (table["duration_ns"].to_numpy() == (rows["rettime"] - rows["calltime"]).to_numpy()).all()
    assert (table["duration_ns"] >= 0).all()
    assert (table["ts"].to_numpy() == rows["ts"].to_numpy()).all()


def test_calls_of_events_without_function_graph():
    assert list(calls(pd.DataFrame({"ts": [], "event": []})).columns)[:4] == [
        "function", "depth", "entry_ts", "duration_ns"]


def test_no_calls_beside_calls_keeps_durations_numbers(unpacked):
    """A trace read in part to nothing beside a whole one: the durations stay integers
    (object columns made pandas' quantile raise TypeError in the report)."""
    none = calls(pd.DataFrame({"ts": [], "event": []}))
    table = pd.concat([calls(read_events(sample_named(unpacked, "bullseye"))), none], ignore_index=True)
    assert table["duration_ns"].dtype == np.int64 and table["ts"].dtype == np.int64
    assert table.groupby("function")["duration_ns"].quantile(0.5).notna().all()


# ---------------------------------------------------------------- damaged samples


def assert_cut_per_cpu(partial: pd.DataFrame, good: pd.DataFrame) -> Counter:
    """``partial`` is ``good`` with each CPU's events cut after its first n (n from 0 to
    all), value for value and in ``good``'s order; returns n per CPU."""
    kept = Counter(partial["cpu"].tolist())
    rank = good.groupby("cpu").cumcount().to_numpy()
    want = good[rank < good["cpu"].map(lambda cpu: kept[cpu]).to_numpy()]
    assert len(want) == len(partial)
    for name in good.columns:
        expected = want[name].astype(object).to_numpy()
        got = partial[name].astype(object).to_numpy() if name in partial else np.full(len(partial), pd.NA,
                                                                                       dtype=object)
        assert all(same(a, b) for a, b in zip(got, expected, strict=True)), name
    return kept


def same(a, b) -> bool:
    if isinstance(a, (str, bytes)) or isinstance(b, (str, bytes)):
        return a == b
    if pd.isna(a) or pd.isna(b):
        return bool(pd.isna(a) and pd.isna(b))
    return a == b


def damaged(tmp_path: Path, source: Path, edit) -> Path:
    data = bytearray(source.read_bytes())
    data = edit(data) or data
    path = tmp_path / "damaged.dat"
    path.write_bytes(bytes(data))
    return path


def expect_damage(path: Path, good: pd.DataFrame, words: str, truncated: bool) -> TraceFileError:
    with pytest.raises(TraceFileError) as caught:
        read_events(path)
    err = caught.value
    assert str(err).startswith(f"{path}: {'truncated' if truncated else 'corrupt'} at offset {err.offset}")
    assert err.path == str(path) and err.truncated == truncated
    assert words in str(err), str(err)
    partial = read_events(path, partial=True)
    assert partial.attrs["damage"] == str(err) and partial.attrs["damage_offset"] == err.offset
    if err.partial is not None:
        assert len(err.partial) == len(partial)
    assert_cut_per_cpu(partial, good)
    return err


def test_truncated_in_cpu_data_v6(unpacked, tmp_path):
    source = sample_named(unpacked, "lookup-v6.dat")
    good = read_events(source)
    cpu, offset, size = TraceFile.open(source).cpu_data[1]
    cut = offset + size // 2 + 100
    err = expect_damage(damaged(tmp_path, source, lambda d: d[:cut]), good, "CPU 1 data ends early", True)
    assert err.offset == cut
    partial = read_events(tmp_path / "damaged.dat", partial=True)
    assert 0 < len(partial) < len(good)
    assert assert_cut_per_cpu(partial, good)[0] == (good["cpu"] == 0).sum()  # CPU 0 is intact: all of it


def with_pages(source: Path, dest: Path, pages: dict[int, int]) -> Path:
    """A copy of the v6 file ``source`` whose CPU table gives CPU c only its first
    ``pages[c]`` pages (the other CPUs keep theirs): what a damaged copy still has
    intact, as a whole file that trace-cmd reads."""
    data, trace = bytearray(source.read_bytes()), TraceFile.open(source)
    table = data.find(b"flyrecord\0") + len(b"flyrecord\0")
    for cpu, offset, size in trace.cpu_data:
        assert struct.unpack_from("<QQ", data, table + 16 * cpu) == (offset, size)
        if cpu in pages:
            struct.pack_into("<Q", data, table + 16 * cpu + 8, min(size, pages[cpu] * trace.page_size))
    dest.write_bytes(bytes(data))
    return dest


@needs_trace_cmd
@pytest.mark.parametrize("inside", [0, 2100], ids=["at a page boundary", "inside a record"])
def test_truncated_in_cpu0_data_v6_keeps_the_intact_pages(unpacked, tmp_path, inside):
    """A v6 file cut in CPU 0's data, which lies before CPU 1's: CPU 1 is lost whole, yet
    every event of CPU 0's pages before the cut, and of the cut page's whole records,
    must come back. trace-cmd refuses the cut file ("possibly truncated"), so the
    reference is the uncut file with CPU 0 ending at the cut page (before it, and after
    it) and no CPU 1 data, as trace-cmd reports it."""
    source = sample_named(unpacked, "bullseye-update-v6")
    trace = TraceFile.open(source)
    (_, offset, size), (_, cpu1_offset, _) = trace.cpu_data
    assert offset + size <= cpu1_offset
    page = size // trace.page_size * 3 // 5
    cut = offset + page * trace.page_size + inside
    path = damaged(tmp_path, source, lambda d: d[:cut])
    with pytest.raises(TraceFileError, match="CPU 0 data ends early") as caught:
        read_events(path)
    assert caught.value.truncated and caught.value.offset == cut
    partial = read_events(path, partial=True)
    assert partial.attrs["damage"] == str(caught.value)
    before, lines = assert_like_trace_cmd(with_pages(source, tmp_path / "before.dat", {0: page, 1: 0}))
    assert len(lines) > 20000 and set(partial["cpu"]) == {0}
    if not inside:
        assert len(partial) == len(lines)
        assert_cut_per_cpu(partial, before)
        return
    with_cut_page, more = assert_like_trace_cmd(
        with_pages(source, tmp_path / "with.dat", {0: page + 1, 1: 0}))
    assert len(lines) < len(partial) < len(more)
    assert_cut_per_cpu(partial, with_cut_page)


@needs_trace_cmd
def test_corrupt_page_keeps_the_other_cpus_events(unpacked, tmp_path):
    """A corrupt page early in CPU 0: CPU 0's events before it and all of CPU 1's, even
    those later than the damage, as trace-cmd reports the file without that page and after."""
    source = sample_named(unpacked, "bullseye-update-v6")
    trace = TraceFile.open(source)
    _, offset, _ = trace.cpu_data[0]
    page = 100
    start = offset + page * trace.page_size
    path = damaged(tmp_path, source,
                   lambda d: d.__setitem__(slice(start + 8, start + 16), struct.pack("<Q", 5000)))
    with pytest.raises(TraceFileError, match="commit size 5000 is beyond the page"):
        read_events(path)
    partial = read_events(path, partial=True)
    intact, lines = assert_like_trace_cmd(with_pages(source, tmp_path / "intact.dat", {0: page}))
    assert len(partial) == len(lines)
    kept = assert_cut_per_cpu(partial, intact)
    good = read_events(source)
    assert kept[1] == (good["cpu"] == 1).sum() > 0
    assert partial.loc[partial["cpu"] == 1, "ts"].max() > partial.loc[partial["cpu"] == 0, "ts"].max()


def test_truncated_in_cpu_data_v7_zstd(unpacked, tmp_path):
    """v7 writes the options that locate the CPU data after it: a cut there loses everything."""
    source = sample_named(unpacked, "v7-zstd")
    cpu, offset, size = TraceFile.open(source).cpu_data[0]
    cut = offset + size * 3 // 4
    err = expect_damage(damaged(tmp_path, source, lambda d: d[:cut]), read_events(source),
                        "v7 writes the one that says where the CPU data is after the data", True)
    assert err.offset == cut and err.partial is None


@pytest.mark.parametrize("where", ["magic", "header_page", "kallsyms", "flyrecord"])
def test_truncated_in_headers(unpacked, tmp_path, where):
    source = sample_named(unpacked, "lookup-v6.dat")
    data = source.read_bytes()
    cuts = {"magic": 5, "header_page": 300, "kallsyms": 200_000, "flyrecord": data.find(b"flyrecord\0") + 14}
    cut = cuts[where]
    path = damaged(tmp_path, source, lambda d: d[:cut])
    err = expect_damage(path, read_events(source), "", True)
    assert err.offset == cut and err.partial is None
    assert len(read_events(path, partial=True)) == 0


def page_offsets(path: Path) -> list[tuple[int, int]]:
    """(cpu, file offset) of each ring-buffer page of an uncompressed file."""
    trace = TraceFile.open(path)
    return [(cpu, start) for cpu, offset, size in trace.cpu_data
            for start in range(offset, offset + size, trace.page_size)]


def test_corrupt_page_commit(unpacked, tmp_path):
    source = sample_named(unpacked, "v7.dat")
    cpu, page = page_offsets(source)[40]
    path = damaged(tmp_path, source, lambda d: d.__setitem__(slice(page + 8, page + 16),
                                                              struct.pack("<Q", 5000)))
    err = expect_damage(path, read_events(source), "commit size 5000 is beyond the page", False)
    assert err.offset == page
    assert len(read_events(path, partial=True)) > 1000


def event_header(data: bytes, page: int, n: int) -> int:
    """The file offset of the n-th record header on a page (small data events assumed)."""
    at = page + 16
    for _ in range(n):
        type_len = struct.unpack_from("<I", data, at)[0] & 31
        assert 1 <= type_len <= 28
        at += 4 + 4 * type_len
    return at


def test_corrupt_event_length(unpacked, tmp_path):
    source = sample_named(unpacked, "lookup-v6.dat")
    cpu, page = page_offsets(source)[-20]
    header = event_header(source.read_bytes(), page, 5)

    def edit(data):
        data[header:header + 4] = struct.pack("<I", 0)  # type_len 0
        data[header + 4:header + 8] = struct.pack("<I", 1)  # a length word below 4

    err = expect_damage(damaged(tmp_path, source, edit), read_events(source),
                        f"event at page offset {header - page - 16}: type_len 0 with length word 1", False)
    assert err.offset == header


def test_corrupt_event_type(unpacked, tmp_path):
    source = sample_named(unpacked, "v7.dat")
    cpu, page = page_offsets(source)[10]
    path = damaged(tmp_path, source, lambda d: d.__setitem__(slice(page + 20, page + 22), b"\xff\xff"))
    err = expect_damage(path, read_events(source), "event of type 65535, which has no format", False)
    assert err.offset == page + 20


def test_corrupt_section_header(unpacked, tmp_path):
    source = sample_named(unpacked, "v7-zstd")
    kallsyms = TraceFile.open(source).sections["kallsyms"]
    path = damaged(tmp_path, source, lambda d: d.__setitem__(slice(kallsyms, kallsyms + 2), b"\x99\x99"))
    err = expect_damage(path, read_events(source), "expected kallsyms (id 19)", False)
    assert err.offset == kallsyms and err.partial is None


def test_corrupt_compressed_chunk(unpacked, tmp_path):
    source = sample_named(unpacked, "v7-zstd")
    cpu, offset, size = TraceFile.open(source).cpu_data[0]
    middle = offset + size // 2
    path = damaged(tmp_path, source, lambda d: d.__setitem__(slice(middle, middle + 64), bytes(64)))
    err = expect_damage(path, read_events(source), "", False)
    assert offset <= err.offset <= middle


def test_not_a_trace_file(tmp_path):
    path = tmp_path / "x.dat"
    path.write_bytes(b"hello world, this is not a trace")
    with pytest.raises(TraceFileError, match=r"x.dat: corrupt at offset 0: not a trace-cmd file"):
        TraceFile.open(path)


# ---------------------------------------------------------------- hand-built files

HEADER_EVENT = (b"# compressed entry header\n\ttype_len    :    5 bits\n\ttime_delta  :   27 bits\n"
                b"\tarray       :   32 bits\n\n\tpadding     : type == 29\n\ttime_extend : type == 30\n"
                b"\ttime_stamp : type == 31\n\tdata max type_len  == 28\n")
COMMON = ("\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
          "\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n"
          "\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n"
          "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n")
SAMPLE_EVENT = ("name: sample\nID: 700\nformat:\n" + COMMON
                + "\tfield:int value;\toffset:8;\tsize:4;\tsigned:1;\n"
                + "\tfield:unsigned int count;\toffset:12;\tsize:4;\tsigned:0;\n"
                + "\tfield:u64 big;\toffset:16;\tsize:8;\tsigned:0;\n"
                + "\tfield:char tag[8];\toffset:24;\tsize:8;\tsigned:1;\n"
                + "\tfield:__data_loc char[] name;\toffset:32;\tsize:4;\tsigned:1;\n"
                + "\tfield:short small;\toffset:36;\tsize:2;\tsigned:1;\n"
                + "\tfield:unsigned char raw[4];\toffset:38;\tsize:4;\tsigned:0;\n\n"
                + 'print fmt: "value=%d big=0x%llx name=%s", REC->value, REC->big, __get_str(name)\n')
MASK27 = (1 << 27) - 1


class Build:
    """Writes ring-buffer records, pages and whole v6 files for a kernel of this endianness
    and long size (the lab's guests: little-endian, 8). Symbols: _stext, alpha (and an
    alias at its address), beta (in a module), gamma, and an absolute symbol."""

    def __init__(self, endian: str = "<", long_size: int = 8):
        self.e, self.long = endian, long_size
        self.base = 0xFFFFFFFF81000000 if long_size == 8 else 0xC1000000
        self.alpha, self.beta, self.gamma = self.base + 0x1000, self.base + 0x2000, self.base + 0x3000
        digits = 2 * long_size
        symbols = [(self.base, "T _stext"), (self.alpha, "T alpha"), (self.alpha, "t alpha_alias"),
                   (self.beta, "T beta\t[kvm]"), (0x3000, "A fixed_percpu_data"), (self.gamma, "T gamma")]
        self.kallsyms = "".join(f"{addr:0{digits}x} {rest}\n" for addr, rest in symbols).encode()
        data = 16 if long_size == 8 else 12
        self.header_page = (f"\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n"
                            f"\tfield: local_t commit;\toffset:8;\tsize:{long_size};\tsigned:1;\n"
                            f"\tfield: int overwrite;\toffset:8;\tsize:1;\tsigned:1;\n"
                            f"\tfield: char data;\toffset:{data};\tsize:{4096 - data};\tsigned:1;\n").encode()
        self.funcgraph_entry = ("name: funcgraph_entry\nID: 11\nformat:\n" + COMMON
                                + f"\tfield:unsigned long func;\toffset:8;\tsize:{long_size};\tsigned:0;\n"
                                + f"\tfield:int depth;\toffset:{8 + long_size};\tsize:4;\tsigned:1;\n\n"
                                + 'print fmt: "--> %ps (%d)", (void *)REC->func, REC->depth\n')

    def pack(self, fmt: str, *values) -> bytes:
        return struct.pack(self.e + fmt.replace("L", "Q" if self.long == 8 else "I"), *values)

    def header(self, type_len: int, delta: int) -> bytes:
        """The u32 before each record: C bit-fields, whose order follows the endianness."""
        return self.pack("I", type_len << 27 | delta if self.e == ">" else delta << 5 | type_len)

    def data_event(self, delta: int, payload: bytes, force_long: bool = False) -> bytes:
        payload += bytes(-len(payload) % 4)
        if len(payload) <= 112 and not force_long:
            return self.header(len(payload) // 4, delta) + payload
        return self.header(0, delta) + self.pack("I", len(payload) + 4) + payload

    def time_extend(self, delta: int) -> bytes:
        return self.header(30, delta & MASK27) + self.pack("I", delta >> 27)

    def time_stamp(self, ts: int) -> bytes:
        return self.header(31, ts & MASK27) + self.pack("I", (ts >> 27) & 0xFFFFFFFF)

    def padding(self, delta: int, length: int) -> bytes:
        """A discarded event: ``length`` bytes after the header, its length word included."""
        return self.header(29, delta) + self.pack("I", length) + bytes(length - 4)

    def entry(self, pid: int, func: int, depth: int) -> bytes:
        return self.pack("HBBiLi", 11, 1, 0, pid, func, depth)

    def sample(self, pid: int, value: int, count: int, big: int, tag: bytes, name: bytes,
               small: int) -> bytes:
        return (self.pack("HBBiiIQ8sIh4s", 700, 0, 1, pid, value, count, big, tag, len(name) << 16 | 44,
                          small, b"\x01\x02\xfe\xff") + bytes(2) + name)

    def page(self, ts: int, events: list[bytes], missed: int | None = None) -> bytes:
        data = b"".join(events)
        commit = len(data)
        if missed is not None:
            commit |= 1 << 31 | ((1 << 30) if missed >= 0 else 0)
            data += self.pack("L", missed) if missed >= 0 else b""
        body = self.pack("QL", ts, commit) + data
        assert len(body) <= 4096
        return body + bytes(4096 - len(body))

    def write_v6(self, path: Path, cpu_pages: list[list[bytes]],
                 cmdlines: bytes = b"7 worker\n9 two words\n", options: tuple = ()) -> Path:
        """A minimal trace.dat v6 that trace-cmd reads: one ftrace and one custom event format."""
        def sized(data: bytes, width: int) -> bytes:
            return self.pack("Q" if width == 8 else "I", len(data)) + data

        out = bytearray(b"\x17\x08\x44tracing6\0" + bytes([self.e == ">", self.long]) + self.pack("I", 4096))
        out += b"header_page\0" + sized(self.header_page, 8) + b"header_event\0" + sized(HEADER_EVENT, 8)
        out += self.pack("I", 1) + sized(self.funcgraph_entry.encode(), 8)
        out += self.pack("I", 1) + b"test\0" + self.pack("I", 1) + sized(SAMPLE_EVENT.encode(), 8)
        out += sized(self.kallsyms, 4) + sized(b"", 4) + sized(cmdlines, 8)
        out += self.pack("I", len(cpu_pages)) + b"options  \0"
        for cpu in range(len(cpu_pages)):
            stat = (f"CPU: {cpu}\nentries: 0\noverrun: {3 * cpu}\ncommit overrun: 0\nbytes: 0\n"
                    "oldest event ts:     1.000000\nnow ts:     2.000000\n"
                    "dropped events: 0\nread events: 5\n")
            out += self.pack("HI", 2, len(stat) + 1) + stat.encode() + b"\0"
        for option, data in options:
            out += self.pack("HI", option, len(data)) + data
        out += self.pack("H", 0) + b"flyrecord\0"
        table = len(out)
        out += bytes(16 * len(cpu_pages))
        for cpu, pages in enumerate(cpu_pages):
            out += bytes(-len(out) % 4096)
            out[table + 16 * cpu:table + 16 * cpu + 16] = self.pack("QQ", len(out), 4096 * len(pages))
            out += b"".join(pages)
        path.write_bytes(bytes(out))
        return path

    def rich_file(self, tmp_path: Path) -> Path:
        """Every kind of ring-buffer record, on two CPUs."""
        alpha, beta, gamma = self.alpha, self.beta, self.gamma
        cpu0 = [
            self.page(1000, [
                self.data_event(5, self.entry(7, alpha, 0)),  # exact symbol (an alias at the same address)
                self.time_extend(3 << 27),  # a delta too large for 27 bits
                self.data_event(7, self.entry(7, alpha + 0x20, 1)),  # inside alpha
                self.padding(4, 12),  # a discarded event: its delta still counts
                self.data_event(1, self.sample(9, -5, 4000000000, 1 << 63 | 5, b"tag\0\0\0\0\0", b"hello\0",
                                               -2)),
                self.data_event(0, self.sample(0, 2, 3, 4, b"1234567\0", b"x\0", 7), force_long=True),
                self.time_stamp(5000),  # absolute time
                self.data_event(2, self.entry(8, gamma + 8, 0))]),  # past the last symbol: printed in hex
            self.page(6000, [self.data_event(10, self.entry(7, beta, 2))], missed=3),
            self.page(7000, [self.time_extend(10), self.data_event(0, self.entry(7, beta, 3))], missed=-1),
        ]
        cpu1 = [
            self.page(1005, [self.data_event(0, self.entry(9, beta, 0)),  # a tie with CPU 0
                             self.data_event(0, self.entry(9, beta, 1))]),
            self.page(900, [self.data_event(1, self.entry(9, alpha, 4))]),  # time goes back on CPU 1
            self.page(6010, [self.data_event(0, self.sample(12345, 1, 1, 1, b"\0" * 8, b"\0", 1))]),
        ]
        return self.write_v6(tmp_path / "rich.dat", [cpu0, cpu1])


LE64 = Build()
KERNELS = {"le64": LE64, "be64": Build(">", 8), "le32": Build("<", 4)}


@needs_trace_cmd
@pytest.mark.parametrize("kernel", KERNELS)
def test_hand_built_file_matches_trace_cmd(tmp_path, kernel):
    path = KERNELS[kernel].rich_file(tmp_path)
    frame, lines = assert_like_trace_cmd(path)
    assert [line.dropped for line in lines if line.dropped] == [3]  # trace-cmd shows the count only
    assert frame.attrs["missed_events"] == [{"cpu": 0, "page_ts": 6000, "count": 3},
                                            {"cpu": 0, "page_ts": 7000, "count": -1}]


@pytest.mark.parametrize("kernel", KERNELS)
def test_hand_built_file_values(tmp_path, kernel):
    build = KERNELS[kernel]
    frame = read_events(build.rich_file(tmp_path))
    cpu0 = frame[frame["cpu"] == 0]
    extend = 3 << 27
    assert cpu0["ts"].tolist() == [1005, 1012 + extend, 1017 + extend, 1017 + extend, 5002, 6010, 7010]
    names = cpu0["func_name"].astype(object)
    assert names.where(names.notna(), None).tolist() == [
        "alpha", "alpha", None, None, hex(build.gamma + 8), "beta", "beta"]
    samples = frame[frame["event"] == "sample"]  # CPU 1's (at 6010) comes before CPU 0's two
    assert samples["value"].tolist() == [1, -5, 2] and samples["count"].tolist() == [1, 4000000000, 3]
    assert str(samples["big"].dtype) == "UInt64" and samples["big"].tolist() == [1, (1 << 63) | 5, 4]
    assert samples["name"].tolist() == ["", "hello", "x"]
    assert samples["tag"].tolist() == ["", "tag", "1234567"]
    assert samples["small"].tolist() == [1, -2, 7] and samples["raw"].tolist()[1] == b"\x01\x02\xfe\xff"
    assert samples["comm"].tolist() == ["<...>", "two words", "<idle>"]
    assert pd.isna(frame.loc[frame["event"] == "sample", "depth"]).all()
    lost = TraceFile.open(tmp_path / "rich.dat").lost_events()
    assert lost[0]["missed_pages"] == 2 and lost[0]["missed_events"] == 3 and lost[0]["missed_uncounted"] == 1
    assert lost[1]["overrun"] == 3 and lost[1]["lost"] == 3 and lost[0]["recorded"] == 7


@pytest.mark.parametrize("option, shifted", [
    ((7, b"1000000\0"), lambda ts: ts + 1000000),  # OFFSET, ns
    ((1, b"0x10\0"), lambda ts: ts + 16000),  # DATE, µs
    ((14, LE64.pack("IIQ", 3, 1, 0)), lambda ts: ts * 3 >> 1),  # TSC2NSEC
])
def test_timestamp_corrections(tmp_path, option, shifted):
    """The options trace-cmd applies to timestamps are applied the same way."""
    pages = [[LE64.page(1000, [LE64.data_event(d, LE64.entry(7, LE64.alpha, 0)) for d in (1, 2, 3)])]]
    frame = read_events(LE64.write_v6(tmp_path / "t.dat", pages, options=[option]))
    assert frame["ts"].tolist() == [shifted(ts) for ts in (1001, 1003, 1006)]
    if TRACE_CMD:
        assert_like_trace_cmd(tmp_path / "t.dat")


def greedy_merge(streams: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """trace-cmd's merge: take the earliest head, the lowest CPU on ties (heapq.merge does that)."""
    return list(heapq.merge(*streams, key=lambda item: item[0]))


@pytest.mark.parametrize("seed", range(6))
def test_merge_order_is_trace_cmds(tmp_path, seed):
    """Random pages on 3 CPUs, time going back between pages: the order is trace-cmd's merge."""
    rng = random.Random(seed)
    cpu_pages, streams = [], []
    for cpu in range(3):
        pages, stream = [], []
        for _ in range(rng.randint(1, 4)):
            page_ts = ts = rng.randint(0, 60)
            events = []
            for _ in range(rng.randint(1, 6)):
                delta = rng.choice([0, 0, 1, 3, 10])
                ts += delta
                events.append(LE64.data_event(delta, LE64.entry(100 + cpu, LE64.alpha, len(stream))))
                stream.append((ts, cpu))
            pages.append(LE64.page(page_ts, events))
        cpu_pages.append(pages)
        streams.append(stream)
    path = LE64.write_v6(tmp_path / "merge.dat", cpu_pages)
    frame = read_events(path)
    assert list(zip(frame["ts"], frame["cpu"], strict=True)) == greedy_merge(streams)
    if TRACE_CMD:
        lines = parse_report(report(path, "-R", "-t"))
        assert [(line.ts, line.cpu, line.text) for line in lines] == [
            (ts, cpu, f"func=alpha depth={depth}") for ts, cpu, depth in
            zip(frame["ts"], frame["cpu"], frame["depth"], strict=True)]


def test_hand_built_damage(tmp_path):
    b = LE64
    cpu0 = [b.page(ts, [b.data_event(1, b.entry(7, b.alpha, 0))]) for ts in (100, 200)]
    cpu1 = [b.page(ts, [b.data_event(1, b.entry(9, b.alpha, 0))]) for ts in (150, 250)]
    good = read_events(b.write_v6(tmp_path / "good.dat", [cpu0, cpu1]))
    assert good["ts"].tolist() == [101, 151, 201, 251]

    def broken(last_page: bytes) -> Path:
        return b.write_v6(tmp_path / "bad.dat", [cpu0, [cpu1[0], last_page]])

    path = broken(b.page(250, [b.header(0, 0) + b.pack("I", 2) + bytes(8)]))  # a bogus type_len 0 length
    with pytest.raises(TraceFileError, match="type_len 0 with length word 2") as caught:
        read_events(path)
    assert caught.value.offset == TraceFile.open(path).cpu_data[1][1] + 4096 + 16
    # CPU 1's damaged page says its events are no earlier than 250: 201 comes before them
    assert read_events(path, partial=True)["ts"].tolist() == [101, 151, 201]
    with pytest.raises(TraceFileError, match="padding at page offset 0 .* runs past the end of the page"):
        read_events(broken(b.page(250, [b.header(29, 1) + b.pack("I", 5000)])))
    with pytest.raises(TraceFileError, match="event of type 999, which has no format"):
        read_events(broken(b.page(250, [b.data_event(1, b.pack("HBBi", 999, 0, 0, 1))])))
    with pytest.raises(TraceFileError, match="test:sample event with 20 bytes of data, its format needs 42"):
        read_events(broken(b.page(250, [b.data_event(1, b.pack("HBBi12x", 700, 0, 0, 1))])))
    sample = bytearray(b.sample(9, 1, 1, 1, b"\0" * 8, b"abc\0", 1))
    sample[32:36] = b.pack("I", 40 << 16 | 44)  # "name": 40 bytes at 44, in an event of 48
    with pytest.raises(TraceFileError, match="test:sample field name points outside the event"):
        read_events(broken(b.page(250, [b.data_event(1, bytes(sample))])))
    with pytest.raises(TraceFileError, match="commit size 4081 is beyond the page"):
        read_events(broken(b.pack("QQ", 250, 4081) + bytes(4080)))
    path = broken(b.page(250, [b.data_event(1, b.entry(9, 0, 0))] * 100))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 4096 + 16 + 24 * 40 + 10])  # cut inside the 41st event
    with pytest.raises(TraceFileError, match=r"truncated at offset \d+ \(CPU 1 data ends early: the record "
                                             r"at page offset 960 is cut off"):
        read_events(path)
    partial = read_events(path, partial=True)
    assert partial["ts"].tolist() == [101, 151, 201] + list(range(251, 291))
