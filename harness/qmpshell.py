"""`harness qmp`: qemu.qmp's own QMP shell on a running VM's second monitor, with one guard.

Interactive (`harness qmp`): qemu.qmp's QMPShell (readline, history in ~/.qmp-shell_history,
tab completion), connected to the monitor that `harness run` opened for people, so the harness
keeps its own. One-shot (`harness qmp query-pci`, `harness qmp device_add driver=... id=...`):
the same parser, one command, the reply printed as JSON, exit status 1 on a QMP error.

The guard: `device_del` of a vfio-user-pci device aborts QEMU 11.1.3 (an assertion in
memory_region_del_subregion), killing the guest, so it is refused with that explanation unless
`--force` is given (tests/vm/test_hotplug.py records whether QEMU still aborts).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.qmp_shell import QMPShell, QMPShellError

DEVICE_DEL_ABORTS = (
    "refused: device_del of a vfio-user-pci device ({id}) aborts QEMU 11.1.3 (assertion in "
    "memory_region_del_subregion), which ends the run. Use --force to send it anyway.")


def refusal(cmd: dict[str, Any], vfio_user_ids: set[str]) -> str | None:
    """Why a command must not be sent, or None. Pure, so the guard is unit-tested."""
    if cmd.get("execute") != "device_del":
        return None
    dev = str(cmd.get("arguments", {}).get("id", ""))
    if dev in vfio_user_ids or dev.startswith("/machine/peripheral/net"):
        return DEVICE_DEL_ABORTS.format(id=dev)
    return None


class HarnessShell(QMPShell):
    """QMPShell that refuses commands known to abort QEMU (unless forced)."""

    def __init__(self, address: str, *, vfio_user_ids: set[str], force: bool = False) -> None:
        super().__init__(address, pretty=True)
        self.vfio_user_ids = vfio_user_ids
        self.force = force

    def guard(self, cmdline: str) -> str | None:
        if self.force:
            return None
        try:
            cmd = self._build_cmd(cmdline)
        except QMPShellError:
            return None  # the shell itself reports the parse error
        return refusal(cmd, self.vfio_user_ids) if cmd else None

    def _execute_cmd(self, cmdline: str) -> bool:
        why = self.guard(cmdline)
        if why is not None:
            print(why, file=sys.stderr)
            return True
        return super()._execute_cmd(cmdline)

    def one_shot(self, cmdline: str) -> int:
        """Run one command; print the reply; 0 if it succeeded, 1 on a QMP error, 2 refused."""
        why = self.guard(cmdline)
        if why is not None:
            print(f"harness qmp: {why}", file=sys.stderr)
            return 2
        try:
            cmd = self._build_cmd(cmdline)
        except QMPShellError as exc:
            print(f"harness qmp: cannot parse {cmdline!r}: {exc}", file=sys.stderr)
            return 2
        if cmd is None:
            return 0
        reply = self.cmd_obj(cmd)
        print(json.dumps(reply, indent=2, sort_keys=True))
        return 1 if "error" in reply else 0


def main(qmp_socket: Path, vfio_user_ids: set[str], words: list[str], *,
         force: bool = False) -> int:
    shell = HarnessShell(str(qmp_socket), vfio_user_ids=vfio_user_ids, force=force)
    try:
        shell.connect(negotiate=True)
    except (QMPError, OSError) as exc:
        print(f"harness qmp: cannot connect to {qmp_socket}: {exc}", file=sys.stderr)
        return 2
    if words:
        try:
            return shell.one_shot(" ".join(words))
        finally:
            shell.close()
    for _ in shell.repl():  # closes the shell (and saves the history) when it ends
        pass
    return 0
