"""Read trace-cmd's ``trace.dat`` (file versions 6 and 7) into pandas, without trace-cmd.

kvmlab turns ftrace data into numbers, so it wants every event as a table row, the
events the kernel lost counted per CPU, and speed on traces of millions of events.
``trace-cmd report`` gives text; this module reads the file itself (pure Python and
numpy), and ``tests/unit/test_tracedat.py`` checks it event for event against trace-cmd.

The file, briefly (see trace-cmd.dat.v6(5) and trace-cmd.dat.v7(5)):

* A fixed start: ``17 08 44 "tracing"``, the version as text ("6\\0" or "7\\0"), the
  endianness, the size of a userspace long, the ring-buffer page size. v7 adds the
  compression ("none", "zstd", "zlib") and the offset of the first options section.
* What a reader needs to decode the ring buffer: ``header_page`` and ``header_event``
  (the layouts of a page and of an event header), the ``format`` files of the ftrace
  events and of every enabled event (each field's offset, size and signedness),
  /proc/kallsyms, the printk formats and saved_cmdlines (pid -> comm). v6 stores them
  one after the other; v7 stores them in sections located by options, each section
  optionally compressed.
* Options: CPUSTAT (the per-CPU ``stats`` file read when recording ended: entries,
  overrun, dropped events...), UNAME, TRACECLOCK, CPUCOUNT, DATE/OFFSET/TSC2NSEC
  (timestamp corrections, applied as trace-cmd applies them) and in v7 BUFFER: where
  each CPU's data lies.
* Per-CPU ring-buffer pages, copied verbatim from the kernel (v7: optionally compressed
  in chunks of whole pages). A page is a u64 timestamp, a long ``commit`` (the bytes of
  data in its low 27 bits; bit 31: events were lost before this page; bit 30: their
  count is stored right after the data) and the events. An event starts with a u32:
  ``type_len`` in 5 bits and ``time_delta`` in 27 (low and high bits on a little-endian
  kernel, the other way round on a big-endian one). type_len 1..28:
  type_len*4 bytes of data follow; 0: the next u32 is the data length + 4, data after
  it; 29: padding (a discarded event; its delta still counts); 30: time extend (the
  next u32 holds bits 27.. of the delta); 31: an absolute timestamp (5 top bits kept
  from the running time). An event's time is the page timestamp plus every delta
  before it on the page, its own included.

How it is fast: one event's header gives the next one's position, so a page is a
sequential walk — but pages are independent. The walk runs over all pages at once in
numpy lockstep (step k decodes the k-th header of every page still active), then the
fields are gathered per event type with numpy from the collected offsets. Events are
ordered as trace-cmd orders them: a merge of the per-CPU streams taking the earliest
head, the lowest CPU on ties (a stable sort on the running maximum of each CPU's
timestamps gives the same order, even if a CPU's time steps back).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd

from traces.errors import TraceError, require_regular_file

__all__ = ["EventFormat", "FormatField", "TraceFile", "TraceFileError", "parse_format", "read_events"]

MAGIC = b"\x17\x08\x44tracing"
TYPE_DATA_MAX, TYPE_PADDING, TYPE_TIME_EXTEND, TYPE_TIME_STAMP = 28, 29, 30, 31
TS_SHIFT = 27
TS_MSB = np.uint64(0xF8 << 56)
COMMIT_MASK = (1 << 27) - 1
MISSED_EVENTS, MISSED_STORED = 1 << 31, 1 << 30
# option ids, trace-cmd's enum tracecmd_file_options
OPT_DONE, OPT_DATE, OPT_CPUSTAT, OPT_BUFFER, OPT_TRACECLOCK, OPT_UNAME = 0, 1, 2, 3, 4, 5
OPT_OFFSET, OPT_CPUCOUNT, OPT_VERSION, OPT_TIME_SHIFT, OPT_TSC2NSEC = 7, 8, 9, 12, 14
OPT_HEADER_INFO, OPT_FTRACE_EVENTS, OPT_EVENT_FORMATS, OPT_KALLSYMS = 16, 17, 18, 19
OPT_PRINTK, OPT_CMDLINES, OPT_BUFFER_TEXT = 20, 21, 22
SECTION_NAMES = {OPT_DONE: "options", OPT_HEADER_INFO: "header info", OPT_FTRACE_EVENTS: "ftrace formats",
                 OPT_EVENT_FORMATS: "event formats", OPT_KALLSYMS: "kallsyms", OPT_PRINTK: "printk formats",
                 OPT_CMDLINES: "saved cmdlines", OPT_BUFFER: "flyrecord data"}
SECTION_COMPRESSED = 1
#: columns every frame has; event fields with these names get a ``field_`` prefix
BASE_COLUMNS = ("ts", "cpu", "pid", "comm", "system", "event")
HIDDEN_COMMON = ("common_type", "common_pid")


class TraceFileError(TraceError):
    """A trace.dat that cannot be read in full: truncated or corrupt at a byte offset.

    ``partial`` holds the events read before the damage (a DataFrame; None when the
    damage is in the headers, before any event could be decoded).
    """

    def __init__(self, path, offset: int, what: str, truncated: bool = False, partial=None):
        self.path, self.offset, self.what, self.truncated = str(path), offset, what, truncated
        self.partial = partial
        if truncated:
            text = f"{path}: truncated at offset {offset} ({what})"
        else:
            text = f"{path}: corrupt at offset {offset}: {what}"
        super().__init__(text)


class _Damage(Exception):
    """Raised while parsing; the TraceFile adds its path and makes a TraceFileError."""

    def __init__(self, offset: int, what: str, truncated: bool = False):
        super().__init__(what)
        self.offset, self.what, self.truncated = offset, what, truncated


# ---------------------------------------------------------------- byte cursor


class _Cursor:
    """Reads numbers and strings from the file or a decompressed section.

    Errors name file offsets: inside a decompressed section, the offset of its
    compressed block plus where in the decompressed bytes it went wrong.
    """

    def __init__(self, data, pos: int, end: int, endian: str, file_size: int, origin: tuple | None = None):
        self.data, self.pos, self.end, self.endian = data, pos, end, endian
        self.file_size, self.origin = file_size, origin

    def damage(self, pos: int, what: str) -> _Damage:
        if self.origin is not None:
            offset, label = self.origin
            return _Damage(offset, f"{what} (byte {pos} of the decompressed {label})")
        return _Damage(pos, what)

    def take(self, n: int, what: str) -> bytes:
        pos = self.pos
        if n < 0 or pos + n > self.end:
            if self.origin is None and pos + n > self.file_size:
                raise _Damage(self.file_size, f"{what} needs {n} bytes from offset {pos}", truncated=True)
            raise self.damage(pos, f"{what} ({n} bytes) runs past the end of its section")
        self.pos = pos + n
        return bytes(self.data[pos:pos + n])

    def number(self, size: int, what: str) -> int:
        fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[size]
        return struct.unpack(self.endian + fmt, self.take(size, what))[0]

    def cstring(self, what: str) -> str:
        nul = self.data.find(b"\0", self.pos, self.end)
        if nul < 0:
            if self.origin is None and self.end >= self.file_size:
                raise _Damage(self.file_size, f"{what} has no end", truncated=True)
            raise self.damage(self.pos, f"{what} has no terminating NUL")
        text = bytes(self.data[self.pos:nul]).decode("utf-8", "replace")
        self.pos = nul + 1
        return text

    def expect(self, literal: bytes, what: str) -> None:
        pos = self.pos
        if self.take(len(literal), what) != literal:
            raise self.damage(pos, f"expected {literal!r} for {what}")

    def sized_text(self, width: int, what: str) -> bytes:
        return self.take(self.number(width, f"size of {what}"), what)


# ---------------------------------------------------------------- event formats


@dataclass(frozen=True)
class FormatField:
    """One field of an event's format file (``field:TYPE NAME; offset:N; size:N; signed:N;``)."""

    name: str
    type: str
    offset: int
    size: int
    signed: bool

    @property
    def is_array(self) -> bool:
        return "[" in self.type

    @property
    def is_dynamic(self) -> bool:
        """``__data_loc``/``__rel_loc``: the field holds (length << 16 | offset) of data after it."""
        return self.type.startswith(("__data_loc", "__rel_loc"))

    @property
    def is_string(self) -> bool:
        """As libtraceevent: an array of char, u8 or s8 (printed as text when printable)."""
        return (self.is_array or self.is_dynamic) and any(t in self.type for t in ("char", "u8", "s8"))

    @property
    def is_text(self) -> bool:
        """A char array (not unsigned char/u8): this reader makes it a str, other arrays bytes."""
        return bool(re.search(r"\bchar\b", self.type)) and "unsigned" not in self.type

    @property
    def is_long(self) -> bool:
        return "long" in self.type

    @property
    def is_pointer(self) -> bool:
        return "*" in self.type


