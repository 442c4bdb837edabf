"""Build the project's container image with podman where no container registry is reachable.

    ./build_image.sh base [--rebuild]      # the base image, from Debian's packages
    ./build_image.sh build [--model-store DIR] [--tag TAG]   # the base image, then the Dockerfile on it

``base`` makes ``localhost/torchserve-explain-base:<suite>``: a debootstrap root of this machine's Debian
release (the mirror is read from the apt sources; made once, again with ``--rebuild``), imported into
podman, with Python, a venv at /home/venv, Java 17 and the user model-server added by
deploy/base/Containerfile (podman's layer cache skips that build while nothing changed). ``build`` runs the
repository's Dockerfile on it (``--build-arg BASE_IMAGE``) in a context of deploy/ and the MARs of
``--model-store``, with this machine's pip settings (``pip config list``: local wheel folders, index
pages, constraints and CA bundle are bind-mounted at their own paths), so that the image installs the
same pinned wheels as the project's venv. Podman runs with deploy/podman/containers.conf unless
CONTAINERS_CONF is set. Needs root (debootstrap, rootful podman). Where a registry is reachable, use
``docker build .`` instead (TorchServe's image is the Dockerfile's default base).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_REPOSITORY = "localhost/torchserve-explain-base"
ROOTFS_REPOSITORY = "localhost/torchserve-explain-debootstrap"
DEFAULT_TAG = "localhost/torchserve-explain:0.1.0"
CONTEXT_FILES = ("requirements.txt", "config.properties", "metrics.yaml", "entrypoint.sh", "ready.py")
PIP_KEYS = ("index-url", "extra-index-url", "find-links", "constraint", "cert", "default-timeout")


def log(message: str) -> None:
    print(f"[image] {message}", flush=True)


def podman_env() -> dict:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(ROOT / "deploy" / "podman" / "containers.conf"))
    return env


def podman(*args: str, capture: bool = False, check: bool = True, timeout: float | None = None):
    """Runs ``podman ARGS`` (output captured with ``capture``); raises on failure with ``check``."""
    result = subprocess.run(["podman", *args], env=podman_env(), text=True, timeout=timeout,
                            stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if check and result.returncode != 0:
        detail = f":\n{(result.stderr or '')[-3000:]}" if capture else ""
        raise RuntimeError(f"podman {' '.join(args[:3])} ... failed with status {result.returncode}{detail}")
    return result


def image_exists(tag: str) -> bool:
    return podman("image", "exists", tag, check=False).returncode == 0


def debian_release() -> str:
    values = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    if values.get("ID") != "debian" or not values.get("VERSION_CODENAME"):
        raise SystemExit("the base image is built from this machine's Debian release; this is not Debian")
    return values["VERSION_CODENAME"].strip('"')


def debian_mirror(suite: str) -> str:
    """The URI apt uses for ``suite`` (deb822 .sources files, then sources.list)."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        for stanza in path.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, re.M))
            if suite in fields.get("Suites", "").split() and "deb" in fields.get("Types", "").split():
                return fields["URIs"].split()[0]
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if path.exists():
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                    return words[1]
    raise SystemExit(f"no apt source for {suite} in /etc/apt: cannot tell debootstrap where Debian's packages are")


def ensure_rootfs_image(rebuild: bool = False) -> str:
    """A minimal Debian root of this machine's release, as a podman image (debootstrap; cached)."""
    suite = debian_release()
    tag = f"{ROOTFS_REPOSITORY}:{suite}"
    if image_exists(tag) and not rebuild:
        return tag
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap (run as root) builds the base image: apt-get install debootstrap")
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="debootstrap-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", suite, str(rootfs), debian_mirror(suite)], check=True,
                       stdout=subprocess.DEVNULL)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["podman", "import", "-", tag], stdin=tar.stdout, env=podman_env(), check=True,
                       stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            raise RuntimeError("tar of the debootstrap root failed")
    log(f"{tag}: debootstrap and import in {time.monotonic() - began:.0f} s")
    return tag


def cannot_build_here() -> str | None:
    """Why this machine cannot build and run the image (None: it can). Runs ``true`` in the
    debootstrap image (made first if needed: a failure to make it is an error, not a reason)."""
    if shutil.which("podman") is None:
        return ("podman is not installed (scripts/setup_env.sh installs it when run as root: "
                "apt-get install podman runc debootstrap)")
    if os.geteuid() != 0:
        return "building the base image needs root (debootstrap, rootful podman)"
    rootfs = f"{ROOTFS_REPOSITORY}:{debian_release()}"
    if not image_exists(rootfs) and shutil.which("debootstrap") is None:
        return "debootstrap is not installed (apt-get install debootstrap)"
    result = podman("run", "--rm", "--network", "none", ensure_rootfs_image(), "true", capture=True, check=False,
                    timeout=120)
    if result.returncode != 0:
        return f"podman cannot run a container here: {result.stderr.strip()[-500:]}"
    return None


