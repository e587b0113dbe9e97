"""How far re-encoded copies and different pictures lie in pHash distance: the audit's threshold.

For every image of a dataset, the 64-bit pHash of the file (:func:`rsitr.data.audit.perceptual_hash`)
is compared with the pHash of re-encoded copies (resized, then saved as JPEG), and all pairs of
*different* files are compared with each other. ``rsitr data audit --threshold`` should sit above
what the copies reach and below the closest different pictures.

    python benchmarks/phash_threshold.py DATA/ucm_captions [--threshold 6]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time

import numpy as np
from PIL import Image

from rsitr.data import load_dataset
from rsitr.data.audit import perceptual_hash, popcount
from rsitr.data.images import to_rgb
from rsitr.progress import progress_bar

#: (scale, JPEG quality) of the re-encoded copies.
COPIES = ((0.75, 75), (0.9, 75), (1.0, 90), (0.5, 50))


def reencoded(data: bytes, scale: float, quality: int) -> bytes:
    """``data`` resized by ``scale`` (bilinear) and saved as JPEG at ``quality``."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = to_rgb(img)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    out = io.BytesIO()
    rgb.resize(size, Image.BILINEAR).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--threshold", type=int, default=6)
    args = parser.parse_args()
    started = time.perf_counter()
    dataset = load_dataset(args.dataset)
    hashes, digests = [], []
    copy_distances: dict[tuple[float, int], list[int]] = {copy: [] for copy in COPIES}
    for i in progress_bar(range(dataset.num_images), desc="hashing", unit="img"):
        data = dataset.image_path(i).read_bytes()
        value = perceptual_hash(data)
        hashes.append(value)
        digests.append(hashlib.sha256(data).digest())
        for scale, quality in COPIES:
            copy_distances[(scale, quality)].append(bin(value ^ perceptual_hash(reencoded(data, scale, quality))).count("1"))
    print(f"{dataset.name}: {dataset.num_images} images")
    print("| copy | within the threshold | at distance 0 | largest distance |")
    print("|---|---|---|---|")
    for (scale, quality), values in copy_distances.items():
        d = np.array(values)
        print(f"| {scale:.0%} size, JPEG quality {quality} | {int((d <= args.threshold).sum())} | {int((d == 0).sum())} | {d.max()} |")
    h = np.array(hashes, dtype=np.uint64)
    rows, cols = np.triu_indices(len(h), k=1)
    distance = popcount(h[rows] ^ h[cols]).astype(np.int64)
    same_file = np.array([digests[a] == digests[b] for a, b in zip(rows[distance == 0], cols[distance == 0], strict=True)])
    different = np.ones(len(distance), dtype=bool)
    different[np.flatnonzero(distance == 0)[same_file]] = False
    order = np.argsort(distance[different], kind="stable")[:4]
    closest = [(dataset.image_files[rows[different][k]], dataset.image_files[cols[different][k]],
                int(distance[different][k])) for k in order]
    print(f"{len(distance):,} pairs, {int((~different).sum())} of identical files; closest different pictures: "
          + ", ".join(f"{a} ~ {b} at {d}" for a, b, d in closest))
    print(f"{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
