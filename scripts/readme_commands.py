"""Run the README's commands as written, in a temporary copy of the checkout, and say how each went.

    python scripts/readme_commands.py [--data-root ../shared/data] [--only bench]

Takes every `python ...` command of the README's ```bash blocks and its inline `python ...` spans (placeholders
such as RUN.pt or FOLDER skipped), in the README's order, and runs each with bash from the copy's root, where
`data/` points at --data-root as a user's unpacked datasets would. Skipped, with the reason: the set-up (a fresh
venv: scripts/fresh_install.sh), the test suite (CI runs it) and the full ablation protocol (days of CPU). A
command that downloads weights passes here when it stops with its one-line error (no hub on this machine).
Prints one line per command (status, seconds, its last output line) and exits 1 if any failed.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {"pip install": "the set-up: scripts/fresh_install.sh replays it in a new venv",
        "pytest": "the test suite: CI runs it", "baselines.ablation": "the whole protocol: days of CPU"}
PLACEHOLDER = re.compile(r"\b(RUN\.pt|RUN|FOLDER|FILE|DIR|NAME|OUT|IN|X)\b")
NEEDS_HUB = re.compile(r"--prefetch|^python train\.py --data brainmri --shots 1( |$)(?!.*--random-init)")


def readme_commands(text):
    """The README's runnable commands, in order: lines of ```bash blocks (continuations joined, comments cut)
    that start with `python`, and inline `python ...` spans without placeholders."""
    out, in_block, block = [], False, []
    for line in text.splitlines():
        if line.startswith("```"):
            if in_block:
                joined = "\n".join(block).replace("\\\n", " ")
                out += [(c.split("  #")[0].strip(), "block") for c in joined.splitlines()]
            in_block, block = line.startswith("```bash") and not in_block, []
        elif in_block:
            block.append(line)
        else:
            out += [(span, "inline") for span in re.findall(r"`(python [^`]+)`", line)]
    cmds = [(c, kind) for c, kind in out if c.startswith("python") and not PLACEHOLDER.search(c)]
    return list(dict.fromkeys(cmds))


def run(cmd, cwd, timeout):
    """cmd with bash, `python` being this interpreter (the venv this script runs in, as a user's activated one)."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    t0 = time.time()
    try:
        r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = r.returncode, (r.stdout + r.stderr).strip().replace("\r", "\n")
    except subprocess.TimeoutExpired:
        rc, out = 124, f"timed out after {timeout} s"
    return rc, time.time() - t0, (out.splitlines() or [""])[-1][:160]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=os.path.join(os.path.dirname(ROOT), "shared", "data"),
                   help="the datasets, linked as data/ in the copy")
    p.add_argument("--only", default=None, help="run only commands containing this text")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per command")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="readme-commands-")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.join(work, os.path.dirname(f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(work, f))
    os.symlink(os.path.abspath(args.data_root), os.path.join(work, "data"))
    failed = 0
    for cmd, kind in readme_commands(open(os.path.join(ROOT, "README.md")).read()):
        if args.only and args.only not in cmd:
            continue
        reason = next((why for key, why in SKIP.items() if key in cmd), None)
        if reason:
            print(f"SKIP  {cmd}\n      {reason}")
            continue
        rc, secs, last = run(cmd, work, args.timeout)
        offline = NEEDS_HUB.search(cmd) and rc == 1 and last.startswith("error:")
        ok = rc == 0 or offline
        failed += not ok
        status = "OK  " if rc == 0 else "OFFL" if offline else "FAIL"
        print(f"{status}  {cmd}\n      {secs:.0f} s, rc {rc}: {last}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
