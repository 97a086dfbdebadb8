"""Builds the CPU kernels ahead of time for the instruction-set levels an image may meet, so that the image
itself needs no compiler (deploy/Containerfile builds them in a stage of their own):

    python -m deskpod.quant.kernels.prebuild --out /opt/deskpod/kernels                 # every level
    python -m deskpod.quant.kernels.prebuild --out /opt/deskpod/kernels --targets auto  # this CPU's best + portable

Point $DESKPOD_PREBUILT_KERNELS at the folder where deskpod runs."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from deskpod.quant.kernels.build import (
    KERNELS,
    MANIFEST,
    TARGETS,
    Target,
    compile_kernel,
    cpu_flags,
    module_name,
    runnable,
)


def prebuild(out: Path, targets: list[Target], kernels: tuple[str, ...] = KERNELS) -> dict:
    """Compile every kernel for every target into `out`, each in a process of its own (importing a build for a
    level this CPU lacks could fault); returns the manifest written beside them. A target that fails to build
    is left out, with its reason printed."""
    manifest = {"torch": torch.__version__, "machine": platform.machine(), "targets": {}}
    for target in targets:
        for name in kernels:
            build_dir = out / "build" / target.name / name
            one = [sys.executable, "-m", "deskpod.quant.kernels.prebuild", "--compile-one", name, target.name, str(build_dir)]
            done = subprocess.run(one, capture_output=True, text=True)
            built = sorted(build_dir.glob("*.so"))
            if not built:  # (a build that compiled but could not be imported here, on a CPU below its level, is kept)
                print(f"{target.name} {name}: not built: {(done.stderr or done.stdout).strip()[-500:]}", file=sys.stderr)
                continue
            file = out / f"{module_name(name, target)}.so"
            built[0].replace(file)
            manifest["targets"].setdefault(target.name, {})[name] = file.name
            print(f"{target.name} {name}: {file.name}", flush=True)
    shutil.rmtree(out / "build", ignore_errors=True)  # objects and ninja files: only the modules are needed
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deskpod.quant.kernels.prebuild", description=__doc__.split(":\n")[0])
    p.add_argument("--out", type=Path, help="the folder to write the builds and their manifest to")
    p.add_argument("--targets", default="all",
                   help="'all' (every level of this architecture), 'auto' (the best this CPU runs, and the "
                        "portable one), or names, comma-separated: " + ", ".join(t.name for ts in TARGETS.values() for t in ts))
    p.add_argument("--kernels", default=",".join(KERNELS), help="which, comma-separated (default: all: %(default)s)")
    p.add_argument("--compile-one", nargs=3, metavar=("KERNEL", "TARGET", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    known = TARGETS.get(platform.machine(), ())
    if args.compile_one:
        name, target_name, build_dir = args.compile_one
        target = next(t for t in known if t.name == target_name)
        compile_kernel(name, target.march, Path(build_dir), module_name(name, target))
        return 0
    if args.out is None:
        p.error("--out is required")
    if not known:
        p.error(f"no prebuilt kernel levels are defined for {platform.machine()}: the kernels build at first use")
    if args.targets == "all":
        targets = list(known)
    elif args.targets == "auto":
        targets = list(dict.fromkeys([runnable(known, cpu_flags())[0], known[-1]]))
    else:
        names = args.targets.split(",")
        unknown = [n for n in names if n not in {t.name for t in known}]
        if unknown:
            p.error(f"unknown target(s) {', '.join(unknown)} for {platform.machine()}: {', '.join(t.name for t in known)}")
        targets = [t for t in known if t.name in names]
    kernels = tuple(args.kernels.split(","))
    if not set(kernels) <= set(KERNELS):
        p.error(f"unknown kernel(s) {', '.join(set(kernels) - set(KERNELS))}: {', '.join(KERNELS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = prebuild(args.out, targets, kernels)
    built = sum(len(v) for v in manifest["targets"].values())
    print(f"{built} of {len(targets) * len(kernels)} builds in {args.out}")
    return 0 if built == len(targets) * len(kernels) else 1


if __name__ == "__main__":
    sys.exit(main())
