"""Proof of work, hashcash style: find a counter such that SHA-256(nonce ":" counter) starts with
``bits`` zero bits. Expected cost 2^bits hashes; checking a solution costs one.

A request whose queries need proof of work gets one puzzle for all of them: solving puzzles of b_1 ..
b_n bits one after another costs sum 2^b_i hashes, so the request's puzzle has
``combined_bits = ceil(log2(sum 2^b_i))`` bits: the same expected work in one round trip.
"""

from __future__ import annotations

import hashlib
import math
import secrets

import numpy as np

MAX_BITS = 40  # 2^40 hashes: far beyond anything a simulation should ask


def new_nonce() -> str:
    return secrets.token_hex(16)


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def digest(nonce: str, counter: int) -> bytes:
    return hashlib.sha256(f"{nonce}:{counter}".encode()).digest()


def verify(nonce: str, bits: int, counter) -> bool:
    """Whether ``counter`` solves the puzzle; any malformed counter is simply wrong."""
    if isinstance(counter, bool) or not isinstance(counter, int) or counter < 0:
        return False
    return leading_zero_bits(digest(nonce, counter)) >= bits


def solve(nonce: str, bits: int) -> tuple[int, int]:
    """The first counter that solves the puzzle, and the hashes tried to find it."""
    if not 0 <= bits <= MAX_BITS:
        raise ValueError(f"proof-of-work bits must be in [0, {MAX_BITS}], got {bits}")
    base = hashlib.sha256(f"{nonce}:".encode())
    limit = 1 << (256 - bits)  # a digest below this has at least `bits` leading zeros
    counter = 0
    while True:
        h = base.copy()
        h.update(str(counter).encode())
        if int.from_bytes(h.digest(), "big") < limit:
            return counter, counter + 1
        counter += 1


def combined_bits(bits: np.ndarray) -> int:
    """One puzzle's bits for the total work of puzzles of ``bits`` each (0 if there are none)."""
    bits = np.asarray(bits, np.int64)
    bits = bits[bits > 0]
    if not len(bits):
        return 0
    return min(MAX_BITS, math.ceil(math.log2(float(np.sum(np.exp2(bits))))))
