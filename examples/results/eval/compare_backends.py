"""Compare two `pudding eval` outputs of the same bundle and questions (e.g. --backend mlx and
--backend torch): per task and method, both scores, their difference in points, and on how many
questions the two agree about right or wrong.

Usage: python compare_backends.py OUT_A OUT_B"""

import json
import sys
from pathlib import Path


def main(a: Path, b: Path) -> None:
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    print(f"A: {a} ({ra['backend']})\nB: {b} ({rb['backend']})")
    print(f"{'task':<14}{'method':<28}{'A %':>8}{'B %':>8}{'A-B':>8}  same right/wrong")
    agree = total = 0
    for task, ta in ra["tasks"].items():
        tb = rb["tasks"][task]
        right_b = {q["qid"]: q["correct"] for q in tb["questions"]}
        for m, res in ta["results"].items():
            x, y = res["score"] * 100, tb["results"][m]["score"] * 100
            same = sum(q["correct"][m] == right_b[q["qid"]][m] for q in ta["questions"])
            agree, total = agree + same, total + len(ta["questions"])
            print(f"{task:<14}{m:<28}{x:>8.2f}{y:>8.2f}{x - y:>+8.2f}  "
                  f"{same}/{len(ta['questions'])}")
    print(f"questions scored alike: {agree} of {total}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
