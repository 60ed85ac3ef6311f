"""Renders bench/results/*.json as the table in docs/benchmarks.md (between the markers)."""
import glob
import json
import os

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def main():
    rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(ROOT, "bench", "results", "*.json")))]
    lines = ["| benchmark | ours | diffusers | unit | ratio | machine | torch | date |",
             "| --- | ---: | ---: | --- | ---: | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['ours']:g} | {r['reference']:g} | {r['unit']} | {r['ratio']:.3f} | "
                     f"{r['machine']} | {r['torch']} | {r['date'][:10]} |")
    text = open(DOC).read()
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    open(DOC, "w").write(text[:a] + "\n" + "\n".join(lines) + "\n" + text[b:])


if __name__ == "__main__":
    main()
