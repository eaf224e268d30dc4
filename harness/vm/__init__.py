"""The guest machine: QEMU argv, lifecycle, and parsing of what the guest reports."""
