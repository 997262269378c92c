"""Summarize a py-spy collapsed-stack file (``bench/data.py --profile DIR``): the functions
with the most samples, inclusive (anywhere on the stack) and exclusive (on top).

    .venv/bin/python bench/profile.py DIR/get-shared.txt [--top 30] [--match vibed]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--match", default="", help="only frames whose text contains this")
    args = parser.parse_args()
    inclusive: Counter[str] = Counter()
    exclusive: Counter[str] = Counter()
    total = idle = 0
    for line in Path(args.file).read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        if any("epoll" in f or "select" in f and "(selectors" in f for f in frames[-1:]):
            idle += count
        for frame in set(frames):
            if args.match in frame:
                inclusive[frame] += count
        if args.match in frames[-1]:
            exclusive[frames[-1]] += count
    print(f"{total} samples, {idle} idle in the poller ({100 * idle / max(total, 1):.0f} %)")
    print("inclusive:")
    for frame, count in inclusive.most_common(args.top):
        print(f"  {100 * count / max(total, 1):5.1f} %  {frame}")
    print("exclusive:")
    for frame, count in exclusive.most_common(args.top):
        print(f"  {100 * count / max(total, 1):5.1f} %  {frame}")


if __name__ == "__main__":
    main()
