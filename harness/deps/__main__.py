"""Command line: `python3 -m harness.deps [--check] [--only STEP] [--venv PATH] [--relock WHAT]`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from harness import paths
from harness.deps import guest, hosttools, libvfio_user, manifest, qemu, venv
from harness.deps.common import Context, DepsError, StepResult

STEPS = ("host", "libvfio-user", "qemu", "guest", "venv", "env")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python3 -m harness.deps", description=__doc__)
    ap.add_argument("--check", action="store_true", help="verify only; never download or build")
    ap.add_argument(
        "--only", choices=STEPS, action="append", help="run only this step (repeatable)"
    )
    ap.add_argument("--venv", type=Path, help="venv path (default $HARNESS_VENV or <repo>/.venv)")
    ap.add_argument(
        "--relock",
        choices=("qemu",),
        help="maintainers: re-resolve a lock from the registry and rewrite it",
    )
    return ap.parse_args(argv)


def _line(name: str, r: StepResult, secs: float) -> None:
    print(f"{name:13} {r.status:9} {secs:6.1f}s  {r.what}  [{r.where}]", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    repo = paths.repo_root()
    venv_path = args.venv or Path(os.environ.get("HARNESS_VENV") or repo / ".venv")
    cache = paths.cache_dir()
    sources = os.environ.get("HARNESS_APT_SOURCES")
    ctx = Context(repo=repo, cache=cache, venv=venv_path.absolute(), check=args.check,
                  apt_sources=Path(sources).absolute() if sources else None)
    if not args.check:
        cache.mkdir(parents=True, exist_ok=True)
    if args.relock == "qemu":
        print(f"rewrote {qemu.relock(ctx)}")
        return 0
    only = set(args.only or STEPS)
    results: dict[str, object] = {}
    provenance: dict[str, str] = {}
    drift: list[str] = []
    t_all = time.monotonic()

    def step(name: str, fn: Callable[[Context], StepResult | tuple[StepResult, object]],
             *, quiet: bool = False) -> None:
        t0 = time.monotonic()
        # A step not asked for still reports what it holds (for env.json), verifying only.
        out = fn(ctx if name in only else replace(ctx, check=True))
        r, value = out if isinstance(out, tuple) else (out, None)
        results[name] = value
        provenance[name] = r.what
        drift.extend(r.drift)
        if not quiet:
            _line(name, r, time.monotonic() - t0)

    try:
        for name, fn in (("host", hosttools.ensure), ("libvfio-user", libvfio_user.ensure),
                         ("qemu", qemu.ensure), ("guest", guest.ensure), ("venv", venv.ensure)):
            if name in only:
                step(name, fn)
            elif "env" in only and name in ("libvfio-user", "qemu", "guest"):
                step(name, fn, quiet=True)
        if "env" in only:
            q, g = results["qemu"], results["guest"]
            assert isinstance(q, qemu.Qemu) and isinstance(g, guest.Guest)
            env = paths.Env(
                qemu=tuple(q.argv),
                qemu_version=q.version,
                libvfio_user_prefix=libvfio_user.prefix(ctx),
                kernel=g.kernel,
                kernel_version=g.kernel_version,
                modules=dict(g.modules),
                busybox=g.busybox,
                provenance={k: provenance[k] for k in ("libvfio-user", "qemu", "guest")},
                drift=tuple(drift),
            )
            step("env", lambda c: manifest.write(c, env))
    except DepsError as e:
        print(f"deps: ERROR: {e}", file=sys.stderr)
        return 1
    print(f"{'total':13} {'':9} {time.monotonic() - t_all:6.1f}s  cache {cache}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