@dataclass(frozen=True)
class EventFormat:
    """An event type: its id in the ring buffer, names, fields (common ones first), print fmt."""

    id: int
    system: str
    name: str
    fields: tuple[FormatField, ...]
    print_fmt: str

    @property
    def min_size(self) -> int:
        """Bytes of data an event of this type has at least: the end of its last fixed field."""
        return max((f.offset + f.size for f in self.fields), default=0)

    def field(self, name: str) -> FormatField | None:
        return next((f for f in self.fields if f.name == name), None)


FIELD_LINE = re.compile(r"field:(?P<decl>[^;]*);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
                        r"(?:\s*signed:(?P<signed>\d+);)?")
FIELD_DECL = re.compile(r"^(?P<type>.*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*(?P<array>\[[^\]]*\])?\s*$")


def parse_format(text: str, system: str) -> EventFormat:
    """An event ``format`` file (as in tracefs/events/SYSTEM/EVENT/format) as an EventFormat."""
    name = re.search(r"^name:\s*(\S+)", text, re.M)
    ident = re.search(r"^ID:\s*(\d+)", text, re.M)
    if not name or not ident:
        raise ValueError("format without name or ID")
    fields = []
    for match in FIELD_LINE.finditer(text):
        decl = FIELD_DECL.match(match["decl"].strip())
        if not decl:
            raise ValueError(f"bad field {match['decl']!r}")
        type_ = decl["type"] + (decl["array"] or "")
        fields.append(FormatField(decl["name"], type_, int(match["offset"]), int(match["size"]),
                                  bool(int(match["signed"] or 0))))
    fmt = re.search(r"^print fmt:\s*(.*)$", text, re.M)
    return EventFormat(int(ident[1]), system, name[1], tuple(fields), fmt[1] if fmt else "")


@dataclass(frozen=True)
class _PageLayout:
    """Where the timestamp, commit and data of a ring-buffer page are (from header_page)."""

    ts_offset: int
    commit_offset: int
    commit_size: int
    data_offset: int


def _page_layout(header_page: bytes, header_event: bytes, where: int) -> _PageLayout:
    """The page layout, checking that events use the header this reader decodes."""
    fields = {}
    for match in FIELD_LINE.finditer(header_page.decode("ascii", "replace")):
        decl = FIELD_DECL.match(match["decl"].strip())
        if decl:
            fields[decl["name"]] = (int(match["offset"]), int(match["size"]))
    if not {"timestamp", "commit", "data"} <= fields.keys() or fields["timestamp"][1] != 8:
        raise _Damage(where, f"header_page does not describe a ring-buffer page: {header_page[:80]!r}")
    text = header_event.decode("ascii", "replace")
    for want in (r"type_len\s*:\s*5 bits", r"time_delta\s*:\s*27 bits", r"padding\s*:\s*type == 29",
                 r"time_extend\s*:\s*type == 30", r"data max type_len\s*==\s*28"):
        if not re.search(want, text):
            raise _Damage(where, f"header_event describes another event header ({want!r} missing)")
    return _PageLayout(fields["timestamp"][0], *fields["commit"], fields["data"][0])


# ---------------------------------------------------------------- kallsyms


