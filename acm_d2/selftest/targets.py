"""The closing table of benchmarks/run_gpu.sh: issue 16's targets, PASS/FAIL, from the run's files.

    python -m acm_d2.selftest.targets OUT WORK

reads OUT/selftest.json (the self-test), the training runs' folders under WORK (demo/, train_none/,
train_ACM/: metrics.json, model_final.pth) with their logs (WORK/<part>.log) and WORK/parts.txt (one
"name exit-status seconds" line per part of the script); writes OUT/e2e.json (the training runs: AP,
time per iteration, Triton warnings) and OUT/summary.md (the table), and prints the table. Exit
status 1 when a part of the run failed (non-zero exit or over its time budget), a training run did not
finish or report AP, or a log holds a Triton warning; a target missed is a finding, not a failure.
"""

import json
import os
import re
import statistics
import sys
from typing import List, Optional

TRAINING_RUNS = ("demo", "train_none", "train_ACM")
# A warning or error naming Triton: the fused op's fallback to the torch backend, Triton's own
# warnings (e.g. a compile or launcher problem), a UserWarning raised from Triton's package.
TRITON_WARNING = re.compile(r"triton.*(warn|fail|error)|(warn|fail|error).*triton", re.IGNORECASE)


def _fused(report: dict, dtype: str, model: str = "ACM (fused)") -> Optional[dict]:
    section = report.get("sections", {}).get("model", {})
    rows = section.get("per_dtype", {}).get(dtype, {}).get("models", [])
    return next((r for r in rows if r["model"] == model), None)


def _layer(report: dict, level: str, mode: str) -> Optional[dict]:
    rows = report.get("sections", {}).get("layer", {}).get("results", [])
    return next(
        (
            r
            for r in rows
            if (r["level"], r["dtype"], r["impl"], r["mode"]) == (level, "fp32", "fused", mode)
        ),
        None,
    )


def _launches(report: dict, phases) -> Optional[float]:
    if report.get("device") != "cuda":
        return None  # nothing is launched on the CPU
    runs = report.get("sections", {}).get("breakdown", {}).get("runs", {})
    acm = runs.get("fp32 ACM fused", {}).get("train_step", {}).get("acm")
    if not acm or not all(p in acm for p in phases):
        return None
    return sum(acm[p]["launches_per_call"] for p in phases)


def target_rows(report: dict) -> List[dict]:
    """One row per target of the issue: figure, measured value (None: not measured), limit, verdict."""
    rows = []

    def add(figure, value, limit, unit="x", verdict=None):
        if verdict is None:
            verdict = "MISSING" if value is None else ("PASS" if value <= limit else "FAIL")
        rows.append(
            {"figure": figure, "value": value, "limit": limit, "unit": unit, "verdict": verdict}
        )

    for dtype in ("fp32", "bf16"):
        r = _fused(report, dtype)
        add(f"training step {dtype}, fused / none", r and r["train_step_ratio"], 1.10)
        add(f"peak memory {dtype}, fused / none", r and r["peak_memory_ratio"], 1.15)
        add(f"inference {dtype}, fused / none", r and r["inference_ratio"], 1.05)
    for dtype in ("fp32", "bf16"):
        r = _fused(report, dtype, "ACM (fused, recompute)")
        base = _fused(report, dtype)
        # What MODEL.CONTEXT_RECOMPUTE True would give if it were the default: its memory against the
        # target, and its step time against the default's (the price), for the choice of the default.
        add(
            f"peak memory {dtype}, fused + CONTEXT_RECOMPUTE / none",
            r and r["peak_memory_ratio"],
            1.15,
        )
        step = r and base and r["train_step_ms"] / base["train_step_ms"]
        add(f"training step {dtype}, recompute / fused", step, None, verdict="info")
    r = _layer(report, "res2", "fwd+bwd")
    add("layer fwd+bwd res2 fp32, x memory floor", r and r["vs_floor"], 2.0)
    r = _layer(report, "res5", "fwd")
    add("layer fwd res5 fp32", r and r["median_ms"], 0.1, unit="ms")
    add("launches per ACM call, forward", _launches(report, ("forward",)), 3, unit="")
    add("launches per ACM call, fwd + bwd", _launches(report, ("forward", "backward")), 8, unit="")
    return rows


