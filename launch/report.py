#!/usr/bin/env python
"""(Re-)write the readable report of a run, or of a comparison of runs, from files on disk.

    python launch/report.py RUN_FOLDER                 # report.md + report.html from results.json
    python launch/report.py COMPARISON_FOLDER          # re-render from its comparison.json
    python launch/report.py RUN1 RUN2 ... --out DIR    # compare runs (seeds, folds, strategies)

Nothing is recomputed at the sites: a report only reads results.json / metrics.jsonl (or
comparison.json). Exit codes: 0 written, 2 bad arguments or missing files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chestfed.launch.cli import EXIT_USAGE, fail, setup_logging

from chestfed.common.errors import ChestFedError
from chestfed.server.run.folder import read_json_file
from chestfed.server.run.lifecycle import settle


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="run folder(s) or a comparison folder")
    p.add_argument("--out", type=Path, help="where a comparison of several runs is written")
    p.add_argument("--title", help="title of a comparison report")
    p.add_argument("--verbose", "-v", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    # lazy: brings in matplotlib, scipy, sklearn
    from chestfed.server.report import Doc, write_doc, render_comparison, write_comparison_report, write_report

    try:
        if len(args.folders) == 1 and args.out is None:
            folder = args.folders[0]
            if settle(folder):  # its launcher died: say so before anything else
                fail(f"{folder}: marked interrupted (its launcher died)")
            if (folder / "results.json").is_file():
                paths = write_report(folder)
            elif (folder / "comparison.json").is_file():
                agg = read_json_file(folder / "comparison.json")
                doc: Doc = render_comparison(agg, args.title or agg.get("title") or "ChestFed comparison")
                paths = write_doc(folder, doc, {})
            else:
                fail(f"{folder}: neither results.json nor comparison.json here (is the run finished?)")
                return EXIT_USAGE
        else:
            if args.out is None:
                fail("several folders: say where the comparison goes with --out DIR")
                return EXIT_USAGE
            results = []
            for folder in args.folders:
                f = folder / "results.json"
                if not f.is_file():
                    fail(f"{folder}: no results.json (is the run finished?)")
                    return EXIT_USAGE
                results.append(read_json_file(f))
            paths = write_comparison_report(args.out, results, title=args.title)
    except ChestFedError as exc:
        fail(str(exc))
        return EXIT_USAGE
    print(f"report: {paths['html']}\n        {paths['md']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
