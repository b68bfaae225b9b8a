"""Summarize a py-spy ``--format raw`` profile (collapsed stacks): the top frames by own time
and by inclusive time, as a share of all samples (docs/scale.md keeps these summaries).

    py-spy record --pid PID --duration 30 --format raw -o cp.txt
    python -m bench.swarm.profile cp.txt [--top 15]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^:]+):\d+\)$")


def _name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "src/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path})"


def summarize(text: str, top: int) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_name(f) for f in stack.split(";") if f]
        # py-spy's first frame is the thread ("process 123:\"python\"", "thread (0x...)").
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total} samples", "", "own time:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    # Inclusive time of opsplane's own functions: where the work comes from.
    ours = Counter(
        {f: n for f, n in inclusive.items() if "(opsplane/" in f and "(opsplane/cli/" not in f}
    )
    ours.pop("<module> (opsplane/__main__.py)", None)
    lines += ["", "inclusive time (opsplane's functions):"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in ours.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    print(summarize(args.profile.read_text(), args.top))


if __name__ == "__main__":
    main()
