"""Several `qwentrt bench` runs of one engine -> one report (results.json, report.md, plots) with the
ratios across them: for when the modes had to run as separate commands (e.g. a per-command time limit).

    python -m qwentrt.bench.merge OUT RUN_DIR [RUN_DIR ...]

A later run's point (same mode, ISL, OSL, concurrency) replaces an earlier one's."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from qwentrt.bench import report
from qwentrt.errors import QwentrtError


def merge(run_dirs: list[Path], out: Path) -> tuple[dict, dict[str, Path]]:
    docs = []
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise QwentrtError(f"{d}: no results.json")
        docs.append(json.loads(path.read_text(encoding="utf-8")))
    if not docs:
        raise QwentrtError("nothing to merge")
    names = {(doc["environment"].get("engine") or {}).get("path") for doc in docs}
    doc = copy.deepcopy(docs[0])
    points: dict[tuple, dict] = {}
    for d in docs:
        for p in d["points"]:
            points[(p["mode"], p["isl"], p["osl"], p["concurrency"])] = p
    doc["points"] = list(points.values())
    doc["comparisons"] = report.comparisons(doc["points"])
    doc["notes"] = list(dict.fromkeys(n for d in docs for n in d.get("notes", []) if n))
    if len(names) > 1:
        doc["notes"].append(f"merged runs of different engines: {sorted(map(str, names))}")
    doc["perf_analyzer"] = next((d["perf_analyzer"] for d in docs if d.get("perf_analyzer")), None)
    doc["environment"]["command"] = " ; ".join(d["environment"]["command"] for d in docs)
    doc["environment"]["date"] = ", ".join(dict.fromkeys(d["environment"]["date"] for d in docs))
    doc["merged_from"] = [{"dir": str(r), "environment": d["environment"], "options": d["options"]}
                          for r, d in zip(run_dirs, docs)]
    out.mkdir(parents=True, exist_ok=True)
    return doc, report.write_all(doc, out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[3].strip(), file=sys.stderr)
        return 2
    try:
        doc, files = merge([Path(a) for a in argv[1:]], Path(argv[0]))
    except QwentrtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table(doc["points"], doc["comparisons"]))
    print(f"\n{files['markdown']}  {files['json']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
