"""Extract Jane Austen's six novels from Debian's r-cran-janeaustenr as plain text.

Provenance: the Debian package r-cran-janeaustenr (R package janeaustenr by Julia
Silge, texts from Project Gutenberg, public domain) stores each novel as an R
character vector (one element per line) in a lazy-load database. We read that
database without R: the .rdx index (gzip + R serialization) gives the offset and
length of each object in the .rdb file, and each object is a 4-byte length
followed by a zlib stream of R's XDR serialization, parsed with the `rdata`
package. Run once; the output is committed under dsf_runtime/corpus/.

    apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb x
    pip install rdata
    python scripts/extract_austen.py x/usr/lib/R/site-library/janeaustenr/data dsf_runtime/corpus
"""

from __future__ import annotations

import argparse
import gzip
import zlib
from pathlib import Path

import rdata  # dev-time only: not a dependency of the package


def _parse(blob: bytes):
    return rdata.conversion.convert(rdata.parser.parse_data(blob))


def extract(data_dir: Path, out_dir: Path) -> list[Path]:
    """Write one UTF-8 text file per novel; return the written paths."""
    index = _parse(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (offset, length) in index["variables"].items():
        record = rdb[int(offset) : int(offset) + int(length)]
        lines = _parse(zlib.decompress(record[4:]))
        text = "\n".join("" if line is None else str(line) for line in lines) + "\n"
        path = out_dir / f"{name}.txt"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    for path in extract(args.data_dir, args.out_dir):
        print(path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