def ensure_base_image(rebuild: bool = False) -> str:
    """The base image: the debootstrap root (made once per release) with deploy/base/Containerfile
    built on it; podman's layer cache makes that build instant while neither changed."""
    tag = f"{BASE_REPOSITORY}:{debian_release()}"
    rootfs = ensure_rootfs_image(rebuild)
    began = time.monotonic()
    podman("build", *(["--no-cache"] if rebuild else []), "--build-arg", f"DEBIAN_ROOT={rootfs}",
           "-f", str(ROOT / "deploy" / "base" / "Containerfile"), "-t", tag, str(ROOT / "deploy" / "base"))
    log(f"{tag}: ready in {time.monotonic() - began:.0f} s")
    return tag


def pip_settings() -> tuple[dict, list[str]]:
    """(build args, bind-mount paths) that give a build this machine's pip configuration:
    ``PIP_<KEY>`` for each setting of ``pip config list``, and the local files and folders
    those settings name (for a file:// index ``.../simple``, its parent, whose pages link to ``../../files``)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    scopes: dict = {"global": {}, "install": {}, ":env:": {}}  # pip's precedence: later ones win
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        scope, _, name = key.rpartition(".")
        if name in PIP_KEYS and scope in scopes:
            scopes[scope][name] = " ".join(shlex.split(value))
    settings = {name: value for scope in scopes.values() for name, value in scope.items()}
    mounts = []
    for name, value in settings.items():
        for item in value.split():
            path = item[len("file://"):] if item.startswith("file://") else item
            if not path.startswith("/"):
                continue
            if name.endswith("index-url") and Path(path).name == "simple":
                path = str(Path(path).parent)
            if Path(path).exists() and path not in mounts:
                mounts.append(path)
    args = {f"PIP_{name.upper().replace('-', '_')}": value for name, value in settings.items()}
    return args, mounts


def stage_context(model_store: Path, context: Path) -> None:
    """The build context: deploy/'s files the Dockerfile copies, and the MARs as model_store/."""
    mars = sorted(Path(model_store).glob("*.mar"))
    if not mars:
        raise SystemExit(f"{model_store}: no .mar files (build them first, e.g. ./build_mar.sh demo)")
    shutil.rmtree(context, ignore_errors=True)
    (context / "deploy").mkdir(parents=True)
    (context / "model_store").mkdir()
    for name in CONTEXT_FILES:
        shutil.copy2(ROOT / "deploy" / name, context / "deploy" / name)
    for mar in mars:
        shutil.copy2(mar, context / "model_store" / mar.name)


def build_image(model_store: Path, tag: str = DEFAULT_TAG, base: str | None = None, rebuild_base: bool = False) -> str:
    base = base or ensure_base_image(rebuild_base)
    context = ROOT / "build" / "image-context"
    stage_context(model_store, context)
    build_args, mounts = pip_settings()
    command = ["build", "-f", str(ROOT / "Dockerfile"), "-t", tag, "--build-arg", f"BASE_IMAGE={base}",
               "--build-arg", "TORCH_INDEX_URL="]
    for name, value in build_args.items():
        command += ["--build-arg", f"{name}={value}"]
    for path in mounts:
        command += ["-v", f"{path}:{path}:ro"]
    previous = podman("image", "inspect", "--format", "{{.Id}}", tag, capture=True, check=False).stdout.strip()
    began = time.monotonic()
    podman(*command, str(context))
    log(f"{tag}: built on {base} in {time.monotonic() - began:.0f} s")
    current = podman("image", "inspect", "--format", "{{.Id}}", tag, capture=True).stdout.strip()
    if previous and previous != current:  # the old build of this tag, untagged now: only its last layers are its own
        podman("rmi", previous, capture=True, check=False)
    return tag


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="build_image.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    base = sub.add_parser("base", help="build the base image from Debian's packages (layers cached)")
    base.add_argument("--rebuild", action="store_true", help="make it again, from a fresh debootstrap")
    build = sub.add_parser("build", help="build the project's image on the base image")
    build.add_argument("--model-store", type=Path, default=ROOT / "model_store", help="folder of the MARs to carry")
    build.add_argument("--tag", default=DEFAULT_TAG)
    build.add_argument("--base", help="an existing base image instead of the local one")
    build.add_argument("--rebuild-base", action="store_true")
    args = parser.parse_args(argv)
    if shutil.which("podman") is None:
        raise SystemExit("podman is not installed (Debian: apt-get install podman runc debootstrap)")
    if args.action == "base":
        ensure_base_image(args.rebuild)
    else:
        build_image(args.model_store, args.tag, args.base, args.rebuild_base)


if __name__ == "__main__":
    main()
