"""Generate the bundled dataset (``data/bundled``) deterministically.

    python scripts/make_bundled_data.py                 # rewrite data/bundled
    python scripts/make_bundled_data.py --out /tmp/big --captions-per-shard 5000 --shards 8

The same seed and sizes give the same files (same captions, documents, text and tokenizer; the
image bytes depend only on the Pillow/libjpeg build). See ``mm1_moe/data/bundled.py`` for what
the data contains and why it is learnable.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mm1_moe.data.bundled import generate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "data", "bundled"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--captions-per-shard", type=int, default=128)
    parser.add_argument("--docs-per-shard", type=int, default=24)
    parser.add_argument("--text-docs", type=int, default=300)
    args = parser.parse_args()
    sizes = generate(args.out, seed=args.seed, captions_per_shard=args.captions_per_shard,
                     docs_per_shard=args.docs_per_shard, text_docs=args.text_docs,
                     shards=args.shards)
    for name, size in sizes.items():
        print(f"{size:>10,}  {name}")
    print(f"{sum(sizes.values()):>10,}  total in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
