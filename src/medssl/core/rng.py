"""Explicit random generators: every draw of the core comes from one of these, never from process-wide state."""
from __future__ import annotations

import hashlib

import torch


def seed_of(*identity) -> int:
    """A stable 63-bit seed from what is being computed, e.g. seed_of("cell", init, regime, fraction, seed)."""
    digest = hashlib.sha256(repr(identity).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))
