"""Command line: `python3 -m harness.deps [--check] [--only STEP] [--venv PATH] [--relock WHAT]`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
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
    ctx = Context(repo=repo, cache=cache, venv=venv_path.absolute(), check=args.check)
    if not args.check:
        cache.mkdir(parents=True, exist_ok=True)
    if args.relock == "qemu":
        print(f"rewrote {qemu.relock(ctx)}")
        return 0
    only = set(args.only or STEPS)
    results: dict[str, object] = {}
    t_all = time.monotonic()

    def step(name: str, fn: Callable[[], StepResult | tuple[StepResult, object]]) -> None:
        if name not in only:
            return
        t0 = time.monotonic()
        out = fn()
        r, value = out if isinstance(out, tuple) else (out, None)
        results[name] = value
        _line(name, r, time.monotonic() - t0)

    try:
        step("host", lambda: hosttools.ensure(ctx))
        step("libvfio-user", lambda: libvfio_user.ensure(ctx))
        step("qemu", lambda: qemu.ensure(ctx))
        step("guest", lambda: guest.ensure(ctx))
        step("venv", lambda: venv.ensure(ctx))
        if "env" in only:
            q = results.get("qemu") or qemu.ensure(ctx)[1]
            g = results.get("guest") or guest.ensure(ctx)[1]
            assert isinstance(q, qemu.Qemu) and isinstance(g, guest.Guest)
            env = paths.Env(
                qemu=tuple(q.argv),
                qemu_version=q.version,
                libvfio_user_prefix=libvfio_user.prefix(ctx),
                kernel=g.kernel,
                kernel_version=g.kernel_version,
                modules=dict(g.modules),
                busybox=g.busybox,
            )
            step("env", lambda: manifest.write(ctx, env))
    except DepsError as e:
        print(f"deps: ERROR: {e}", file=sys.stderr)
        return 1
    print(f"{'total':13} {'':9} {time.monotonic() - t_all:6.1f}s  cache {cache}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
