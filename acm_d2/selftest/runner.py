"""GPU self-test: does acm_d2 compute the right thing, train finitely and run fast on this machine?

    python -m acm_d2.selftest [--quick] [--json PATH] [--sections env,correctness,...]

Sections (each runs on CUDA when available; without a GPU, small CPU versions of those that make sense):

  env           GPU, driver, CUDA, torch, Triton, Detectron2 and Python versions, SM count.
  correctness   the fused op (Triton and torch backends) against the reference AttendAndCompare, every
                fused variant, G 8 and 32, fp32/bf16/fp16, y, d, dx and every parameter gradient; plus a
                channels_last and a non-contiguous input through AttendAndCompare(impl="fused").
  amp_training  the demo config (R-18-FPN) on generated data with the project's Trainer, with ACM and
                without, in fp32 and AMP fp16/bf16: does every loss stay finite, and the final losses.
  layer         one ACM, reference vs fused, at the R50-FPN res2-res5 shapes of 2 x 800 x 1216 images:
                median ms, ratio to the memory-traffic floor, launches and host syncs per call.
  model         Mask R-CNN R50-FPN with no context module, reference ACM, fused ACM and fused ACM with
                MODEL.CONTEXT_RECOMPUTE True: training step, inference (medians, min-max; 20 timed steps
                per model on a GPU) and peak memory.
  breakdown     where one training step and one inference of that model go, none vs fused ACM, fp32
                and AMP bf16: host time per ACM call (forward, backward) by category, launches
                and GPU time per kernel (torch.profiler); the memory peak of a step attributed to the
                allocations live at it (allocator history), also with MODEL.CONTEXT_RECOMPUTE True.

Every section is wrapped: a failing one records its error and the run goes on. The JSON file is rewritten
after each section, so an interrupted run still leaves the finished sections. Progress lines carry the
wall-clock time and the seconds since the start. The exit status is 1 if a section failed or a
correctness check did not pass.
"""

import argparse
import datetime
import platform
import tempfile
import time
import traceback
from typing import Callable, Dict, List

import torch

from .. import __version__
from . import common
from .amp_training import section_amp_training
from .breakdown import breakdown_lines, section_breakdown
from .common import Context, log, save, version_of
from .correctness import section_correctness
from .env import section_env
from .speed import section_layer, section_model

SECTIONS: Dict[str, Callable[[Context], dict]] = {
    "env": section_env,
    "correctness": section_correctness,
    "amp_training": section_amp_training,
    "layer": section_layer,
    "model": section_model,
    "breakdown": section_breakdown,
}


