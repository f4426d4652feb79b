"""Canonical Huffman coding of small non-negative integer symbols (Deep Compression's last stage).

The code is built with :mod:`heapq` from symbol counts; it is made canonical (codes assigned in order of
(length, symbol)) so that a stored table of code lengths alone rebuilds it. Bit strings are packed
most-significant bit first; the number of symbols is stored beside the payload, so the zero padding of the
last byte is never decoded.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def code_lengths(counts: Mapping[int, int]) -> dict[int, int]:
    """Huffman code length of each symbol with a positive count (a lone symbol gets length 1)."""
    counts = {s: c for s, c in counts.items() if c > 0}
    if not counts:
        return {}
    if len(counts) == 1:
        return dict.fromkeys(counts, 1)
    # (count, tie-break, symbols in the subtree); merging two subtrees deepens each of their symbols by one
    heap = [(c, s, [s]) for s, c in sorted(counts.items())]
    heapq.heapify(heap)
    lengths = dict.fromkeys(counts, 0)
    while len(heap) > 1:
        c1, t1, s1 = heapq.heappop(heap)
        c2, t2, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, min(t1, t2), s1 + s2))
    return lengths


def canonical_code(lengths: Mapping[int, int]) -> dict[int, str]:
    """Canonical codewords ('0'/'1' strings) from code lengths: sorted by (length, symbol), each code is the
    previous plus one, shifted left when the length grows."""
    code, value, previous = {}, 0, 0
    for symbol, length in sorted(lengths.items(), key=lambda item: (item[1], item[0])):
        value <<= length - previous
        code[symbol] = format(value, f"0{length}b")
        value, previous = value + 1, length
    return code


def huffman_encode(symbols: Sequence[int] | np.ndarray) -> tuple[bytes, dict[int, int]]:
    """Encode a sequence of non-negative ints; returns (payload bytes, {symbol: code length})."""
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    if symbols.size and symbols.min() < 0:
        raise ValueError(f"Huffman symbols must be non-negative integers, got {int(symbols.min())}")
    lengths = code_lengths(Counter(symbols.tolist()))
    code = canonical_code(lengths)
    bits = "".join(code[s] for s in symbols.tolist())
    return pack_bits(bits), lengths


def huffman_decode(payload: bytes, lengths: Mapping[int, int], count: int) -> np.ndarray:
    """Decode ``count`` symbols from ``payload`` with the canonical code of ``lengths``; int64 array."""
    decode = {word: symbol for symbol, word in canonical_code(lengths).items()}
    bits = unpack_bits(payload)
    out = np.empty(count, dtype=np.int64)
    word, n = "", 0
    for bit in bits:
        if n == count:
            break
        word += bit
        if word in decode:
            out[n], word, n = decode[word], "", n + 1
    if n != count:
        raise ValueError(f"Huffman payload ended after {n} of {count} symbols: corrupt data or wrong code table")
    return out


def encoded_bits(symbols: Iterable[int]) -> int:
    """Length in bits of the Huffman coding of ``symbols`` (without building the bit string)."""
    counts = Counter(symbols)
    lengths = code_lengths(counts)
    return sum(counts[s] * n for s, n in lengths.items())


def pack_bits(bits: str) -> bytes:
    """'0'/'1' string → bytes, most-significant bit first, the last byte zero-padded."""
    if not bits:
        return b""
    array = np.frombuffer(bits.encode("ascii"), dtype=np.uint8) - ord("0")
    return np.packbits(array).tobytes()


def unpack_bits(payload: bytes) -> str:
    """Inverse of :func:`pack_bits` (with the padding bits of the last byte)."""
    array = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))
    return (array + ord("0")).tobytes().decode("ascii")
