"""Build-time check of a step image: every requirement of the installed flminillm
distribution is satisfied, torch is the intended build, and a step's imports work.

    python images/check_image.py --torch cpu        # in images/Dockerfile
    python images/check_image.py --torch cu128      # in images/Dockerfile.cuda
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata

from packaging.requirements import Requirement

# what a step imports (components/round_steps.py, flminillm.steps) and KFP's entry point
MODULES = (
    "flminillm",
    "flminillm.steps",
    "components",
    "pipelines",
    "kfp",
    "kfp.kubernetes",
    "kfp.dsl.executor_main",
    "torch",
    "transformers",
    "deepspeed",
    "mlflow",
    "boto3",
)


def unmet_requirements(dist: str = "flminillm") -> list[str]:
    """Requirements (without extras) of `dist` that are missing or of another version."""
    problems = []
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an optional extra (dev tools), not needed at run time
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req}: not installed")
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            problems.append(f"{req}: {installed} installed")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--torch", help="expected local version of torch: cpu, cu128, ...")
    parser.add_argument("--no-imports", action="store_true", help="only check requirements")
    args = parser.parse_args(argv)
    problems = unmet_requirements()
    if args.torch:
        version = metadata.version("torch")
        if not version.endswith(f"+{args.torch}"):
            problems.append(f"torch {version}: expected the +{args.torch} build")
    if not args.no_imports:
        for name in MODULES:
            try:
                importlib.import_module(name)
            except Exception as err:  # report every failure, not only the first
                problems.append(f"import {name}: {type(err).__name__}: {err}")
    for p in problems:
        print(f"image check: {p}", file=sys.stderr)
    if problems:
        return 1
    checked = "requirements" if args.no_imports else "requirements and imports"
    print(f"image check: {checked} of flminillm OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