def run_selftest(args) -> dict:
    """Run the chosen sections in order; return the report (also written to args.json after each section)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {
        "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "args": vars(args),
        "device": device,
        "quick": args.quick,
        "device_name": torch.cuda.get_device_name(0)
        if device == "cuda"
        else (platform.processor() or platform.machine()),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": version_of("triton"),
            "detectron2": version_of("detectron2"),
            "acm_d2": __version__,
        },
        "sections": {},
    }
    if device == "cpu":
        log("no GPU found: running the CPU versions (small shapes; the timings say little)")
    log(
        f"selftest on {report['device_name']}{' (--quick)' if args.quick else ''}: {', '.join(args.sections)}"
    )
    with tempfile.TemporaryDirectory(prefix="acm_selftest_") as workdir:
        ctx = Context(device, args.quick, workdir, args.snapshot_dir)
        for name in args.sections:
            log(f"== {name}")
            start = time.perf_counter()
            try:
                result = {"status": "ok", **SECTIONS[name](ctx)}
            except (
                Exception
            ) as error:  # the section's failure is the finding; the next sections still run
                result = {
                    "status": "error",
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc(),
                }
                log(f"{name} FAILED: {result['error']}")
            result["seconds"] = round(time.perf_counter() - start, 1)
            report["sections"][name] = result
            report["total_seconds"] = round(time.perf_counter() - common.START, 1)
            save(report, args.json)
            log(f"== {name} {result['status']} in {result['seconds']} s")
    report["summary"] = summary_lines(report)
    save(report, args.json)
    print("\n".join(report["summary"]), flush=True)
    return report


def summary_lines(report: dict) -> List[str]:
    """The headline figures of the sections that ran, as printed at the end."""
    s = report["sections"]
    lines = [
        f"==== acm_d2 selftest: {report['device_name']} ({report['device']}), torch {report['versions']['torch']}, "
        f"triton {report['versions']['triton']}, {report.get('total_seconds', 0):.0f} s"
    ]
    for name, section in s.items():
        if section["status"] != "ok":
            lines.append(f"{name:<13} ERROR {section['error'][:200]}")
    if s.get("correctness", {}).get("status") == "ok":
        c = s["correctness"]
        per = {}
        for check in c["checks"]:
            key = (check["path"].split(",")[0], check["dtype"])
            ok, n = per.get(key, (0, 0))
            per[key] = (ok + check["passed"], n + 1)
        lines.append(
            f"correctness   {c['passed']}/{c['total']} passed: "
            + ", ".join(f"{p} {d} {ok}/{n}" for (p, d), (ok, n) in per.items())
        )
        lines += [f"  FAILED {f}" for f in c["failures"][:10]]
    if s.get("amp_training", {}).get("status") == "ok":
        runs = s["amp_training"]["runs"]
        lines.append(
            "amp_training  "
            + ", ".join(
                f"{label} {'finite' if r['finite'] else 'NaN/inf@' + str(r['stopped_at'])}"
                for label, r in runs.items()
            )
        )
    if s.get("layer", {}).get("status") == "ok":
        layer = s["layer"]
        lines.append(
            f"layer         copy bandwidth {layer['copy_bandwidth_gbs']:.0f} GB/s; fused ms (x floor) [x reference], launches/syncs, host / kernel ms per call"
        )
        for r in layer["results"]:
            if r["impl"] == "fused":
                counts = (
                    f", {r['launches']:.0f}/{r['syncs']:.0f}, {r['host_ms']:.3f} / {r['kernel_ms']:.3f}"
                    if "launches" in r
                    else ""
                )
                lines.append(
                    f"  {r['level']} {r['dtype']:<4} {r['mode']:<8} {r['median_ms']:8.3f} ms ({r['vs_floor']:6.1f}x) [{r['vs_reference']:.2f}x]{counts}"
                )
    if s.get("model", {}).get("status") == "ok":
        m = s["model"]
        lines.append("model         ratios to none: train step / inference / peak memory")
        for dtype, res in m["per_dtype"].items():
            if "error" in res:
                lines.append(f"  {dtype}: ERROR {res['error'][:150]}")
                continue
            for r in res["models"]:
                mem = f"{r['peak_memory_ratio']:.2f}" if r["peak_memory_ratio"] is not None else "-"
                lines.append(
                    f"  {dtype:<4} {r['model']:<24} step {r['train_step_ms']:8.1f} ms "
                    f"({r['train_step_ms_min_max'][0]:.1f}-{r['train_step_ms_min_max'][1]:.1f}) {r['train_step_ratio']:5.2f}x, "
                    f"infer {r['inference_ms_per_image']:7.1f} ms {r['inference_ratio']:5.2f}x, memory {mem}x"
                )
    if s.get("breakdown", {}).get("status") == "ok":
        lines += breakdown_lines(s["breakdown"])
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m acm_d2.selftest",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer shapes, dtypes and repetitions",
    )
    parser.add_argument(
        "--json",
        default="acm_selftest.json",
        help="report file, rewritten after each section ('' for none)",
    )
    parser.add_argument(
        "--snapshot-dir",
        help="breakdown: write the CUDA allocator snapshot of the fused-ACM fp32 step here "
        "(gzip pickle; open it at https://pytorch.org/memory_viz after gunzip)",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or not args.sections:
        # An empty run would report success having checked nothing.
        what = f"unknown {unknown}" if unknown else "names no section"
        parser.error(f"--sections {what}; choose one or more of {','.join(SECTIONS)}")
    return args


def main(argv=None) -> int:
    report = run_selftest(parse_args(argv))
    bad = [n for n, s in report["sections"].items() if s["status"] != "ok"]
    failed_checks = report["sections"].get("correctness", {}).get("failures", [])
    return 1 if bad or failed_checks else 0
