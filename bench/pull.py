#!/usr/bin/env python3
"""`berth image pull` against `ctr image pull`, side by side, from one local
registry (Debian's docker-registry on loopback, plain HTTP), in alternating
rounds; writes a table of medians and their ratio.

    bench/pull.py --bin target/release --big ../shared/images/debian/debian.oci.tar \
        --out docs/benchmarks/pull.md [--rounds 5] [--dir /var/tmp/berth-bench-pull]

As root, with containerd, ctr, docker-registry and skopeo installed and berth
built in release mode (`cargo build --release -p berthd -p berth-cli`). Each
round is a cold pull: the image is removed and its blobs and snapshots are
gone (waited for) before the next pull, for both systems. A pull ends with the
image unpacked and recorded for both (ctr unpacks into overlayfs by default).
The systems are started as bench/bench.py starts them.
"""

import argparse
import datetime
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the systems and helpers of the main harness)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """docker-registry on 127.0.0.1 with its storage under `dir`."""

    def __init__(self, dir):
        self.dir = dir
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.proc = None
        os.makedirs(dir, exist_ok=True)
        self.config = os.path.join(dir, "config.yml")
        with open(self.config, "w") as f:
            f.write(
                f"version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {dir}/data\n"
                f"http:\n  addr: {self.host}\n"
            )

    def start(self):
        logf = open(os.path.join(self.dir, "registry.log"), "a")
        self.proc = subprocess.Popen(["docker-registry", "serve", self.config], stdout=logf,
                                     stderr=subprocess.STDOUT, start_new_session=True)

        def up():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        if bench.wait_until(up, 20, 0.05) is None:
            raise RuntimeError("docker-registry did not start")

    def push(self, archive, name):
        bench.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                   f"oci-archive:{archive}:latest", f"docker://{self.host}/{name}"], timeout=300)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)


def unmount(dir):
    """Unmounts whatever either system left mounted under `dir`, then `dir`."""
    mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], stdout=subprocess.PIPE,
                            check=False).stdout.decode().split()
    for target in sorted((m for m in mounts if m.startswith(dir.rstrip("/") + "/")), reverse=True):
        subprocess.run(["umount", "-l", target], check=False)
    if dir.rstrip("/") in mounts:
        subprocess.run(["umount", "-l", dir], check=False)


def cold_pull(system, pull, remove, blobs):
    """The wall time of one pull; then removes the image and waits until
    its blobs and snapshots are gone."""
    base = system.snapshot_count()
    took = bench.run(pull, env=system.env, timeout=600)
    remove()
    gone = bench.wait_until(
        lambda: all(not os.path.exists(system.blob_path(d)) for d in blobs)
        and system.snapshot_count() <= base,
        60,
    )
    if gone is None:
        raise RuntimeError(f"{system.name}: the pulled image's blobs stayed after removal")
    return took


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", required=True, help="the directory of berthd and berth")
    parser.add_argument("--big", required=True, help="the image to pull (an OCI archive)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default="/var/tmp/berth-bench-pull")
    parser.add_argument("--port", type=int, default=14556, help="berthd's nats-server")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)

    unmount(args.dir)
    shutil.rmtree(args.dir, ignore_errors=True)
    # A fresh journaled ext4 for every store, as bench/run makes: the root
    # filesystem of these machines has no journal, and creating files soon
    # after deleting many is far slower there, for both systems alike.
    os.makedirs(args.dir)
    image = args.dir.rstrip("/") + ".img"
    bench.run(["truncate", "-s", "4G", image])
    bench.run(["mkfs.ext4", "-q", "-F", image])
    bench.run(["mount", "-o", "loop", image, args.dir])
    state = "/run/berth-bench-pull"
    shutil.rmtree(state, ignore_errors=True)
    for sub in ("berth", "containerd"):
        os.makedirs(os.path.join(args.dir, sub), exist_ok=True)
        os.makedirs(os.path.join(state, sub), exist_ok=True)
    registry = Registry(os.path.join(args.dir, "registry"))
    berth = bench.Berth(args.bin, os.path.join(args.dir, "berth", "root"),
                        os.path.join(state, "berth", "state"), args.port)
    containerd = bench.Containerd(os.path.join(args.dir, "containerd", "root"),
                                  os.path.join(state, "containerd", "state"))
    layers, raw_bytes = bench.layer_of(args.big, args.dir)
    blobs = [digest for digest, _ in layers]
    compressed = sum(os.path.getsize(path) for _, path in layers)
    ref = None
    times = {"berth": [], "containerd": []}
    try:
        registry.start()
        registry.push(args.big, "bench/debian:latest")
        ref = f"{registry.host}/bench/debian:latest"
        berth.start()
        containerd.start()
        pulls = {
            "berth": (berth, berth.cli("--timeout", "300", "image", "pull", ref),
                      lambda: bench.run(berth.cli("image", "rm", ref), env=berth.env)),
            "containerd": (containerd, containerd.cli("image", "pull", "--plain-http", ref),
                           lambda: bench.run(containerd.cli("image", "rm", "--sync", ref))),
        }
        for r in range(args.rounds):
            order = ["berth", "containerd"] if r % 2 == 0 else ["containerd", "berth"]
            for name in order:
                system, pull, remove = pulls[name]
                took = cold_pull(system, pull, remove, blobs)
                times[name].append(took)
                bench.log(f"round {r + 1}: {name} pulled in {took:.3f} s")
    finally:
        for system in (berth, containerd, registry):
            try:
                system.stop()
            except Exception as err:  # noqa: BLE001 — stop the others too
                bench.log(f"stopping: {err}")
        unmount(args.dir)
        shutil.rmtree(args.dir, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
        try:
            os.remove(image)
        except OSError:
            pass

    b, c = bench.median(times["berth"]), bench.median(times["containerd"])
    lines = [
        "# Pull from a local registry: berth against containerd",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {platform.node()} "
        f"({os.cpu_count()} CPUs), {args.rounds} alternating rounds, medians.",
        "",
        f"Image: `{os.path.basename(args.big)}`, {len(layers)} layer(s), "
        f"{compressed / 1e6:.1f} MB compressed, {raw_bytes / 1e6:.1f} MB of tar; served by "
        "Debian's docker-registry on 127.0.0.1 over plain HTTP, every store on one fresh "
        "journaled ext4 loop filesystem. Each pull is cold (the "
        "image, its blobs and snapshots removed and gone before the next) and ends with "
        "the image unpacked and recorded. The machine may have been shared with other "
        "work: compare the two columns of one run, not runs of different days.",
        "",
        "| | berth | containerd | berth / containerd |",
        "|---|---|---|---|",
        f"| pull + unpack, wall (s) | {b:.3f} | {c:.3f} | {b / c:.2f} |",
        f"| MB/s of compressed layers | {compressed / 1e6 / b:.1f} | {compressed / 1e6 / c:.1f} "
        f"| {c / b:.2f} |",
        "",
        "Every round (s): berth " + ", ".join(f"{t:.3f}" for t in times["berth"])
        + "; containerd " + ", ".join(f"{t:.3f}" for t in times["containerd"]) + ".",
        "",
        "Commands: `berth image pull " + ref.replace(registry.host, "127.0.0.1:PORT")
        + "` and `ctr image pull --plain-http " + ref.replace(registry.host, "127.0.0.1:PORT")
        + "`; made by:",
        "",
        "```sh",
        "bench/pull.py --bin target/release --big ../shared/images/debian/debian.oci.tar \\",
        f"    --out docs/benchmarks/pull.md --rounds {args.rounds}",
        "```",
        "",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
