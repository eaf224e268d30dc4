"""``python -m harness.guest``: build the guest initramfs and print its path."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from harness.guest.build import GuestBuildError, build_initramfs
from harness.paths import EnvError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.guest", description=__doc__)
    p.add_argument("--out", type=Path, help="image path (default build/guest/initramfs.cpio.gz)")
    p.add_argument("--busybox", type=Path, help="static busybox (default: env.json)")
    p.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="kernel module, repeat for failover, net_failover, virtio_net (default: env.json)",
    )
    p.add_argument("--no-gzip", action="store_true", help="write an uncompressed cpio")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    modules = dict(m.split("=", 1) for m in args.module) if args.module else None
    try:
        path = build_initramfs(
            out=args.out,
            busybox=args.busybox,
            modules={k: Path(v) for k, v in modules.items()} if modules else None,
            compress=not args.no_gzip,
        )
    except (EnvError, GuestBuildError, ValueError, OSError) as e:
        print(f"harness.guest: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
