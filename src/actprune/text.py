"""Real text that every machine with Python has: the standard library's own source, as bytes.

The corpus is every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (site-packages left
out), in sorted path order, each followed by a NUL byte. The held-out split is fixed by file, not
by position: a file is validation text when the CRC-32 of its path relative to the library folder
is 0 modulo 20 (about 5 % of the files), so no validation window overlaps a training file. The
same Python version gives the same bytes everywhere; another version's library differs a little
(the summary records the version and the byte counts).
"""

from __future__ import annotations

import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 256  # bytes


@dataclass
class Corpus:
    """Training and validation bytes (uint8 tensors) and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    source: str

    def windows(self, split: str, starts: torch.Tensor, length: int) -> torch.Tensor:
        """int64 [len(starts), length]: the windows of ``split`` beginning at ``starts``."""
        data = self.train if split == "train" else self.val
        index = starts.view(-1, 1) + torch.arange(length).view(1, -1)
        return data[index].long()

    def random_starts(self, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """n random window starts in the training bytes, drawn from ``generator``."""
        return torch.randint(0, self.train.numel() - length, (n,), generator=generator)

    def fixed_starts(self, n: int, length: int) -> torch.Tensor:
        """n evenly spaced window starts over the validation bytes: the same every evaluation."""
        return torch.linspace(0, self.val.numel() - length - 1, n).long()


def python_stdlib_corpus(root: Path | None = None) -> Corpus:
    """The standard library's source as a byte corpus with its fixed held-out split.

    Args:
        root: the library folder (default: this interpreter's).

    Returns:
        The ``Corpus``.

    Example:
        >>> from actprune.text import python_stdlib_corpus
        >>> corpus = python_stdlib_corpus()
        >>> corpus.train.numel() > 10 * corpus.val.numel() > 0
        True
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts)
    )
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    for path in files:
        held_out = zlib.crc32(str(path.relative_to(root)).encode()) % 20 == 0
        parts[held_out] += [path.read_bytes(), b"\0"]
    train, val = (b"".join(parts[k]) for k in (False, True))
    if not train or not val:
        raise FileNotFoundError(f"no Python source files under {root}")
    version = ".".join(map(str, sys.version_info[:3]))
    source = (f"Python {version} standard library at {root}: {len(files)} files, "
              f"{len(train)} training and {len(val)} validation bytes")  # fmt: skip
    return Corpus(_bytes(train), _bytes(val), source)


def _bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
