"""Dependency installer: `python3 -m harness.deps` (stdlib only, runs before any venv exists).

Steps, in order: host tools, libvfio-user, qemu, guest artifacts, venv, manifest. Everything is
pinned (version + sha256 in qemu/pins/) and cached under harness.paths.cache_dir().
"""
