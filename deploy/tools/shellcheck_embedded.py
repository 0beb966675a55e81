"""Run shellcheck on the shell scripts embedded in compose files and manifests.

What it does
    Finds every container whose command is a shell (``sh -c``, ``bash -lc
    --``) in the given compose files and Kubernetes manifests (RayCluster pod
    templates included), and runs ``shellcheck -s sh|bash`` on the script it
    gets. Prints one line per script; exit status 1 if any has findings.

Usage
    python shellcheck_embedded.py SHELLCHECK FILE.yaml [FILE.yaml ...]
    (compose override files after the file they override)
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml


class _Loader(yaml.SafeLoader):
    """Compose override files use ``!reset``/``!override``: read them as plain values."""


def _plain(loader: yaml.SafeLoader, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_Loader.add_constructor("!reset", _plain)
_Loader.add_constructor("!override", _plain)


def pod_specs(doc: dict) -> Iterator[dict]:
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        yield doc["spec"]["template"]["spec"]
    elif kind == "RayCluster":
        yield doc["spec"]["headGroupSpec"]["template"]["spec"]
        for group in doc["spec"].get("workerGroupSpecs") or []:
            yield group["template"]["spec"]


def commands(path: Path, entrypoints: dict[str, list[str]]) -> Iterator[tuple[str, list[str]]]:
    """Command lines in one file; ``entrypoints`` carries compose entrypoints
    from earlier files to the override files that only change ``command``."""
    for doc in yaml.load_all(path.read_text(), Loader=_Loader):
        if not isinstance(doc, dict):
            continue
        for name, svc in (doc.get("services") or {}).items():  # compose
            if "entrypoint" in svc:
                entrypoints[name] = list(svc["entrypoint"] or [])
            argv = entrypoints.get(name, []) + list(svc.get("command") or [])
            yield f"{path} service {name}", argv
        for spec in pod_specs(doc):  # Kubernetes
            for c in (spec.get("initContainers") or []) + spec["containers"]:
                argv = list(c.get("command") or []) + list(c.get("args") or [])
                yield f"{path} container {c['name']}", argv


def main(argv: list[str]) -> int:
    shellcheck, files = argv[0], [Path(p) for p in argv[1:]]
    failed = checked = 0
    entrypoints: dict[str, list[str]] = {}
    for path in files:
        for where, cmd in commands(path, entrypoints):
            if not cmd or Path(cmd[0]).name not in ("sh", "bash"):
                continue
            if not any(a.startswith("-") and not a.startswith("--") and "c" in a for a in cmd[1:]):
                continue
            shell = Path(cmd[0]).name
            script = next(a for a in reversed(cmd[1:]) if not a.startswith("-"))
            result = subprocess.run([shellcheck, "-s", shell, "-"], input=script, text=True,
                                    capture_output=True, check=False)
            checked += 1
            if result.returncode != 0:
                failed += 1
                print(f"ERROR {where}:\n{result.stdout}")
    print(f"shellcheck_embedded: {checked} script(s), {failed} with findings")
    return 1 if failed or not checked else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