class _Kallsyms:
    """/proc/kallsyms as saved in the file, looked up the way libtraceevent does.

    libtraceevent skips absolute ('A'/'a') and '$' symbols, keeps the rest in reverse
    file order, sorts them by address with a stable sort and bsearch()es for the
    symbol at or below an address (not past the last one). The addresses are parsed
    with numpy; a name is only cut out of the text when an address asks for it.
    """

    def __init__(self, text: bytes):
        self.text, self.cache = text, {}
        raw = np.frombuffer(text, np.uint8)
        ends = np.flatnonzero(raw == 10)
        if len(raw) and raw[-1] != 10:
            ends = np.append(ends, len(raw))
        starts = np.zeros(len(ends), np.int64)
        starts[1:] = ends[:-1] + 1
        width = max(text.find(b" "), 0)  # of the addresses: 16 hex digits on 64-bit
        whole = ends - starts >= width + 4  # "ADDRESS T N"
        starts, ends = starts[whole], ends[whole]
        addrs, valid = self._hex(raw, starts, width)
        name = starts + width + 3
        kind = raw[name - 2]
        valid &= (raw[name - 3] == 32) & (raw[name - 1] == 32) & (raw[name] != ord("$"))
        valid &= (kind != ord("A")) & (kind != ord("a"))
        index = np.flatnonzero(valid)
        self.line = index[np.lexsort((-index, addrs[index]))]  # by address, then reverse file order
        self.addrs, self.name_start, self.line_end = addrs[self.line], name, ends

    @staticmethod
    def _hex(raw, starts, width):
        """The hex numbers of ``width`` digits at ``starts``: digits to nibbles, nibbles to bytes."""
        if width > 16:
            return np.zeros(len(starts), np.uint64), np.zeros(len(starts), bool)
        lut = np.full(256, 255, np.uint8)
        lut[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
        lut[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
        nibbles = np.zeros((len(starts), 16), np.uint8)
        nibbles[:, 16 - width:] = lut[raw[starts[:, None] + np.arange(width)]]
        valid = (nibbles != 255).all(axis=1)
        packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
        return np.ascontiguousarray(packed).view(">u8").ravel().astype(np.uint64), valid

    def lookup(self, addr: int) -> str | None:
        """The function at or containing ``addr``, or None: glibc bsearch with tep's compare."""
        if addr in self.cache:
            return self.cache[addr]
        addrs, lo, hi, found = self.addrs, 0, len(self.addrs), None
        while lo < hi:
            mid = (lo + hi) // 2
            here = int(addrs[mid])
            after = int(addrs[mid + 1]) if mid + 1 < len(addrs) else 0
            if addr == here or here < addr < after:
                found = mid
                break
            if addr < here:
                hi = mid
            else:
                lo = mid + 1
        name = None
        if found is not None:
            line = int(self.line[found])
            text = self.text[self.name_start[line]:self.line_end[line]]
            name = text.split(None, 1)[0].decode("utf-8", "replace")
        self.cache[addr] = name
        return name

    def name(self, addr: int, long_size: int = 8) -> str:
        """What trace-cmd prints for ``%ps``: the function name, else the address in hex."""
        found = self.lookup(addr)
        return found if found is not None else hex(addr & ((1 << (8 * long_size)) - 1))


def _parse_cmdlines(text: bytes) -> dict[int, str]:
    """saved_cmdlines ("pid comm" lines) as pid -> comm; the first entry of a pid wins."""
    comms: dict[int, str] = {}
    for line in text.decode("utf-8", "replace").split("\n"):
        pid, _, comm = line.strip("\0").partition(" ")
        if pid.lstrip("-").isdigit() and comm:
            comms.setdefault(int(pid), comm)
    return comms


def _parse_cpustat(text: str) -> tuple[int, dict[str, int]] | None:
    """One CPUSTAT option ("CPU: 1\\nentries: 0\\n...") as (cpu, {"entries": 0, ...}).

    Keys are the stats file's names with "_" for spaces; the two timestamps, given in
    seconds, become ``oldest_event_ts_ns`` and ``now_ts_ns``.
    """
    cpu, stats = None, {}
    for line in text.split("\n"):
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().replace(" ", "_"), value.strip().strip("\0")
        try:
            if key == "CPU":
                cpu = int(value)
            elif key.endswith("_ts"):
                stats[key + "_ns"] = int(Decimal(value) * 1_000_000_000)
            else:
                stats[key] = int(value)
        except (ValueError, ArithmeticError):
            continue
    return (cpu, stats) if cpu is not None else None


# ---------------------------------------------------------------- the file


@dataclass
class _CpuData:
    cpu: int
    offset: int
    size: int


class TraceFile:
    """A trace.dat's headers, opened with :meth:`open`; :meth:`events` reads its events.

    Header facts: ``version`` (6 or 7), ``compression`` ("none", "zstd", "zlib"),
    ``cpus``, ``page_size``, ``clock``, ``uname``, ``cpu_stats`` ({cpu: {"entries": ...,
    "overrun": ..., "commit_overrun": ..., "dropped_events": ..., "read_events": ...}}),
    ``formats`` ({event id: EventFormat}), ``cmdlines`` ({pid: comm}).
    """

    def __init__(self, path, data: bytes):
        self.path, self.data = Path(path), data
        self.version = 0
        self.compression, self.compression_version = "none", ""
        self.endian, self.long_size, self.page_size, self.cpus = "<", 8, 4096, 0
        self.clock, self.uname, self.trace_cmd_version = "", "", ""
        self.cpu_stats: dict[int, dict[str, int]] = {}
        self.formats: dict[int, EventFormat] = {}
        self.cmdlines: dict[int, str] = {}
        self.notes: list[str] = []
        self.ts_offset, self.tsc2nsec = 0, None
        self._cpu_data: list[_CpuData] = []
        self._cpu_compressed = False
        self._layout: _PageLayout | None = None
        self._kallsyms_text = b""
        self._kallsyms: _Kallsyms | None = None
        self._pages: _Pages | None = None
        self._records: _Records | None = None
        self._sections: dict[int, int] = {}  # v7: section kind -> file offset
        self._buffers: list[tuple[int, str, str, bytes]] = []  # v7: (offset, name, clock, rest)

    # -------------------------------------------------------- opening

    @classmethod
    def open(cls, path) -> TraceFile:
        """Read the headers of ``path``; TraceFileError if they are truncated or corrupt,
        TraceError if it cannot be read at all (not a regular file, no permission)."""
        try:
            require_regular_file(Path(path))
            data = Path(path).read_bytes()
        except OSError as err:
            raise TraceError(f"{path}: cannot be read: {err.strerror or err}") from None
        trace = cls(path, data)
        try:
            trace._read_headers()
        except _Damage as damage:
            raise trace._error(damage) from None
        return trace

    def _error(self, damage: _Damage, partial=None) -> TraceFileError:
        return TraceFileError(self.path, damage.offset, damage.what, damage.truncated, partial)

    def _cursor(self, pos: int, end: int | None = None) -> _Cursor:
        return _Cursor(self.data, pos, len(self.data) if end is None else end, self.endian, len(self.data))

    def _read_headers(self) -> None:
        cur = self._cursor(0)
        if not self.data:
            raise _Damage(0, "the file is empty", truncated=True)
        if not self.data.startswith(MAGIC):
            if MAGIC.startswith(self.data):
                raise _Damage(len(self.data), "the file ends inside its magic", truncated=True)
            raise _Damage(0, "not a trace-cmd file (bad magic)")
        cur.pos = len(MAGIC)
        version = cur.cstring("version")
        if version not in ("6", "7"):
            raise _Damage(len(MAGIC), f"file version {version!r}; this reader knows 6 and 7")
        self.version = int(version)
        endian = cur.number(1, "endianness")
        if endian not in (0, 1):
            raise _Damage(cur.pos - 1, f"endianness byte {endian}")
        self.endian = ">" if endian else "<"
        cur.endian = self.endian
        self.long_size = cur.number(1, "long size")
        if self.long_size not in (4, 8):
            raise _Damage(cur.pos - 1, f"long size {self.long_size}")
        self.page_size = cur.number(4, "page size")
        if self.page_size < 64 or self.page_size & (self.page_size - 1):
            raise _Damage(cur.pos - 4, f"page size {self.page_size}")
        if self.version == 6:
            self._read_v6(cur)
        else:
            self._read_v7(cur)
        if self._layout is None:
            raise _Damage(cur.pos, "no header_page/header_event in the file")

    def _read_metadata(self, kind: int, cur: _Cursor) -> None:
        """One metadata block, the same in v6 (in a row) and v7 (one per section)."""
        start = cur.pos
        if kind == OPT_HEADER_INFO:
            cur.expect(b"header_page\0", "header_page")
            page = cur.sized_text(8, "header_page")
            cur.expect(b"header_event\0", "header_event")
            event = cur.sized_text(8, "header_event")
            self._layout = _page_layout(page, event, start)
        elif kind == OPT_FTRACE_EVENTS:
            for _ in range(cur.number(4, "number of ftrace formats")):
                self._add_format(cur, "ftrace")
        elif kind == OPT_EVENT_FORMATS:
            for _ in range(cur.number(4, "number of event systems")):
                system = cur.cstring("event system name")
                for _ in range(cur.number(4, f"number of {system} formats")):
                    self._add_format(cur, system)
        elif kind == OPT_KALLSYMS:
            self._kallsyms_text = cur.sized_text(4, "kallsyms")
        elif kind == OPT_PRINTK:
            cur.sized_text(4, "printk formats")
        elif kind == OPT_CMDLINES:
            self.cmdlines = _parse_cmdlines(cur.sized_text(8, "saved cmdlines"))

    def _add_format(self, cur: _Cursor, system: str) -> None:
        pos = cur.pos
        text = cur.sized_text(8, f"{system} event format")
        try:
            fmt = parse_format(text.decode("utf-8", "replace"), system)
        except ValueError as err:
            raise cur.damage(pos, f"{system} event format: {err}") from None
        self.formats[fmt.id] = fmt

    def _read_v6(self, cur: _Cursor) -> None:
        for kind in (OPT_HEADER_INFO, OPT_FTRACE_EVENTS, OPT_EVENT_FORMATS, OPT_KALLSYMS, OPT_PRINTK,
                     OPT_CMDLINES):
            self._read_metadata(kind, cur)
        self.cpus = cur.number(4, "number of CPUs")
        data_cpus = self.cpus
        kind = cur.take(10, "data kind")
        if kind == b"options  \0":
            self._read_options_v6(cur)
            kind = cur.take(10, "data kind")
        if kind == b"latency  \0":
            raise _Damage(cur.pos - 10, "a latency-tracer file (text, no ring buffer); not supported")
        if kind != b"flyrecord\0":
            raise cur.damage(cur.pos - 10, f"expected 'flyrecord', found {kind!r}")
        for cpu in range(data_cpus):
            offset = cur.number(8, f"CPU {cpu} data offset")
            self._cpu_data.append(_CpuData(cpu, offset, cur.number(8, f"CPU {cpu} data size")))

    def _read_options_v6(self, cur: _Cursor) -> None:
        while True:
            option = cur.number(2, "option id")
            if option == OPT_DONE:
                return
            self._option(option, cur.sized_text(4, f"option {option}"), cur)

    def _read_v7(self, cur: _Cursor) -> None:
        self.compression = cur.cstring("compression name")
        self.compression_version = cur.cstring("compression version")
        if self.compression not in ("none", "zstd", "zlib"):
            raise _Damage(cur.pos, f"compression {self.compression!r}; this reader knows zstd and zlib")
        offset, seen = cur.number(8, "offset of the options"), set()
        while offset:
            if offset in seen:
                raise _Damage(offset, "the options sections loop")
            seen.add(offset)
            if offset >= len(self.data):
                raise _Damage(len(self.data), f"the options section at offset {offset} is missing; v7 writes "
                              "the one that says where the CPU data is after the data", truncated=True)
            section = self._section(offset, OPT_DONE)
            offset = self._read_options_v7(section)
        for kind in (OPT_HEADER_INFO, OPT_FTRACE_EVENTS, OPT_EVENT_FORMATS, OPT_KALLSYMS, OPT_PRINTK,
                     OPT_CMDLINES):
            if kind in self._sections:
                self._read_metadata(kind, self._section(self._sections[kind], kind))
        top = [b for b in self._buffers if b[1] == ""]
        if not top:
            raise _Damage(cur.pos, "no BUFFER option for the top trace instance")
        offset, _, clock, rest = top[0]
        self._read_buffer_option(offset, clock, rest)
        if len(self._buffers) > 1:
            self.notes.append(f"{len(self._buffers) - 1} other trace instance(s) not read")

    def _section(self, offset: int, kind: int) -> _Cursor:
        """A cursor over a v7 section's content, decompressed when it is compressed."""
        head = self._cursor(offset)
        ident = head.number(2, "section id")
        flags = head.number(2, "section flags")
        head.number(4, "section description")
        size = head.number(8, "section size")
        name = SECTION_NAMES.get(kind, f"section {kind}")
        if ident != kind or flags & ~SECTION_COMPRESSED:
            raise _Damage(offset, f"section header: id {ident} flags {flags:#x}, expected {name} (id {kind})")
        start = head.pos
        if kind == OPT_BUFFER:  # the CPU data: its own loader checks it, page by page
            self._cpu_compressed = bool(flags & SECTION_COMPRESSED)
            return self._cursor(start)
        if start + size > len(self.data):
            raise _Damage(len(self.data), f"{name} section at {offset} claims {size} bytes", truncated=True)
        if not flags & SECTION_COMPRESSED:
            return self._cursor(start, start + size)
        csize = head.number(4, "compressed size")
        usize = head.number(4, "uncompressed size")
        if csize > size - 8:
            raise _Damage(offset, f"{name} section: compressed size {csize} > section size {size}")
        data = self._decompress(head.take(csize, f"compressed {name}"), usize, offset, name)
        return _Cursor(data, 0, len(data), self.endian, len(self.data), (offset, f"{name} section"))

    def _decompress(self, blob: bytes, usize: int, offset: int, name: str) -> bytes:
        try:
            if self.compression == "zstd":
                import zstandard

                data = zstandard.ZstdDecompressor().decompress(blob, max_output_size=usize)
            elif self.compression == "zlib":
                data = zlib.decompress(blob)
            else:
                raise ValueError(f"compressed with {self.compression!r}")
        except Exception as err:  # zstd and zlib raise their own error types
            raise _Damage(offset, f"{name} does not decompress ({self.compression}): {err}") from None
        if len(data) != usize:
            raise _Damage(offset, f"{name} decompresses to {len(data)} bytes, not {usize}")
        return data

    def _read_options_v7(self, cur: _Cursor) -> int:
        """The options of one section; returns the offset of the next options section (0: none)."""
        while True:
            option = cur.number(2, "option id")
            data = cur.sized_text(4, f"option {option}")
            if option == OPT_DONE:
                if len(data) != 8:
                    raise cur.damage(cur.pos - len(data), "DONE option is not 8 bytes")
                return struct.unpack(self.endian + "Q", data)[0]
            if option in SECTION_NAMES and option not in (OPT_DONE, OPT_BUFFER) and len(data) >= 8:
                self._sections[option] = struct.unpack_from(self.endian + "Q", data)[0]
            elif option in (OPT_BUFFER, OPT_BUFFER_TEXT):
                text = _Cursor(data, 8, len(data), self.endian, len(self.data), (cur.pos, "BUFFER option"))
                offset = struct.unpack_from(self.endian + "Q", data)[0] if len(data) >= 8 else 0
                name = text.cstring("buffer name")
                self._buffers.append((offset, name, text.cstring("buffer clock") if option == OPT_BUFFER
                                      else "latency", data[text.pos:]))
            else:
                self._option(option, data, cur)

    def _read_buffer_option(self, offset: int, clock: str, rest: bytes) -> None:
        if clock == "latency":
            raise _Damage(offset, "a latency-tracer file (text, no ring buffer); not supported")
        self.clock = clock or self.clock
        cur = _Cursor(rest, 0, len(rest), self.endian, len(self.data), (offset, "BUFFER option"))
        page_size = cur.number(4, "buffer page size")
        if page_size != self.page_size:
            raise cur.damage(0, f"buffer page size {page_size} differs from the file's {self.page_size}")
        for _ in range(cur.number(4, "buffer CPU count")):
            cpu = cur.number(4, "CPU id")
            offset_ = cur.number(8, f"CPU {cpu} data offset")
            self._cpu_data.append(_CpuData(cpu, offset_, cur.number(8, f"CPU {cpu} data size")))
        self._section(offset, OPT_BUFFER)  # checks the section header, learns its compression

    def _option(self, option: int, data: bytes, cur: _Cursor) -> None:
        """One option of the header facts or timestamp corrections (the rest is skipped)."""
        text = data.rstrip(b"\0").decode("utf-8", "replace")
        try:
            self._apply_option(option, data, text)
        except (ValueError, struct.error):
            raise cur.damage(cur.pos - len(data), f"option {option} is malformed: {data[:40]!r}") from None

    def _apply_option(self, option: int, data: bytes, text: str) -> None:
        if option == OPT_CPUSTAT:
            stat = _parse_cpustat(text)
            if stat:
                self.cpu_stats[stat[0]] = stat[1]
        elif option == OPT_UNAME:
            self.uname = text
        elif option == OPT_VERSION:
            self.trace_cmd_version = text
        elif option == OPT_TRACECLOCK:
            match = re.search(r"\[(\S+)\]", text)
            self.clock = match[1] if match else self.clock
        elif option == OPT_CPUCOUNT and len(data) >= 4:
            self.cpus = struct.unpack_from(self.endian + "I", data)[0]
        elif option == OPT_DATE:
            self.ts_offset += int(text, 0) * 1000
        elif option == OPT_OFFSET:
            self.ts_offset += int(text, 0)
        elif option == OPT_TSC2NSEC and len(data) >= 16:
            self.tsc2nsec = struct.unpack_from(self.endian + "II", data)
        elif option == OPT_TIME_SHIFT:
            self.notes.append("TIME_SHIFT (guest/host clock sync) is not applied: timestamps are the guest's")
        elif option == OPT_BUFFER:  # v6: another trace instance
            self.notes.append("a trace instance other than the top one is not read")

    # -------------------------------------------------------- pages

    @property
    def cpu_data(self) -> list[tuple[int, int, int]]:
        """Where each CPU's ring-buffer data lies: (cpu, file offset, size in the file)."""
        return [(c.cpu, c.offset, c.size) for c in self._cpu_data]

    @property
    def sections(self) -> dict[str, int]:
        """v7: the file offset of each metadata section, by name ("kallsyms", ...)."""
        return {SECTION_NAMES[kind]: offset for kind, offset in self._sections.items()}

    @property
    def kallsyms(self) -> _Kallsyms:
        """The file's /proc/kallsyms: ``.text``, and ``.name(addr)`` as trace-cmd prints ``%ps``."""
        if self._kallsyms is None:
            self._kallsyms = _Kallsyms(self._kallsyms_text)
        return self._kallsyms

    def _load_pages(self) -> _Pages:
        if self._pages is None:
            self._pages = _Pages.load(self)
        return self._pages

    def _walked(self) -> _Records:
        if self._records is None:
            self._records = _walk(self._load_pages(), self)
        return self._records

    def lost_events(self) -> dict[int, dict[str, int]]:
        """Per CPU, what the trace is missing, so that it is never silently dropped.

        As ``trace-cmd report --stat`` shows them (the CPU stats saved when recording
        ended): ``overrun`` (events overwritten in the ring buffer before they were
        read), ``commit_overrun``, ``dropped_events`` (refused by a full buffer in
        non-overwrite mode), ``entries`` (events in the kernel buffer when the stats were
        read) and ``read_events``. From the pages: ``missed_pages`` (pages flagged
        "events lost before this page"), ``missed_events`` (the counts stored on them)
        and ``missed_uncounted`` (flagged pages without a count). ``recorded``: the
        CPU's events in the file.

        Derived: ``lost`` = overrun + commit_overrun + dropped_events (or missed_events
        if larger); ``unrecorded``: the entries that are not in the file. trace-cmd
        reads the stats while its recorders still drain the buffers, so entries may or
        may not have been recorded (trace-cmd's note says they are not): the events
        recorded after the stats were read are ``recorded - read_events``.
        """
        pages, records = self._load_pages(), self._walked()
        per_cpu = np.bincount(pages.cpu[records.page], minlength=1) if len(records.page) else np.zeros(1, int)
        out: dict[int, dict[str, int]] = {}
        for cpu in sorted({c.cpu for c in self._cpu_data} | set(self.cpu_stats)):
            stats = self.cpu_stats.get(cpu, {})
            mine = pages.cpu == cpu
            flagged = mine & pages.missed_flag & pages.header_ok
            counted = flagged & (pages.missed >= 0)
            row = {key: stats.get(key, 0) for key in
                   ("overrun", "commit_overrun", "dropped_events", "entries", "read_events")}
            row["missed_pages"] = int(flagged.sum())
            row["missed_events"] = int(pages.missed[counted].sum())
            row["missed_uncounted"] = int((flagged & ~counted).sum())
            row["recorded"] = int(per_cpu[cpu]) if cpu < len(per_cpu) else 0
            in_kernel = row["overrun"] + row["commit_overrun"] + row["dropped_events"]
            row["lost"] = max(in_kernel, row["missed_events"])
            drained = max(0, row["recorded"] - row["read_events"]) if "read_events" in stats else 0
            row["unrecorded"] = max(0, row["entries"] - drained)
            out[cpu] = row
        return out

    def describe_losses(self) -> list[str]:
        """One line per CPU that lost events or left them unrecorded; empty when none did."""
        lines = []
        for cpu, row in self.lost_events().items():
            parts = []
            if row["lost"] or row["missed_uncounted"]:
                more = " and more (a page lost an unknown number)" if row["missed_uncounted"] else ""
                parts.append(f"{row['lost']} events lost in the ring buffer{more}")
            if row["unrecorded"]:
                parts.append(f"{row['unrecorded']} events left in the kernel buffer, not recorded")
            if parts:
                lines.append(f"CPU {cpu}: " + "; ".join(parts))
        return lines

    # -------------------------------------------------------- events

    def events(self, partial: bool = False) -> pd.DataFrame:
        """All events as a DataFrame (see :func:`read_events`)."""
        pages, records = self._load_pages(), self._walked()
        frame = _Frame(self, pages, records).build()
        if records.damage is not None:
            damage = records.damage
            frame.attrs["damage"] = str(self._error(damage))
            frame.attrs["damage_offset"] = damage.offset
            if not partial:
                raise self._error(damage, frame)
        return frame


def read_events(path, partial: bool = False) -> pd.DataFrame:
    """The events of a trace.dat, one row each, in ``trace-cmd report``'s order.

    Columns: ``ts`` (ns, as the file's clock gives, with trace-cmd's DATE/OFFSET/TSC2NSEC
    corrections), ``cpu``, ``pid``, ``comm`` (saved cmdlines; "<idle>" for pid 0, "<...>"
    when unknown, as trace-cmd prints), ``system``, ``event``, then every field of the
    event types present by name (``common_flags``, ``common_preempt_count`` too; NA
    where an event lacks it; integers as Int64, UInt64 when a value needs 64 unsigned
    bits; char arrays as str, other arrays as bytes; a field named like a base column
    gets a ``field_`` prefix), then ``func_name`` for events with a ``func`` field.
    ``df.attrs["missed_events"]`` lists the pages that say events were lost before them.

    A truncated or corrupt file raises TraceFileError (its ``partial`` holds the events
    before the damage); with ``partial=True`` those events are returned instead, with
    ``df.attrs["damage"]`` (the error's message) and ``df.attrs["damage_offset"]``.
    "Before the damage" is per CPU: every event of a CPU whose pages are intact, and a
    damaged CPU's events up to its first damage (its whole pages before it, and the
    whole events of the damaged page before the bad record), in the order the
    undamaged file gives them. So past the time of the damage a damaged CPU's events
    are missing while the others' are not. A v6 file cut inside CPU n's data keeps
    CPUs 0..n-1 whole and CPU n up to the cut (the later CPUs' data came after it). A
    v7 file cut anywhere after its metadata loses the options that locate the CPU data
    (trace-cmd writes them last), so nothing. A file that cannot be read at all (a
    directory) raises TraceError, ``partial`` or not.
    """
    try:
        trace = TraceFile.open(path)
    except TraceFileError as err:
        if not partial:
            raise
        frame = pd.DataFrame({name: [] for name in BASE_COLUMNS})
        frame.attrs.update(damage=str(err), damage_offset=err.offset)
        return frame
    return trace.events(partial=partial)


# ---------------------------------------------------------------- page table


@dataclass
class _Pages:
    """Every CPU's ring-buffer pages, in one byte buffer, as arrays (one entry per page).

    ``pos``: the page's offset in ``buf`` (the file itself when uncompressed; the
    decompressed chunks otherwise); ``file_pos``: where to point at in error messages;
    ``avail``: bytes of the page present (less than a page when the file is cut).
    """

    buf: bytes
    b32: np.ndarray
    cpu: np.ndarray
    pos: np.ndarray
    file_pos: np.ndarray
    avail: np.ndarray
    ts: np.ndarray
    size: np.ndarray
    missed_flag: np.ndarray
    missed: np.ndarray
    header_ok: np.ndarray
    at_eof: np.ndarray
    compressed: bool
    cpu_damage: dict  # cpu -> (page index, _Damage) for data missing from the file
    views: dict = dataclass_field(default_factory=dict)  # (size, endian) -> strided view, for _gather

    @classmethod
    def load(cls, trace: TraceFile) -> _Pages:
        chunks, table, damage = [], [], {}
        total = 0
        for cd in sorted(trace._cpu_data, key=lambda c: c.cpu):
            if trace._cpu_compressed and cd.size:
                pieces, where, bad = _decompress_cpu(trace, cd)
                data = b"".join(pieces)
                base = total
                pad = -len(data) % trace.page_size
                chunks.append(data + b"\0" * pad)
                total += len(data) + pad
                for k in range(len(data) // trace.page_size):
                    table.append((cd.cpu, base + k * trace.page_size, where[k], trace.page_size))
                if bad:
                    damage[cd.cpu] = (len(table), bad)
            else:
                end = min(cd.offset + cd.size, len(trace.data))
                for start in range(cd.offset, cd.offset + cd.size, trace.page_size):
                    if start >= end:
                        break
                    table.append((cd.cpu, start, start, min(trace.page_size, end - start)))
                if cd.offset + cd.size > len(trace.data):
                    have = max(0, len(trace.data) - cd.offset)
                    damage[cd.cpu] = (len(table), _Damage(
                        len(trace.data), f"CPU {cd.cpu} data ends early: {have} of {cd.size} bytes",
                        truncated=True))
        if trace._cpu_compressed:
            buf = b"".join(chunks)
        else:
            buf = trace.data
        arr = np.array(table, dtype=np.int64).reshape(-1, 4)
        cpu, pos, file_pos, avail = (np.ascontiguousarray(arr[:, k]) for k in range(4))
        empty = np.zeros(0, np.int64)
        at_eof = (avail < trace.page_size) & (file_pos + avail >= len(trace.data))
        pages = cls(buf, np.frombuffer(buf, trace.endian + "u4", count=len(buf) // 4), cpu, pos, file_pos,
                    avail, empty, empty, empty, empty, empty, at_eof, trace._cpu_compressed, damage)
        pages._read_headers(trace)
        return pages

    def _read_headers(self, trace: TraceFile) -> None:
        """Page timestamps, commit sizes and missed-events flags and counts, vectorised."""
        layout, long_size = trace._layout, _kernel_long(trace)
        n = len(self.pos)
        capacity = trace.page_size - layout.data_offset
        self.header_ok = self.avail >= layout.data_offset
        safe = np.where(self.header_ok, self.pos, 0)
        self.ts = _gather(self, safe + layout.ts_offset, 8, trace.endian).astype(np.uint64)
        commit = _gather(self, safe + layout.commit_offset, layout.commit_size, trace.endian)
        commit = commit.astype(np.uint64)
        self.size = (commit & np.uint64(COMMIT_MASK)).astype(np.int64)
        self.missed_flag = (commit & np.uint64(MISSED_EVENTS)) != 0
        stored = self.missed_flag & ((commit & np.uint64(MISSED_STORED)) != 0)
        self.missed = np.full(n, -1, np.int64)
        where = safe + layout.data_offset + self.size
        readable = stored & (self.size + long_size <= capacity) & (where + long_size <= self.pos + self.avail)
        if readable.any():
            idx = np.flatnonzero(readable)
            self.missed[idx] = _gather(self, where[idx], long_size, trace.endian).astype(np.int64)

    def describe(self, page: int, at: int) -> int:
        """The file offset for byte ``at`` of the buffer, inside page ``page``."""
        if self.compressed:
            return int(self.file_pos[page])
        return int(self.file_pos[page] + (at - self.pos[page]))


def _kernel_long(trace: TraceFile) -> int:
    """The kernel's long size: the size of the page header's commit field."""
    return trace._layout.commit_size


def _decompress_cpu(trace: TraceFile, cd: _CpuData) -> tuple[list[bytes], list[int], _Damage | None]:
    """A CPU's compressed chunks, decompressed until the first that cannot be read.

    Returns the chunks' data, the file offset of the chunk holding each page, and the
    damage that stopped it (None when all chunks are there).
    """
    # the size trace-cmd records covers the chunks, not the chunk count before them
    end = cd.offset + 4 + cd.size
    cur = trace._cursor(cd.offset, min(end, len(trace.data)))
    pieces, where = [], []
    try:
        count = cur.number(4, f"CPU {cd.cpu} chunk count")
        for k in range(count):
            start = cur.pos
            zsize = cur.number(4, f"CPU {cd.cpu} chunk {k} size")
            usize = cur.number(4, f"CPU {cd.cpu} chunk {k} uncompressed size")
            if usize % trace.page_size:
                raise _Damage(start, f"CPU {cd.cpu} chunk {k}: {usize} bytes is not whole pages")
            blob = cur.take(zsize, f"CPU {cd.cpu} chunk {k} of {count}")
            pieces.append(trace._decompress(blob, usize, start, f"CPU {cd.cpu} chunk {k}"))
            where += [start] * (usize // trace.page_size)
    except _Damage as damage:
        if damage.truncated or end > len(trace.data):
            damage = _Damage(len(trace.data), f"CPU {cd.cpu} data ends early: {damage.what}", truncated=True)
        return pieces, where, damage
    return pieces, where, None


# ---------------------------------------------------------------- the walk


@dataclass
class _Records:
    """The data events found, in CPU order (CPU, then page, then place on the page)."""

    page: np.ndarray
    ts: np.ndarray
    pos: np.ndarray
    size: np.ndarray
    type: np.ndarray
    cpu_cut: dict  # cpu -> index of its first event lost to damage
    damage: _Damage | None
    order: np.ndarray | None = None


def _walk(pages: _Pages, trace: TraceFile) -> _Records:
    """Decode every page's event headers, all pages in lockstep; then check the events.

    A page stops at its commit, or at its first damaged event (its damage is noted).
    Only data events are kept; padding and time events only move the clock.
    """
    walker = _Walker(pages, trace)
    while walker.act.size:
        if not walker.fast_step():
            walker.full_step()
    return _collect(pages, trace, walker)


class _Walker:
    """The lockstep walk's state: per active page, its next event and running time."""

    def __init__(self, pages: _Pages, trace: TraceFile):
        layout = trace._layout
        self.pages, self.capacity = pages, trace.page_size - layout.data_offset
        self.start = pages.pos + layout.data_offset
        self.bad = {}  # page -> (buffer position, message, truncated)
        too_big = pages.header_ok & (pages.size > self.capacity)
        for p in np.flatnonzero(too_big):
            self.bad[int(p)] = (int(pages.pos[p]), f"page header commit size {int(pages.size[p])} is beyond "
                                f"the page ({self.capacity} bytes of data)", False)
        for p in np.flatnonzero(~pages.header_ok):
            self.bad[int(p)] = (int(pages.pos[p]), "page header cut off", True)
        act = np.flatnonzero(pages.header_ok & ~too_big & (pages.size > 0))
        self.act, self.cur, self.end = act, self.start[act], self.start[act] + pages.size[act]
        self.cap_end, self.avail_end = self.start[act] + self.capacity, pages.pos[act] + pages.avail[act]
        self.ts = pages.ts[act].copy()
        self.big_endian = trace.endian == ">"  # type_len is then the top 5 bits
        self.cut_short = bool((self.avail_end < self.cap_end).any())  # pages cut by the end of the file
        self.counts = np.zeros(len(pages.pos), np.int64)
        self.out = ([], [], [], [], [])  # page, ordinal on the page, ts, data position, data size

    def _emit(self, act, ts, pos, size) -> None:
        page, ordinal, ts_, pos_, size_ = self.out
        page.append(act)
        ordinal.append(self.counts[act])
        self.counts[act] += 1
        ts_.append(ts)
        pos_.append(pos)
        size_.append(size)

    def _advance(self, nxt: np.ndarray, keep: np.ndarray) -> None:
        if keep.all():
            self.cur = nxt
        else:
            self.act, self.cur, self.end, self.cap_end, self.avail_end, self.ts = (
                a[keep] for a in (self.act, nxt, self.end, self.cap_end, self.avail_end, self.ts))
            self.cut_short = self.cut_short and bool((self.avail_end < self.cap_end).any())

    def fast_step(self) -> bool:
        """One step when every active page is at a small data event (the common case)."""
        if self.cut_short:
            return False
        head = self.pages.b32[self.cur >> 2]
        type_len, delta = _split_header(head, self.big_endian)
        if ((type_len - 1) > TYPE_DATA_MAX - 1).any():  # 0 wraps around: also not small
            return False
        size = type_len.astype(np.int64) << 2
        nxt = self.cur + 4 + size
        if (nxt > self.end).any():
            return False
        self.ts = self.ts + delta
        self._emit(self.act, self.ts, self.cur + 4, size)
        self._advance(nxt, nxt < self.end)
        return True

    def full_step(self) -> None:
        """One step for any event: data, padding, time extend, time stamp, or damage."""
        act, cur, end, cap_end, avail_end = self.act, self.cur, self.end, self.cap_end, self.avail_end
        b32, last = self.pages.b32, len(self.pages.b32) - 1
        word = cur >> 2
        head = b32[np.minimum(word, last)]
        arg = b32[np.minimum(word + 1, last)].astype(np.int64)
        type_len, delta = _split_header(head, self.big_endian)
        type_len, delta = type_len.astype(np.int64), delta.astype(np.uint64)
        small = (type_len >= 1) & (type_len <= TYPE_DATA_MAX)
        big, pad = type_len == 0, type_len == TYPE_PADDING
        size = np.where(small, type_len * 4, np.where(big, (arg - 4 + 3) & ~3, 0))
        nxt = np.where(small, cur + 4 + size, np.where(big, cur + 8 + size, cur + 8))
        nxt = np.where(pad, cur + 4 + arg, nxt)
        head_in, arg_in = cur + 4 <= avail_end, cur + 8 <= avail_end  # not cut off by the file's end
        # padding the kernel left at the end of a page (null, or no room for its length)
        null_end = pad & head_in & ((cur + 8 > cap_end) | ((delta == 0) & (~arg_in | (nxt > cap_end))))
        # a record that fits its page but whose bytes are missing from the file
        cut = (avail_end < cap_end) & ~null_end & (
            ~head_in | (~small & ~arg_in) | (~pad & (nxt <= end) & (nxt > avail_end)))
        bogus = ~cut & ~null_end & ((big & (arg < 4)) | (~pad & (nxt > end)) | (pad & (nxt > cap_end)))
        bad = cut | bogus
        for k in np.flatnonzero(bad):
            page, offset = int(act[k]), int(cur[k] - self.start[act[k]])
            what = (f"the record at page offset {offset} is cut off" if cut[k] else
                    _event_problem(int(type_len[k]), int(arg[k]), offset, int(nxt[k] - cur[k]),
                                   int(self.pages.size[page])))
            self.bad[page] = (int(cur[k]), what, bool(cut[k]))
        extend = np.where(type_len >= TYPE_TIME_EXTEND, arg.astype(np.uint64) << np.uint64(TS_SHIFT), 0)
        extend = extend.astype(np.uint64)
        stamp = type_len == TYPE_TIME_STAMP
        self.ts = np.where(stamp, (extend + delta) | (self.ts & TS_MSB), self.ts + extend + delta)
        data = (small | big) & ~bad
        if data.any():
            self._emit(act[data], self.ts[data], cur[data] + np.where(small[data], 4, 8), size[data])
        self._advance(nxt, (nxt < end) & ~bad & ~null_end)


def _split_header(head: np.ndarray, big_endian: bool) -> tuple[np.ndarray, np.ndarray]:
    """An event header's (type_len, time_delta): the C bit-fields' order follows the endianness."""
    if big_endian:
        return head >> 27, head & np.uint32((1 << TS_SHIFT) - 1)
    return head & 31, head >> 5


def _event_problem(type_len: int, arg: int, offset: int, length: int, commit: int) -> str:
    if type_len == 0 and arg < 4:
        return f"event at page offset {offset}: type_len 0 with length word {arg}"
    if type_len == TYPE_PADDING:
        return f"padding at page offset {offset} ({length} bytes) runs past the end of the page"
    return (f"event at page offset {offset} (type_len {type_len}, {length} bytes) runs past the page's "
            f"commit ({commit} bytes)")


def _collect(pages: _Pages, trace: TraceFile, walker: _Walker) -> _Records:
    """Put the events found step by step into CPU order, then check them against formats."""
    counts, page_bad = walker.counts, walker.bad
    out_page, out_ord, out_ts, out_pos, out_size = walker.out
    base = np.concatenate(([0], np.cumsum(counts)))
    n = int(base[-1])
    ts, pos, size, page = (np.empty(n, np.uint64), np.empty(n, np.int64), np.empty(n, np.int64),
                           np.empty(n, np.int64))
    if out_page:
        pg = np.concatenate(out_page)
        slot = base[pg] + np.concatenate(out_ord)
        page[slot], ts[slot] = pg, np.concatenate(out_ts)
        pos[slot], size[slot] = np.concatenate(out_pos), np.concatenate(out_size)
    # the first damage of each CPU: the index of its first event to drop
    cuts = {}  # cpu -> (cut index, _Damage)
    for cpu, (p, damage) in pages.cpu_damage.items():
        cuts[cpu] = (int(base[p]), damage)

    def note(cpu: int, index: int, damage: _Damage) -> None:
        if cpu not in cuts or index <= cuts[cpu][0]:
            cuts[cpu] = (index, damage)

    for p in sorted(page_bad):
        at, what, truncated = page_bad[p]
        cpu, truncated = int(pages.cpu[p]), truncated and bool(pages.at_eof[p])
        where = _where(pages, p, at, cpu)
        if truncated:
            damage = _Damage(len(trace.data), f"CPU {cpu} data ends early: {what}", truncated=True)
        else:
            damage = _Damage(pages.describe(p, at), f"{what} ({where})")
        note(cpu, int(base[p] + counts[p]), damage)
    types = _read_types(pages, trace, pos, size)
    for cpu, index, damage in _check_events(pages, trace, page, pos, size, types):
        note(cpu, index, damage)
    first = min(cuts.values(), key=lambda c: c[1].offset)[1] if cuts else None
    records = _Records(page, ts, pos, size, types, {cpu: c[0] for cpu, c in cuts.items()}, first)
    records.order = _order(pages, records)
    return records


def _read_types(pages: _Pages, trace: TraceFile, pos: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Each event's common_type (u16 at the start of its data); -1 for an empty event."""
    values = _gather(pages, pos, 2, trace.endian).astype(np.int64)
    return np.where(size >= 2, values, -1)


def _check_events(pages, trace, page, pos, size, types):
    """Events whose type has no format, or too little data for it, or a dynamic field
    pointing outside it: (cpu, index of the first such event of the CPU, damage)."""
    bad = ~np.isin(types, np.array(sorted(trace.formats), dtype=np.int64))
    for ident in np.unique(types[~bad]):
        fmt = trace.formats[int(ident)]
        idx = np.flatnonzero(types == ident)
        bad[idx] |= size[idx] < fmt.min_size
        for fld in fmt.fields:
            if fld.is_dynamic and fld.size == 4:
                ok = idx[~bad[idx]]
                bad[ok[_dynamic_end(pages, trace, pos[ok], fld) > size[ok]]] = True
    results = []
    for cpu in np.unique(pages.cpu[page[bad]]) if bad.any() else []:
        k = int(np.flatnonzero(bad & (pages.cpu[page] == cpu))[0])
        what = _event_fault(pages, trace, int(types[k]), pos[k:k + 1], int(size[k]))
        p = int(page[k])
        results.append((int(cpu), k, _Damage(pages.describe(p, int(pos[k])),
                                             f"{what} ({_where(pages, p, int(pos[k]), int(cpu))})")))
    return results


def _dynamic_end(pages: _Pages, trace: TraceFile, pos: np.ndarray, fld: FormatField) -> np.ndarray:
    """Where a ``__data_loc``/``__rel_loc`` field's data ends, from the start of each event's data."""
    loc = _gather(pages, pos + fld.offset, 4, trace.endian).astype(np.int64)
    start = loc & 0xFFFF
    if fld.type.startswith("__rel_loc"):
        start = start + fld.offset + fld.size
    return start + (loc >> 16)


def _event_fault(pages: _Pages, trace: TraceFile, ident: int, pos: np.ndarray, size: int) -> str:
    """What is wrong with one event that failed _check_events."""
    fmt = trace.formats.get(ident)
    if fmt is None:
        return f"event of type {ident}, which has no format in the file"
    if size < fmt.min_size:
        return f"{fmt.system}:{fmt.name} event with {size} bytes of data, its format needs {fmt.min_size}"
    names = [f.name for f in fmt.fields if f.is_dynamic and f.size == 4
             and int(_dynamic_end(pages, trace, pos, f)[0]) > size]
    return f"{fmt.system}:{fmt.name} field {names[0] if names else '?'} points outside the event"


def _where(pages: _Pages, page: int, at: int, cpu: int) -> str:
    """Which CPU, and for compressed data where in the chunk (the offset names the chunk)."""
    if pages.compressed:
        return f"byte {at - int(pages.pos[page])} of a page in the chunk at this offset, CPU {cpu}"
    return f"CPU {cpu}"


def _order(pages: _Pages, records: _Records) -> np.ndarray:
    """Indices of the events to show, in trace-cmd's order, each CPU stopping at its damage.

    trace-cmd merges the CPUs by taking the earliest head (lowest CPU on ties); sorting
    stably on each CPU's running maximum timestamp, in CPU order, is the same merge.
    Dropping the tail of one CPU's stream changes no other event's key, so what is
    kept comes in the order the undamaged file would give it.
    """
    n = len(records.ts)
    cpu_of = pages.cpu[records.page] if n else np.zeros(0, np.int64)
    key = records.ts.copy()
    keep = np.ones(n, bool)
    for cpu in sorted(set(pages.cpu.tolist())):
        idx = np.flatnonzero(cpu_of == cpu)
        if len(idx):
            key[idx] = np.maximum.accumulate(records.ts[idx])
    for cpu, cut in records.cpu_cut.items():
        idx = np.flatnonzero(cpu_of == cpu)
        keep[idx[idx >= cut]] = False
    idx = np.flatnonzero(keep)
    return idx[np.argsort(key[idx], kind="stable")]


def _gather(pages: _Pages, pos: np.ndarray, size: int, endian: str) -> np.ndarray:
    """The unsigned ``size``-byte numbers at buffer positions ``pos`` (any alignment).

    A view of the buffer with a one-byte stride reads a number at every byte offset,
    so one fancy index gathers a field of all events of a type.
    """
    key = (size, endian)
    view = pages.views.get(key)
    if view is None:
        count = max(len(pages.buf) - size + 1, 0)
        view = np.ndarray((count,), dtype=f"{endian}u{size}", buffer=pages.buf, strides=(1,))
        pages.views[key] = view
    return view[pos]


# ---------------------------------------------------------------- the frame


class _Frame:
    """Builds the DataFrame from the ordered events: base columns, fields, func_name.

    Work is per event type: the rows of a type, their data positions, then one numpy
    gather per field. Names (comm, system, event, func_name) are Categoricals: a few
    distinct strings over millions of rows.
    """

    def __init__(self, trace: TraceFile, pages: _Pages, records: _Records):
        self.trace, self.pages = trace, pages
        order = records.order
        self.n = len(order)
        self.pos, self.size = records.pos[order], records.size[order]
        self.cpu = pages.cpu[records.page[order]]
        self.ts = self._timestamps(records.ts[order])
        types = records.type[order]
        self.kinds = np.flatnonzero(np.bincount(types, minlength=1)) if self.n else np.zeros(0, np.int64)
        lut = np.zeros(int(self.kinds.max()) + 1 if len(self.kinds) else 1, np.int64)
        lut[self.kinds] = np.arange(len(self.kinds))
        self.code = lut[types] if self.n else np.zeros(0, np.int64)
        self.fmts = [trace.formats[int(k)] for k in self.kinds]
        self.rows = [np.flatnonzero(self.code == k) for k in range(len(self.kinds))]
        self.type_pos = [self.pos[rows] for rows in self.rows]

    def _timestamps(self, raw: np.ndarray) -> np.ndarray:
        """Raw ring-buffer times with trace-cmd's corrections (TSC2NSEC, DATE, OFFSET)."""
        if self.trace.tsc2nsec:
            raw = _mul_shift(raw, *self.trace.tsc2nsec)
        return raw.astype(np.int64) + self.trace.ts_offset

    def build(self) -> pd.DataFrame:
        trace, n = self.trace, self.n
        common = next(iter(trace.formats.values()), None)
        pid_field = common.field("common_pid") if common else None
        pid = self._ints(self.pos, pid_field) if pid_field and n else np.zeros(n, np.int64)
        columns: dict[str, object] = {"ts": self.ts, "cpu": self.cpu, "pid": pid, "comm": self._comms(pid)}
        columns["system"] = _categorical(self.code, [f.system for f in self.fmts])
        columns["event"] = _categorical(self.code, [f.name for f in self.fmts])
        by_first_row = sorted(range(len(self.fmts)), key=lambda k: self.rows[k][0])
        per_name: dict[str, list] = {}
        for k in by_first_row:
            for fld in self.fmts[k].fields:
                if fld.name in HIDDEN_COMMON:
                    continue
                per_name.setdefault(_column_name(fld.name), []).append((k, fld))
        for name, parts in per_name.items():
            columns[name] = self._column(parts)
        funcs = [(k, f.field("func")) for k, f in enumerate(self.fmts) if f.field("func")]
        if funcs:
            columns["func_name"] = self._func_names(funcs)
        frame = pd.DataFrame(columns, copy=False)
        missed = self._missed()
        if missed:
            frame.attrs["missed_events"] = missed
        return frame

    def _missed(self) -> list[dict]:
        """Pages that say events were lost before them: cpu, page timestamp, count (-1: unknown)."""
        pages = self.pages
        return [{"cpu": int(pages.cpu[p]), "page_ts": int(pages.ts[p]), "count": int(pages.missed[p])}
                for p in np.flatnonzero(pages.missed_flag & pages.header_ok)]

    def _comms(self, pid: np.ndarray) -> pd.Categorical:
        uniq = np.unique(pid)
        names = [("<idle>" if p == 0 else self.trace.cmdlines.get(int(p), "<...>")) for p in uniq]
        return _categorical(np.searchsorted(uniq, pid), names)

    def _ints(self, pos: np.ndarray, fld: FormatField) -> np.ndarray:
        """A scalar integer field at event data positions ``pos``: int64, or uint64 for u64."""
        raw = _gather(self.pages, pos + fld.offset, fld.size, self.trace.endian)
        if fld.signed:
            return raw.view(raw.dtype.str.replace("u", "i")).astype(np.int64)
        return raw.astype(np.uint64 if fld.size == 8 else np.int64)

    def _column(self, parts: list) -> object:
        """One field's column over all event types that have it."""
        kinds = {_kind(fld) for _, fld in parts}
        if kinds == {"int"}:
            values = [(self.rows[k], self._ints(self.type_pos[k], fld)) for k, fld in parts]
            return _int_column(self.n, values)
        if kinds == {"str"}:
            codes, index = np.full(self.n, -1, np.int64), {}
            for k, fld in parts:
                blobs = self._blobs(k, fld)
                codes[self.rows[k]] = [index.setdefault(b, len(index)) for b in blobs]
            names = [b.split(b"\0", 1)[0].decode("utf-8", "replace") for b in index]
            return _categorical(codes, names)
        out = np.full(self.n, None, dtype=object)
        for k, fld in parts:
            if _kind(fld) == "int":
                out[self.rows[k]] = self._ints(self.type_pos[k], fld).tolist()
            else:
                blobs = self._blobs(k, fld)
                out[self.rows[k]] = [b.split(b"\0", 1)[0].decode("utf-8", "replace") for b in blobs] \
                    if _kind(fld) == "str" else blobs
        return out

    def _blobs(self, k: int, fld: FormatField) -> list[bytes]:
        """An array field's bytes, per event of type ``k``.

        A ``__data_loc`` field gives (length << 16 | offset) of its data (``__rel_loc``:
        offset from the field's end); an array of size 0 (``char buf[]``) runs to the
        end of the event, as libtraceevent prints it.
        """
        pos, buf = self.type_pos[k], self.pages.buf
        if fld.is_dynamic:
            loc = _gather(self.pages, pos + fld.offset, 4, self.trace.endian).astype(np.int64)
            starts = pos + (loc & 0xFFFF)
            if fld.type.startswith("__rel_loc"):
                starts = starts + fld.offset + fld.size
            ends = starts + (loc >> 16)
        elif fld.size == 0:
            starts, ends = pos + fld.offset, pos + self.size[self.rows[k]]
        else:
            starts = pos + fld.offset
            ends = starts + fld.size
        return [buf[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]

    def _func_names(self, funcs: list) -> pd.Categorical:
        """``func`` resolved through kallsyms, as trace-cmd prints it for ``%ps``."""
        syms, long_size = self.trace.kallsyms, self.trace.long_size
        codes, names, index = np.full(self.n, -1, np.int64), [], {}
        for k, fld in funcs:
            values = self._ints(self.type_pos[k], fld).astype(np.uint64)
            uniq = np.unique(values)
            local = np.array([index.setdefault(syms.name(int(v), long_size), len(index)) for v in uniq])
            codes[self.rows[k]] = local[np.searchsorted(uniq, values)]
        names = sorted(index, key=index.get)
        return pd.Categorical.from_codes(codes, categories=pd.Index(names, dtype=object))


def _column_name(name: str) -> str:
    """A field's column: its name, with ``field_`` before names the frame uses itself."""
    return f"field_{name}" if name in BASE_COLUMNS or name == "func_name" else name


def _mul_shift(ts: np.ndarray, mult: int, shift: int) -> np.ndarray:
    """(ts * mult) >> shift without losing the product's high bits, as mul_u64_u32_shr()."""
    if shift > 32:
        return np.array([(int(t) * mult >> shift) & ((1 << 64) - 1) for t in ts], dtype=np.uint64)
    hi, lo = ts >> np.uint64(32), ts & np.uint64(0xFFFFFFFF)
    mult_ = np.uint64(mult)
    return ((hi * mult_) << np.uint64(32 - shift)) + ((lo * mult_) >> np.uint64(shift))


def _kind(fld: FormatField) -> str:
    """How a field becomes a column: "int", "str" (char arrays) or "bytes" (other arrays)."""
    if fld.is_array or fld.is_dynamic or fld.size not in (1, 2, 4, 8):
        return "str" if fld.is_text else "bytes"
    return "int"


def _categorical(codes: np.ndarray, names: list[str]) -> pd.Categorical:
    """Strings by code; equal names (two pids, one comm) share a category."""
    index: dict[str, int] = {}
    remap = np.array([index.setdefault(name, len(index)) for name in names] + [-1], dtype=np.int64)
    return pd.Categorical.from_codes(remap[codes], categories=pd.Index(list(index), dtype=object))


def _int_column(n: int, values: list) -> object:
    """Int64 (nullable) for fields that fit, UInt64 for u64 values past 2**63, else objects."""
    big = any(v.dtype == np.uint64 and (v >= np.uint64(1 << 63)).any() for _, v in values)
    negative = any(v.dtype == np.int64 and (v < 0).any() for _, v in values)
    if big and negative:
        out = np.full(n, None, dtype=object)
        for rows, v in values:
            out[rows] = v.tolist()
        return out
    data, mask = np.zeros(n, np.uint64 if big else np.int64), np.ones(n, bool)
    for rows, v in values:
        data[rows] = v if big else v.view(np.int64)
        mask[rows] = False
    return pd.arrays.IntegerArray(data, mask)