def training_run(folder: str, log: str) -> dict:
    """A training run's outcome from its folder and log: finished (model_final.pth), AP, seconds per
    iteration (median of Detectron2's windowed "time" after the first window), Triton warnings."""
    entries = []
    metrics = os.path.join(folder, "metrics.json")
    if os.path.isfile(metrics):
        with open(metrics) as f:
            entries = [json.loads(line) for line in f if line.strip()]
    times = [e["time"] for e in entries if "time" in e]
    times = times[1:] if len(times) > 1 else times  # the first window holds the warm-up
    ap = {}
    for e in entries:
        ap.update({k: v for k, v in e.items() if k in ("bbox/AP", "segm/AP")})
    warnings = []
    if os.path.isfile(log):
        with open(log, errors="replace") as f:
            warnings = [line.strip()[:300] for line in f if TRITON_WARNING.search(line)]
    finished = os.path.isfile(os.path.join(folder, "model_final.pth"))
    return {
        "finished": finished,
        "iterations": max((e.get("iteration", -1) for e in entries), default=-1) + 1,
        "seconds_per_iteration": statistics.median(times) if times else None,
        "ap": ap,
        "triton_warnings": warnings,
        "ok": finished and "bbox/AP" in ap and not warnings,
    }


def read_parts(path: str) -> dict:
    parts = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                name, status, seconds, budget = line.split()
                parts[name] = {
                    "status": int(status),
                    "seconds": int(seconds),
                    "budget": int(budget),
                }
    return parts


def _value(row: dict) -> str:
    if row["value"] is None:
        return "-"
    return f"{row['value']:.2f}{row['unit']}" if row["unit"] != "" else f"{row['value']:.1f}"


def summary_table(report: dict, rows: List[dict], runs: dict, parts: dict) -> List[str]:
    head = report.get("device_name", "?")
    versions = report.get("versions", {})
    lines = [
        f"## run_gpu.sh on {head} ({report.get('device', '?')}), torch {versions.get('torch')}, "
        f"triton {versions.get('triton')}, acm_d2 {versions.get('acm_d2')}",
        "",
        "| target (issue 16) | measured | limit | verdict |",
        "|---|---|---|---|",
    ]
    for r in rows:
        limit = "-" if r["limit"] is None else f"<= {r['limit']}{r['unit']}"
        lines.append(f"| {r['figure']} | {_value(r)} | {limit} | {r['verdict']} |")
    lines += [
        "",
        "| training run | finished | bbox AP | segm AP | s/iter | Triton warnings | verdict |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for name, t in runs.items():
        spi = t["seconds_per_iteration"]
        lines.append(
            f"| {name} | {t['finished']} | {t['ap'].get('bbox/AP', '-')} | {t['ap'].get('segm/AP', '-')} "
            f"| {'-' if spi is None else f'{spi:.3f}'} | {len(t['triton_warnings'])} "
            f"| {'PASS' if t['ok'] else 'FAIL'} |"
        )
    lines += ["", "| part | exit status | seconds (budget) |", "|---|---|---|"]
    for name, p in parts.items():
        status = {0: "0", 124: "124 (over budget)", 137: "137 (killed)"}.get(
            p["status"], str(p["status"])
        )
        lines.append(f"| {name} | {status} | {p['seconds']} ({p['budget']}) |")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, work = argv
    report = {}
    selftest = os.path.join(out, "selftest.json")
    if os.path.isfile(selftest):
        with open(selftest) as f:
            report = json.load(f)
    rows = target_rows(report)
    runs = {
        name: training_run(os.path.join(work, name), os.path.join(work, f"{name}.log"))
        for name in TRAINING_RUNS
    }
    parts = read_parts(os.path.join(work, "parts.txt"))
    with open(os.path.join(out, "e2e.json"), "w") as f:
        json.dump({"targets": rows, "training_runs": runs, "parts": parts}, f, indent=1)
    lines = summary_table(report, rows, runs, parts)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [n for n, p in parts.items() if p["status"] != 0]
    failed += [n for n, t in runs.items() if not t["ok"]]
    if failed:
        print(f"run_gpu.sh: FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
