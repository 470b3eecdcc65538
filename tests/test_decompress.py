"""The decompression of .jsonl.gz / .jsonl.zst (readers: gunzip, unzstd, in_background): the fast library gives
exactly the standard library's bytes, and a cut or corrupt stream still raises, after the text before the damage."""

from __future__ import annotations

import gzip
import io
import random
import struct
import threading
import zlib

import pytest

from keizoku.data import readers

DAMAGE = (EOFError, OSError, zlib.error)  # what JsonlReader._line_chunks reports as a truncated input


def _text(n_lines: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    return b"".join(b'{"text": "%d %s"}\n' % (i, rng.randbytes(rng.randint(0, 120)).hex().encode())
                    for i in range(n_lines))


TEXT = _text(12_000)  # ~1.5 MB: several 64 KiB reads and 1 MiB hand-overs
HALF = len(TEXT) // 2


def _header_with_every_flag(body: bytes) -> bytes:
    """One gzip member whose header has FTEXT, FHCRC, FEXTRA, FNAME and FCOMMENT (the gzip module writes none)."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    header = b"\x1f\x8b\x08" + bytes([1 | 2 | 4 | 8 | 16]) + b"\0\0\0\0\0\xff" + struct.pack("<H", 3) + b"abc"
    header += b"name.jsonl\0comment\0"
    header += struct.pack("<H", zlib.crc32(header) & 0xFFFF)
    return header + c.compress(body) + c.flush() + struct.pack("<II", zlib.crc32(body), len(body) & 0xFFFFFFFF)


GOOD_GZIP = {
    "one member": gzip.compress(TEXT),
    "members": gzip.compress(TEXT[:HALF]) + gzip.compress(TEXT[HALF:]),
    "empty members": (gzip.compress(b"") + gzip.compress(TEXT[:1000]) + gzip.compress(b"") * 2
                      + gzip.compress(TEXT[1000:]) + gzip.compress(b"")),
    "only empty members": gzip.compress(b"") * 3,
    "0 bytes": b"",
    "zero padding": gzip.compress(TEXT[:HALF]) + b"\0" * 10 + gzip.compress(TEXT[HALF:]) + b"\0" * 100,
    "header flags": _header_with_every_flag(TEXT[:5000]) + gzip.compress(TEXT[5000:]),
}


def _flipped(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x55
    return bytes(b)


_TWO = gzip.compress(TEXT[:HALF]) + gzip.compress(TEXT[HALF:])
BAD_GZIP = {
    **{f"cut at {n}": _TWO[:n] for n in (1, 5, 20, 3000, len(_TWO) // 3, len(_TWO) // 2 + 7, len(_TWO) - 4)},
    "bad CRC": _flipped(_TWO, len(_TWO) - 6),
    "bad length": _flipped(_TWO, len(_TWO) - 2),
    "bad data, mid-member": _flipped(_TWO, len(_TWO) // 4),
    "bad data, early": _flipped(_TWO, 200),
    "garbage after a member": _TWO + b"garbage",
    "not gzip": b"hello, world\n",
}


def _drain(blocks) -> tuple[bytes, BaseException | None]:
    out = []
    try:
        for block in blocks:
            out.append(block)
    except Exception as e:  # noqa: BLE001
        return b"".join(out), e
    return b"".join(out), None


@pytest.mark.parametrize("name", GOOD_GZIP)
def test_gzip_gives_the_standard_librarys_bytes(name):
    data = GOOD_GZIP[name]
    expected = gzip.GzipFile(fileobj=io.BytesIO(data)).read()
    for blocks in (readers.gunzip(io.BytesIO(data)), readers.gunzip(io.BytesIO(data), stdlib=True),
                   readers.GzipJsonlReader("x.jsonl.gz").decompressed(io.BytesIO(data))):
        out, err = _drain(blocks)
        assert err is None and out == expected


@pytest.mark.parametrize("name", BAD_GZIP)
def test_damaged_gzip_raises_after_the_same_text(name):
    """Whichever library inflates, a cut or corrupt stream raises one of the errors the reader reports as damage,
    after exactly the text the gzip module gives before raising (of a cut stream: a prefix of the whole; a
    corrupt one may decode to other bytes before its CRC tells)."""
    data = BAD_GZIP[name]
    ref, ref_err = _drain(readers.gunzip(io.BytesIO(data), stdlib=True))
    assert isinstance(ref_err, DAMAGE)
    for blocks in (readers.gunzip(io.BytesIO(data)),
                   readers.GzipJsonlReader("x.jsonl.gz").decompressed(io.BytesIO(data))):
        out, err = _drain(blocks)
        assert isinstance(err, DAMAGE), (name, err)
        assert out == ref, (name, len(out), len(ref))
        assert TEXT.startswith(out) or not name.startswith("cut"), name


def test_cut_gzip_keeps_the_whole_lines_before_the_cut(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(_TWO[: len(_TWO) * 3 // 4])
    chunks = list(readers.open_reader(path, ["text"], chunk_bytes=1 << 18))
    assert [c.truncated is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    kept = b"".join(c.read() for c in chunks)
    assert kept.endswith(b"\n") and TEXT.startswith(kept) and HALF < len(kept) < len(TEXT)
    assert "gzip stream cut or corrupt" in chunks[-1].truncated


def test_decompressor_names_the_library():
    try:
        import isal
    except ImportError:
        assert readers.decompressor("gzip") == f"zlib {zlib.ZLIB_RUNTIME_VERSION}"
    else:
        assert readers.decompressor("gzip") == f"isal {isal.__version__}"
    assert readers.decompressor("zstd").startswith("zstandard ")


# --- zstd ----------------------------------------------------------------------------------------------------------

def _zstd_frames(*parts: bytes) -> bytes:
    import zstandard

    c = zstandard.ZstdCompressor()
    return b"".join(c.compress(p) for p in parts)


def test_zstd_frames_give_the_whole_text():
    for data, expected in [(_zstd_frames(TEXT), TEXT),
                           (_zstd_frames(b"", TEXT[:HALF], b"", TEXT[HALF:], b""), TEXT),
                           (_zstd_frames(b""), b""), (b"", b"")]:
        out, err = _drain(readers.ZstdJsonlReader("x.jsonl.zst").decompressed(io.BytesIO(data)))
        assert err is None and out == expected


def test_damaged_zstd_raises_after_a_prefix():
    two = _zstd_frames(TEXT[:HALF], TEXT[HALF:])
    for data, kind in [(two[: len(two) // 3], EOFError), (two[: len(two) - 3], EOFError),
                       (two + b"garbage", OSError), (_flipped(two, 2), OSError)]:
        out, err = _drain(readers.ZstdJsonlReader("x.jsonl.zst").decompressed(io.BytesIO(data)))
        assert isinstance(err, kind) and TEXT.startswith(out), (len(data), err)
    out, _ = _drain(readers.unzstd(io.BytesIO(two[: len(two) * 3 // 4])))
    assert len(out) > HALF  # the first frame's text, and what the cut second frame gave, are kept


# --- the decompressing thread --------------------------------------------------------------------------------------

def test_background_thread_hands_over_in_order_and_raises_last():
    def blocks():
        for i in range(100):
            yield bytes([i]) * 50_000
        raise EOFError("cut")

    out, err = _drain(readers.in_background(blocks(), size=120_000, ahead=2))
    assert isinstance(err, EOFError) and str(err) == "cut"
    assert out == b"".join(bytes([i]) * 50_000 for i in range(100))


def test_background_thread_stops_when_the_reader_stops():
    closed = threading.Event()

    def endless():
        try:
            while True:
                yield b"x" * 1000
        finally:
            closed.set()

    before = set(threading.enumerate())
    it = readers.in_background(endless(), size=4000, ahead=2)
    assert next(it) == b"x" * 4000
    ours = [t for t in threading.enumerate() if t not in before]  # (other tests' threads may come and go meanwhile)
    assert ours
    it.close()  # what the reader's generator does when its caller stops early
    assert closed.is_set() and not any(t.is_alive() for t in ours)
