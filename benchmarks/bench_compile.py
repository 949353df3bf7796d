"""Compile every recipe for several TPU targets and presets; print one markdown table.

    pip install 'jaxlm[tpu]'
    python benchmarks/bench_compile.py                               # the docs/perf.md table
    python benchmarks/bench_compile.py --recipes=llama_8b --targets=v5p-64 --presets=fsdp \\
        --also_unrolled                                         # scanned vs unrolled time

Each cell is one `tools/compile.py` run in its own process (so compile times do not share
caches), with the recipe's own settings and only the preset and mesh shape changed. Columns:
per-device memory from the TPU compiler, the planner's estimate of it, compile time, and the
step time and MFU that the compiler's cost model *estimates* (not measurements).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for jaxlm.cli when jaxlm is not installed
RECIPES = ("tiny", "gpt2_124m", "tinysolar_248m", "llama_1b", "llama_8b")
# Two targets per recipe, sized for it; every preset is tried on the first.
TARGETS = {
    "tiny": ("v5e-4", "v6e-8"),
    "gpt2_124m": ("v5e-8", "v5p-8"),
    "tinysolar_248m": ("v5e-8", "v5p-8"),
    "llama_1b": ("v5p-8", "v4-8"),
    "llama_8b": ("v5p-64", "v6e-64"),
}
MESH = {"dp": "(-1,1,1)", "fsdp": "(1,-1,1)", "fsdp_tp": "(1,-1,2)"}

_RECIPES = flags.DEFINE_list("recipes", list(RECIPES), "Recipes in configs/ to compile.")
_TARGETS = flags.DEFINE_list("targets", None, "Targets (default: two per recipe, see TARGETS).")
_PRESETS = flags.DEFINE_list("presets", list(MESH), "Sharding presets (first target only).")
_UNROLLED = flags.DEFINE_bool("also_unrolled", False, "Also compile with scan_layers=False.")
_OUT = flags.DEFINE_string("out", None, "Write every report as JSON lines to this file.")


def compile_one(recipe: str, target: str, preset: str, scan: bool | None) -> dict:
    """One tools/compile.py run; its JSON report, or {'error': sentence}."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "report.json")
        cmd = [
            sys.executable,
            os.path.join(ROOT, "tools", "compile.py"),
            f"--config={os.path.join(ROOT, 'configs', recipe + '.py')}",
            f"--target={target}",
            f"--config.mesh.preset={preset}",
            f"--config.mesh.shape={MESH[preset]}",
            f"--json={path}",
        ]
        if scan is not None:
            cmd.append(f"--config.model.scan_layers={scan}")
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if out.returncode == 0:
            with open(path) as f:
                return dict(json.load(f), wall_s=wall)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    return {"name": recipe, "target": target, "preset": preset, "wall_s": wall,
            "error": errors[-1] if errors else out.stderr.strip().splitlines()[-1]}  # fmt: skip


def row(r: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    if "error" in r:
        return f"| {r['name']} | {r['target']} | {r['preset']} | {r['error']} |||||"
    mem = r["memory"]
    complete = r.get("cost_complete", True)
    est = r["compiler_step_seconds_estimate"] if complete else None
    mfu = r["estimated_mfu"] if complete else None
    layers = "scan" if r["scan_layers"] else "unrolled"
    return (
        f"| {r['name']} | {r['target']} | {r['preset']} {layers} | {gib(mem['total'])} of "
        f"{gib(r['hbm'])} | {gib(r['planner_memory'])} "
        f"({r['planner_memory'] / mem['total'] - 1:+.0%}) | {r['compile_seconds']:.0f} | "
        f"{'n/a' if est is None else f'{est:.3g}'} | {'n/a' if mfu is None else f'{mfu:.0%}'} |"
    )


def main(argv: list[str]) -> None:
    del argv
    print(
        "| recipe | target | preset, layers | compiler GiB/chip of HBM | planner GiB (vs compiler)"
        " | compile s | est. step s | est. MFU |\n|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    sink = open(_OUT.value, "a") if _OUT.value else None
    for recipe in _RECIPES.value:
        targets = _TARGETS.value or TARGETS[recipe]
        for i, target in enumerate(targets):
            presets = _PRESETS.value if i == 0 else ["fsdp"]
            for preset in presets:
                scans = [None, False] if _UNROLLED.value else [None]
                for scan in scans:
                    report = compile_one(recipe, target, preset, scan)
                    print(row(report), flush=True)
                    if sink:
                        sink.write(json.dumps(report) + "\n")
                        sink.flush()


if __name__ == "__main__":
    from jaxlm import cli

    cli.run_cli(main, require_config=False)
