"""Seeded random .wslconfig files made of the fragments users (and the issue 15 fuzz) produce: every
edit either leaves the file untouched with an error, or WSL's parser reads our values from the result,
every other setting as before, and every old byte outside the replaced values still there, in order."""
from __future__ import annotations

import codecs
import random

import pytest

from wsl import wslconfig
from wsl import wslconfig_parser as parser

FRAGMENTS = [
    "[wsl2]", "[WSL2]", "[ wsl2 ]", "[wsl2] ; c", "[wsl2]  # c", "[boot]", "[experimental]", "[wsl2 ]", "[wsl2",
    "memory=4GB", "memory = 6GB  # was", "memory=4GB#x", "memory=12GB ; was", "Memory=4gb", "memory=", 'memory="8GB"',
    "swap=2GB", "swap=0", "processors=2", "processors=0x2", "localhostForwarding=true", "kernel=C:\\\\k",
    "kernel=C:\\Users", 'k="open', "my_key=1", "; semi", "# comment", "# a\u2028b", "#\x0c\x1c\x85", "", "   ",
    "\t memory=5GB", "x=a\\", "memory=4\\", "nokey", "=5", "\ufeffx=1", "memory=4GB\u2028swap=1GB", "v=\u00e9\u00e8",
]
ENDINGS = ["\n", "\r\n", "\r", "\n", "\r\n"]
ENCODINGS = [("utf-8", b""), ("utf-8", codecs.BOM_UTF8), ("utf-16-le", codecs.BOM_UTF16_LE)]


def random_case(rng: random.Random) -> tuple[str, dict[str, str], str, bytes]:
    parts = []
    for _ in range(rng.randint(0, 8)):
        parts += [rng.choice(FRAGMENTS), rng.choice(ENDINGS) if rng.random() > 0.05 else "\x1a"]
    if parts and rng.random() < 0.3:
        parts.pop()  # no newline at the end
    values = {"memory": rng.choice(["12GB", "4GB", "6144MB"])}
    if rng.random() < 0.5:
        values["swap"] = rng.choice(["8GB", "2GB", "0"])
    if rng.random() < 0.3:
        values["processors"] = rng.choice(["4", "2"])
    return "".join(parts), values, *rng.choice(ENCODINGS)


def kept_pieces(reading: parser.Reading, replaced: list[tuple[int, int]]) -> list[str]:
    """The old text minus the replaced values, cut where lines may be added (after items, at the end)."""
    text = reading.text
    cuts = {a.end for a in reading.assignments} | {h.end for h in reading.headers} | {reading.end}
    pieces, at = [], 0
    for start, end in sorted(replaced) + [(len(text), len(text))]:
        for cut in sorted(c for c in cuts if at < c < start):
            pieces.append(text[at:cut])
            at = cut
        pieces.append(text[at:start])
        at = end
    return [p for p in pieces if p]


def settings(reading: parser.Reading) -> dict[str, str]:
    out: dict[str, str] = {}
    for a in reading.assignments:
        out.setdefault(a.key.lower(), a.value)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_random_files_edit_as_wsl_reads_or_stay_untouched(tmp_path, seed):
    rng = random.Random(seed)
    refused = 0
    for i in range(150):
        text, values, encoding, bom = random_case(rng)
        path = tmp_path / f"{i}.wslconfig"
        data = bom + text.encode(encoding)
        path.write_bytes(data)
        try:
            wslconfig.apply(path, values)
        except wslconfig.WslConfigError:
            refused += 1
            assert path.read_bytes() == data
            continue
        old, new = parser.read(parser.decode(data)[0]), parser.read(parser.decode(path.read_bytes())[0])
        assert path.read_bytes().startswith(bom)
        before, after = settings(old), settings(new)
        for key, value in values.items():
            assert wslconfig._same_value(key, after.get(f"wsl2.{key}", ""), value), (text, new.text)
        assert all(after[k] == v for k, v in before.items() if k.partition(".")[2] not in values or not k.startswith("wsl2."))
        replaced = [old.first(f"wsl2.{k}").value_span for k in values if old.first(f"wsl2.{k}")]
        at = 0
        for piece in kept_pieces(old, replaced):
            found = new.text.find(piece, at)
            assert found >= 0, (text, new.text, piece)
            at = found + len(piece)
    assert refused < 15  # refusing is for the rare file WSL would read differently after any addition
