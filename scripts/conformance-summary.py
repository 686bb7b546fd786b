#!/usr/bin/env python3
"""Summarizes a conformance run (`conformance.sh run`) as Markdown: passed/failed per SIG, then
every failure with the first line of its message, grouped by SIG.

    conformance-summary.py REPORT_DIR

Reads the Ginkgo JSON reports REPORT_DIR/{parallel,serial}.json. Specs that did not finish (the
run's time limit, an interrupted process) count as "not run", as do those a narrower FOCUS or
SKIP left out.
"""
import collections
import json
import re
import sys
from pathlib import Path

CONFORMANCE = re.compile(r"\[Conformance\]")


def specs(report_dir: Path):
    for name in ["parallel", "serial"]:
        path = report_dir / f"{name}.json"
        if not path.exists():
            continue
        for suite in json.loads(path.read_text()):
            for spec in suite.get("SpecReports") or []:
                if spec.get("LeafNodeType") != "It":
                    continue
                text = " ".join(t for t in (spec.get("ContainerHierarchyTexts") or [])
                                + [spec.get("LeafNodeText", "")] if t)
                if CONFORMANCE.search(text):
                    yield name, text, spec


def first_line(message: str) -> str:
    for line in message.splitlines():
        line = re.sub(r"^\[FAILED\]\s*", "", line.strip())
        if line:
            return line[:240]
    return "(no message)"


def main():
    report_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    rows = collections.defaultdict(collections.Counter)
    failures = collections.defaultdict(list)
    # Each pass's report lists every spec, those of the other pass as skipped: a spec's
    # outcome is the one from the pass that ran it.
    outcome = {}
    for _, text, spec in specs(report_dir):
        if text not in outcome or spec.get("State") not in ("skipped", "pending"):
            outcome[text] = spec
    for text, spec in sorted(outcome.items()):
        sig = (re.search(r"\[sig-[\w-]+\]", text) or [""])[0] or "[no sig]"
        state = spec.get("State")
        if state == "passed":
            rows[sig]["passed"] += 1
        elif state in ("failed", "panicked", "timedout", "aborted", "interrupted"):
            rows[sig]["failed"] += 1
            failure = spec.get("Failure") or {}
            failures[sig].append((text, first_line(failure.get("Message", "") or state)))
        else:  # skipped or pending: the focus matched but it never ran
            rows[sig]["not run"] += 1
    if not rows:
        sys.exit(f"no [Conformance] specs in {report_dir}/{{parallel,serial}}.json")
    commit = (report_dir / "commit.txt").read_text().strip() if (report_dir / "commit.txt").exists() else "?"
    started = (report_dir / "started.txt").read_text().strip() if (report_dir / "started.txt").exists() else "?"
    print(f"Run started {started}, orq at {commit}.\n")
    print("| SIG | passed | failed | not run | pass rate |")
    print("| --- | ---: | ---: | ---: | ---: |")
    total = collections.Counter()
    for sig in sorted(rows):
        r = rows[sig]
        total.update(r)
        ran = sum(r.values())
        print(f"| {sig} | {r['passed']} | {r['failed']} | {r['not run']} | {100 * r['passed'] // max(ran, 1)} % |")
    ran = sum(total.values())
    print(f"| **all** | **{total['passed']}** | **{total['failed']}** | **{total['not run']}** "
          f"| **{100 * total['passed'] // max(ran, 1)} %** |")
    for sig in sorted(failures):
        print(f"\n### {sig} failures\n")
        for text, line in sorted(failures[sig]):
            name = re.sub(r"\s*\[Conformance\]", "", text.replace(sig, "").strip())
            quoted = line.replace("`", "'")
            print(f"- {name}\n  `{quoted}`")


if __name__ == "__main__":
    main()
