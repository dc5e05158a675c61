"""Is this environment exactly the lock? Compares every installed distribution (what `pip freeze --all` lists,
less pip itself, which the venv brings) with requirements.txt's pins whose markers hold here.

    python scripts/check_lock.py [requirements.txt]

Prints one line and exits 0 when they agree; otherwise one line naming every difference and exits 1. .ci/run
calls it so that a stale cached venv or a hand install cannot pass CI; scripts/fresh_install.sh calls it on a
brand-new venv.
"""
import importlib.metadata
import os
import re
import sys

from packaging.markers import Marker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def canonical(name):
    """PEP 503's normalised name: `Pillow`, `open_clip_torch` and `open-clip-torch` are the same distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path):
    """{name: version} of the lock's `name==version [; marker]` lines whose marker holds in this interpreter."""
    pins = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req, _, marker = line.partition(";")
        name, sep, version = req.partition("==")
        if not sep:
            sys.exit(f"{path}: '{line}' is not pinned with ==; regenerate the lock (command at its top)")
        if not marker.strip() or Marker(marker).evaluate():
            pins[canonical(name.strip())] = version.strip()
    return pins


def installed():
    return {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
            if canonical(d.metadata["Name"]) != "pip"}


def main(path):
    want, have = read_lock(path), installed()
    diffs = [f"{n} {have[n]} (lock {want[n]})" for n in sorted(want.keys() & have.keys()) if want[n] != have[n]]
    diffs += [f"{n} missing (lock {want[n]})" for n in sorted(want.keys() - have.keys())]
    diffs += [f"{n} {have[n]} not in the lock" for n in sorted(have.keys() - want.keys())]
    if diffs:
        print(f"this venv ({sys.prefix}) differs from {os.path.basename(path)}: " + "; ".join(diffs)
              + " -- rebuild it from the lock")
        return 1
    print(f"this venv matches {os.path.basename(path)}: {len(have)} distributions, each at its pinned version")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "requirements.txt")))
