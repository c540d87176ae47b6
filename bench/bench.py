#!/usr/bin/env python3
"""berth against containerd on this machine, side by side, in one run.

Started by bench/run (which installs, builds, makes the loop filesystem and
puts this under a reaper); see docs/benchmarks.md for what each figure means
and what bounds it. Both systems get the same images, the same journaled ext4
loop filesystem for their stores, and the same machine at the same time:
every figure is measured in rounds that alternate berth, containerd and the
floor, and the table quotes medians over all rounds.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time

NS = "bench"


def log(*args):
    print("bench:", *args, file=sys.stderr, flush=True)


def run(cmd, check=True, quiet=True, env=None, timeout=300):
    """Runs cmd to its end; its wall time in seconds."""
    start = time.perf_counter()
    out = subprocess.run(
        cmd,
        stdout=subprocess.PIPE if quiet else None,
        stderr=subprocess.STDOUT if quiet else None,
        env=env,
        timeout=timeout,
        check=False,
    )
    took = time.perf_counter() - start
    if check and out.returncode != 0:
        text = out.stdout.decode(errors="replace") if quiet else ""
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {text[-2000:]}")
    return took


def output(cmd, env=None, timeout=60):
    return subprocess.run(
        cmd, stdout=subprocess.PIPE, check=True, env=env, timeout=timeout
    ).stdout.decode()


def parallel(cmds, env=None, timeout=300):
    """Starts every command at once; the wall time until the last ended."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        for cmd in cmds
    ]
    failed = []
    for proc, cmd in zip(procs, cmds):
        _, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            failed.append(f"{' '.join(cmd)}: {err.decode(errors='replace').strip()}")
    took = time.perf_counter() - start
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(cmds)} failed; first: {failed[0]}")
    return took


def wait_until(predicate, timeout, step=0.002):
    """Polls predicate; the seconds it took to hold, or None."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if predicate():
            return time.perf_counter() - start
        time.sleep(step)
    return None


def median(values):
    return statistics.median(values) if values else float("nan")


def p90(values):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def p99(values):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


# --- memory ---------------------------------------------------------------


def memory_kb(pid):
    """(RSS, PSS) of one process in kB, from smaps_rollup."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except FileNotFoundError:
        pass
    return rss, pss


def pids_named(comm):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == comm:
                    found.append(int(entry))
        except OSError:
            pass
    return found


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return found


# --- the systems ----------------------------------------------------------


class Daemon:
    """A daemon this run started: stopped with SIGTERM (SIGKILL after 30 s),
    or killed outright."""

    proc = None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def sigkill(self):
        self.proc.kill()
        self.proc.wait()

    def daemon_pids(self):
        return [self.proc.pid]


class Berth(Daemon):
    name = "berth"

    def __init__(self, bin_dir, root, state, port):
        self.bin = bin_dir
        self.root = root
        self.state = state
        self.url = f"nats://127.0.0.1:{port}"
        self.env = dict(os.environ, BERTH_ROOT=root, BERTH_NATS_URL=self.url, BERTH_NAMESPACE=NS)
        self.proc = None
        self.log_path = os.path.join(os.path.dirname(root), "berthd.log")

    def cli(self, *args):
        return [os.path.join(self.bin, "berth"), *args]

    def start(self):
        logf = open(self.log_path, "a")
        seen = os.path.getsize(self.log_path)
        self.proc = subprocess.Popen(
            [
                os.path.join(self.bin, "berthd"),
                "--root", self.root,
                "--state", self.state,
                "--nats", self.url,
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        start = time.perf_counter()
        while time.perf_counter() - start < 60:
            with open(self.log_path) as f:
                f.seek(seen)
                if "berthd ready" in f.read():
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"berthd exited {self.proc.returncode}; see {self.log_path}")
            time.sleep(0.01)
        raise RuntimeError(f"berthd not ready in 60 s; see {self.log_path}")

    def nats_pid(self):
        for pid in pids_named("nats-server"):
            try:
                with open(f"/proc/{pid}/cmdline") as f:
                    if self.root in f.read():
                        return pid
            except OSError:
                pass
        return None

    def stop(self):
        super().stop()
        pid = self.nats_pid()
        if pid:
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10, 0.05)


    def shim_comm(self):
        return "berth-shim"

    def import_image(self, archive, name):
        """The import's wall time; the unpack's own (the snapshot
        service's `unpack` request, as the client timed it) is kept in
        `last_unpack`."""
        env = dict(self.env, BERTH_LOG="berth_bus::client=debug")
        start = time.perf_counter()
        out = subprocess.run(self.cli("image", "import", "--name", name, archive), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
        took = time.perf_counter() - start
        text = re.sub(r"\x1b\[[0-9;]*m", "", out.stderr.decode(errors="replace"))
        if out.returncode != 0:
            raise RuntimeError(f"berth image import exited {out.returncode}: {text[-2000:]}")
        unpacks = [int(m.group(1)) for m in re.finditer(
            r"subject=berth\.v1\.[^ ]*\.snapshot\.[^ ]*\.unpack elapsed_us=(\d+)", text)]
        self.last_unpack = sum(unpacks) / 1e6 if unpacks else float("nan")
        return took

    def remove_image(self, name):
        run(self.cli("image", "rm", name), env=self.env)

    def blob_path(self, digest):
        return os.path.join(self.root, "content", "blobs", "sha256", digest.split(":")[1])

    def snapshot_count(self):
        path = os.path.join(self.root, "snapshot", "snapshots")
        return len(os.listdir(path)) if os.path.isdir(path) else 0

    def run_rm(self, image, index, *args):
        return self.cli("run", "--rm", image, *args)

    def run_detached(self, image, name, *args):
        return self.cli("run", "-d", "--name", name, image, *args)

    def remove_forced(self, name):
        return self.cli("rm", "-f", name)

    def events(self):
        return self.cli("events", "--json", "--filter", "tasks.exit")

    @staticmethod
    def parse_exit(line):
        event = json.loads(line)
        if event.get("topic") != "tasks.exit":
            return None
        return event.get("object", "").split()[0], event.get("exited_at_unix_nanos")


class Containerd(Daemon):
    name = "containerd"

    def __init__(self, root, state):
        self.root = root
        self.state = state
        self.sock = os.path.join(state, "containerd.sock")
        self.config = os.path.join(os.path.dirname(root), "containerd.toml")
        self.log_path = os.path.join(os.path.dirname(root), "containerd.log")
        self.proc = None
        self.env = dict(os.environ)
        with open(self.config, "w") as f:
            # The CRI plugin serves Kubernetes, which berth does not; the
            # snapshotters other than overlayfs are never used here.
            f.write(
                f"""version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
"""
            )

    def cli(self, *args):
        return ["ctr", "--address", self.sock, "--namespace", NS, *args]

    def start(self):
        logf = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            ["containerd", "--config", self.config],
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        ok = wait_until(
            lambda: subprocess.run(
                self.cli("version"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            ).returncode
            == 0,
            60,
            0.01,
        )
        if ok is None:
            raise RuntimeError(f"containerd not ready in 60 s; see {self.log_path}")


    def shim_comm(self):
        return "containerd-shim"

    def import_image(self, archive, name):
        # `ctr image import` unpacks into the default snapshotter as it goes.
        return run(
            self.cli("image", "import", "--base-name", f"bench/{name}", archive), timeout=600
        )

    def image_ref(self, name):
        return f"bench/{name}:latest"

    def remove_image(self, name):
        run(self.cli("image", "rm", "--sync", self.image_ref(name)))

    def blob_path(self, digest):
        return os.path.join(
            self.root, "io.containerd.content.v1.content", "blobs", "sha256", digest.split(":")[1]
        )

    def snapshot_count(self):
        path = os.path.join(self.root, "io.containerd.snapshotter.v1.overlayfs", "snapshots")
        return len(os.listdir(path)) if os.path.isdir(path) else 0

    def run_rm(self, image, index, *args, seccomp=False):
        extra = ["--seccomp"] if seccomp else []
        return self.cli("run", "--rm", *extra, self.image_ref(image), f"rm-{index}", *args)

    def run_detached(self, image, name, *args):
        return self.cli("run", "-d", self.image_ref(image), name, *args)

    def remove_forced(self, name):
        # What `berth rm -f` does: kill the task, delete it, delete the
        # container and its snapshot.
        ctr = " ".join(self.cli())
        return [
            "sh",
            "-c",
            f"{ctr} task kill -s SIGKILL {name}; {ctr} task delete --force {name} >/dev/null;"
            f" {ctr} container delete {name}",
        ]

    def events(self):
        return self.cli("events")

    @staticmethod
    def parse_exit(line):
        # `TIME NAMESPACE /tasks/exit {json}`
        if "/tasks/exit" not in line:
            return None
        body = json.loads(line[line.index("{"):])
        return body["container_id"], rfc3339_nanos(body["exited_at"])


def rfc3339_nanos(text):
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z", text)
    whole = datetime.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.timezone.utc
    )
    frac = (match.group(2) or "0").ljust(9, "0")[:9]
    return int(whole.timestamp()) * 1_000_000_000 + int(frac)


class Watcher:
    """An events subscriber: when each task exit arrived, by container."""

    def __init__(self, system, env=None):
        self.system = system
        self.arrived = {}
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            system.events(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            bufsize=0,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for raw in iter(self.proc.stdout.readline, b""):
            now = time.time_ns()
            try:
                parsed = self.system.parse_exit(raw.decode())
            except (ValueError, KeyError, AttributeError):
                continue
            if parsed:
                with self.lock:
                    self.arrived[parsed[0]] = (now, parsed[1])

    def wait_for(self, container, timeout=10):
        found = wait_until(lambda: container in self.arrived, timeout, 0.001)
        if found is None:
            return None
        with self.lock:
            return self.arrived[container]

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


# --- the floors -----------------------------------------------------------


class Runc:
    """Bare runc on prepared bundles: the floor of every run figure."""

    name = "runc"

    def __init__(self, work, rootfs):
        self.work = work
        self.rootfs = rootfs
        os.makedirs(work, exist_ok=True)

    def bundle(self, name, args, overlay=False, readonly=True):
        bundle = os.path.join(self.work, name)
        os.makedirs(bundle, exist_ok=True)
        config = os.path.join(bundle, "config.json")
        if os.path.exists(config):
            os.remove(config)
        run(["runc", "spec", "--bundle", bundle])
        with open(config) as f:
            spec = json.load(f)
        spec["process"]["terminal"] = False
        spec["process"]["args"] = list(args)
        spec["root"] = {"path": os.path.join(bundle, "rootfs") if overlay else self.rootfs,
                        "readonly": readonly and not overlay}
        with open(config, "w") as f:
            json.dump(spec, f)
        return bundle

    def run_cmd(self, bundle, name, overlay=False):
        if not overlay:
            return ["runc", "run", "--bundle", bundle, name]
        # A fresh overlay for each container, as a runtime must make one.
        return [
            "sh",
            "-c",
            f"set -e; d={bundle}; mkdir -p $d/upper $d/work $d/rootfs;"
            f" mount -t overlay overlay -o lowerdir={self.rootfs},upperdir=$d/upper,workdir=$d/work $d/rootfs;"
            f" runc run --bundle $d {name} </dev/null; umount $d/rootfs; rm -rf $d/upper $d/work",
        ]


# --- the figures ----------------------------------------------------------


class Results:
    def __init__(self):
        self.rows = []

    def add(self, figure, unit, berth, containerd=None, floor=None, floor_name="", better="lower"):
        self.rows.append(dict(figure=figure, unit=unit, berth=berth, containerd=containerd,
                              floor=floor, floor_name=floor_name, better=better))
        log(f"{figure}: berth {fmt(berth)} containerd {fmt(containerd)} "
            f"{floor_name} {fmt(floor)} {unit}")


def fmt(value):
    if value is None:
        return "—"
    if isinstance(value, float) and value != value:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(a, b):
    if a is None or b is None or b == 0 or a != a or b != b:
        return "—"
    return f"{a / b:.2f}"


def layer_of(archive, work):
    """The gzip layers of an OCI archive, written out, with their
    uncompressed sizes."""
    out = []
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))
        manifest_digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.load(tar.extractfile(f"blobs/sha256/{manifest_digest}"))
        for layer in manifest["layers"]:
            hexd = layer["digest"].split(":")[1]
            path = os.path.join(work, hexd + ".tar.gz")
            if not os.path.exists(path):
                with open(path, "wb") as f:
                    shutil.copyfileobj(tar.extractfile(f"blobs/sha256/{hexd}"), f)
            out.append((layer["digest"], path))
    size = 0
    for _, path in out:
        size += int(output(["sh", "-c", f"gzip -dc {path} | wc -c"]).strip())
    return out, size


def bench_import(res, systems, archive, work, rounds):
    layers, raw_bytes = layer_of(archive, work)
    mb = raw_bytes / 1e6
    times = {s.name: [] for s in systems}
    reclaim = {s.name: [] for s in systems}
    floor, hashing, unpack, removal = [], [], [], []
    for r in range(rounds):
        order = systems if r % 2 == 0 else list(reversed(systems))
        for system in order:
            base = system.snapshot_count()
            times[system.name].append(system.import_image(archive, "big"))
            if system.name == "berth":
                unpack.append(system.last_unpack)
            run(["sync"])  # as the floor: deletes do not race the writeback
            start = time.perf_counter()
            system.remove_image("big")
            gone = wait_until(
                lambda: all(not os.path.exists(system.blob_path(d)) for d, _ in layers)
                and system.snapshot_count() <= base,
                30,
            )
            reclaim[system.name].append(time.perf_counter() - start if gone is not None else float("nan"))
        target = os.path.join(work, "untar")
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(target)
        floor.append(run(["sh", "-c", " && ".join(
            f"gzip -dc {path} | tar -x -C {target}" for _, path in layers)]))
        run(["sync"])
        removal.append(run(["rm", "-rf", target]))
        hashing.append(run(["sha256sum", *[path for _, path in layers]]))
    res.add("import + unpack of the Debian image", "MB/s of tar",
            mb / median(times["berth"]), mb / median(times["containerd"]),
            mb / median(floor), "gzip -dc \\| tar -x", better="higher")
    res.add("import + unpack, wall", "s", median(times["berth"]), median(times["containerd"]),
            median(floor), "gzip -dc \\| tar -x")
    res.add("of which unpack (berth's snapshot service)", "MB/s of tar", mb / median(unpack), None,
            mb / median(floor), "gzip -dc \\| tar -x", better="higher")
    res.add("sha256 of the layers (floor of verifying)", "s", None, None, median(hashing), "sha256sum")
    res.add("image removed -> blobs and snapshots gone", "ms",
            1000 * median(reclaim["berth"]), 1000 * median(reclaim["containerd"]),
            1000 * median(removal), "rm -rf of the unpacked tree")


def bench_run(res, systems, runc, count):
    lat = {s.name: [] for s in systems}
    lat["runc"], lat["runc+overlay"], lat["containerd+seccomp"] = [], [], []
    containerd = next(s for s in systems if s.name == "containerd")
    plain = runc.bundle("true-plain", ["/bin/true"])
    over = runc.bundle("true-overlay", ["/bin/true"], overlay=True)
    for i in range(count):
        for system in systems if i % 2 == 0 else list(reversed(systems)):
            lat[system.name].append(run(system.run_rm("busybox", i, "/bin/true"), env=system.env))
        # berth applies its seccomp profile by default, ctr only when asked.
        lat["containerd+seccomp"].append(
            run(containerd.run_rm("busybox", f"s{i}", "/bin/true", seccomp=True)))
        lat["runc"].append(run(runc.run_cmd(plain, f"bench-true-{i}")))
        lat["runc+overlay"].append(run(runc.run_cmd(over, f"bench-trueo-{i}", overlay=True)))
    ms = {k: [1000 * v for v in vals] for k, vals in lat.items()}
    res.add("run --rm busybox /bin/true, median", "ms", median(ms["berth"]),
            median(ms["containerd"]), median(ms["runc+overlay"]), "runc run + overlay mount")
    res.add("run --rm busybox /bin/true, p90", "ms", p90(ms["berth"]), p90(ms["containerd"]),
            p90(ms["runc+overlay"]), "runc run + overlay mount")
    res.add("run --rm, containerd with its seccomp profile too (median)", "ms", median(ms["berth"]),
            median(ms["containerd+seccomp"]))
    res.add("bare runc run, no mount (median)", "ms", None, None, median(ms["runc"]), "runc run")


def bench_many(res, systems, runc, count, rounds):
    rate = {s.name: [] for s in systems}
    teardown = {s.name: [] for s in systems}
    shim_rss = {s.name: [] for s in systems}
    shim_pss = {s.name: [] for s in systems}
    daemon_busy = {s.name: [] for s in systems}
    rate["runc"], teardown["runc"] = [], []
    bundles = [runc.bundle(f"sleep-{i}", ["/bin/sleep", "600"]) for i in range(count)]
    for r in range(rounds):
        for system in systems if r % 2 == 0 else list(reversed(systems)):
            names = [f"many-{r}-{i}" for i in range(count)]
            took = parallel([system.run_detached("busybox", n, "/bin/sleep", "600") for n in names],
                            env=system.env)
            rate[system.name].append(count / took)
            time.sleep(1)
            shims = pids_named(system.shim_comm())
            mem = [memory_kb(p) for p in shims]
            shim_rss[system.name].append(sum(m[0] for m in mem) / max(1, len(mem)) / 1024)
            shim_pss[system.name].append(sum(m[1] for m in mem) / max(1, len(mem)) / 1024)
            daemon_busy[system.name].append(
                sum(memory_kb(p)[0] for p in system.daemon_pids()) / 1024)
            if len(shims) != count:
                log(f"{system.name}: {len(shims)} shims for {count} containers")
            teardown[system.name].append(
                parallel([system.remove_forced(n) for n in names], env=system.env))
        names = [f"bench-many-{r}-{i}" for i in range(count)]
        took = parallel([["sh", "-c", f"runc run -d --bundle {b} {n} </dev/null >/dev/null 2>&1"]
                         for b, n in zip(bundles, names)])
        rate["runc"].append(count / took)
        teardown["runc"].append(parallel([["runc", "delete", "-f", n] for n in names]))
    res.add(f"{count} containers started at once (sleep)", "containers/s", median(rate["berth"]),
            median(rate["containerd"]), median(rate["runc"]), "runc run -d", better="higher")
    res.add(f"teardown of those {count}", "s", median(teardown["berth"]),
            median(teardown["containerd"]), median(teardown["runc"]), "runc delete -f")
    res.add(f"shim per running container ({count} running), RSS", "MB", median(shim_rss["berth"]),
            median(shim_rss["containerd"]))
    res.add(f"shim per running container ({count} running), PSS", "MB", median(shim_pss["berth"]),
            median(shim_pss["containerd"]))
    res.add(f"daemon RSS with {count} running", "MB", median(daemon_busy["berth"]),
            median(daemon_busy["containerd"]))


def bench_idle(res, berth, containerd, label):
    time.sleep(2)
    b = memory_kb(berth.proc.pid)
    nats_pid = berth.nats_pid()
    n = memory_kb(nats_pid) if nats_pid else (0, 0)
    c = memory_kb(containerd.proc.pid)
    res.add(f"daemon RSS idle ({label})", "MB", b[0] / 1024, c[0] / 1024)
    res.add(f"daemon PSS idle ({label})", "MB", b[1] / 1024, c[1] / 1024)
    res.add(f"berthd + its nats-server RSS idle ({label})", "MB", (b[0] + n[0]) / 1024, c[0] / 1024)


def bench_events(res, systems, count):
    for system in systems:
        watcher = Watcher(system, env=system.env)
        time.sleep(1)
        delays = []
        for i in range(count):
            name = f"ev-{i}"
            # A task that lives a moment: an instant exit would race its own
            # start's bookkeeping, which is not what a watcher waits on.
            run(system.run_detached("busybox", name, "/bin/sleep", "0.1"), env=system.env)
            got = watcher.wait_for(name)
            if got and got[1]:
                delays.append((got[0] - got[1]) / 1e6)
            run(system.remove_forced(name), env=system.env, check=False)
        watcher.stop()
        system.event_delays = delays
    b, c = systems[0].event_delays, systems[1].event_delays
    res.add("task exit -> event at a subscriber, median", "ms", median(b), median(c))
    res.add("task exit -> event at a subscriber, p99", "ms", p99(b), p99(c))


def bench_restart(res, systems, rounds):
    took = {s.name: [] for s in systems}
    for r in range(rounds):
        for system in systems:
            name = f"kill-{r}"
            watcher = Watcher(system, env=system.env) if system.name == "berth" else None
            run(system.run_detached("busybox", name, "/bin/sleep", "1"), env=system.env)
            system.sigkill()
            time.sleep(2)  # the container exits while its daemon is down
            start = time.time_ns()
            if system.name == "containerd":
                # containerd keeps no event log: a subscriber must be there
                # before the daemon republishes, so it starts with the daemon.
                system.proc = subprocess.Popen(
                    ["containerd", "--config", system.config],
                    stdout=open(system.log_path, "a"), stderr=subprocess.STDOUT,
                    start_new_session=True)
                watcher = None
                deadline = time.time() + 10
                while watcher is None and time.time() < deadline:
                    if subprocess.run(system.cli("version"), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL).returncode == 0:
                        watcher = Watcher(system)
                    else:
                        time.sleep(0.005)
            else:
                system.start()
            got = watcher.wait_for(name, timeout=20) if watcher else None
            took[system.name].append((got[0] - start) / 1e6 if got else float("nan"))
            if watcher:
                watcher.stop()
            if system.name == "containerd":
                wait_until(lambda: subprocess.run(system.cli("version"), stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL).returncode == 0, 30)
            run(system.remove_forced(name), env=system.env, check=False)
    res.add("restart after SIGKILL -> missed exit at a subscriber", "ms",
            median(took["berth"]), median(took["containerd"]))


def write_report(res, path, args, started):
    lines = []
    lines.append("| figure | unit | berth | containerd | berth/containerd | floor | berth/floor |")
    lines.append("|---|---|---|---|---|---|---|")
    for row in res.rows:
        floor = f"{fmt(row['floor'])} ({row['floor_name']})" if row["floor"] is not None else "—"
        lines.append(
            f"| {row['figure']} | {row['unit']}{' (higher is better)' if row['better'] == 'higher' else ''} "
            f"| {fmt(row['berth'])} | {fmt(row['containerd'])} | {ratio(row['berth'], row['containerd'])} "
            f"| {floor} | {ratio(row['berth'], row['floor'])} |"
        )
    table = "\n".join(lines)
    info = (
        f"Run {started:%Y-%m-%d %H:%M} UTC on {platform.node()}: {os.cpu_count()} CPUs, "
        f"kernel {platform.release()}, containerd {output(['containerd', '--version']).split()[2]}, "
        f"{output(['runc', '--version']).splitlines()[0]}; stores on a journaled ext4 loop "
        f"filesystem; {args.rounds} rounds, {args.runs} runs of `run --rm`, {args.many} "
        f"containers at once."
    )
    if args.only != ",".join(FIGURES):
        info += f" Only the figures of: {args.only}."
    with open(path, "w") as f:
        f.write(info + "\n\n" + table + "\n")
    print(info)
    print()
    print(table)


# The groups of figures, in the order they are measured.
FIGURES = ["idle", "run", "many", "import", "events", "restart"]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bin", required=True, help="the directory of berthd and berth (berthd finds berth-shim next to it, or at $BERTH_SHIM)")
    parser.add_argument("--mnt", required=True, help="the loop filesystem for both stores")
    parser.add_argument("--busybox", required=True)
    parser.add_argument("--big", required=True, help="the large image (OCI archive)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--many", type=int, default=50)
    parser.add_argument("--out", required=True, help="where the table is written")
    parser.add_argument("--port", type=int, default=14555)
    parser.add_argument("--only", default=",".join(FIGURES),
                        help="the groups of figures to measure, comma-separated, of: "
                        + ", ".join(FIGURES) + " (default: all)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if not only <= set(FIGURES):
        parser.error(f"--only: unknown groups {sorted(only - set(FIGURES))}")
    started = datetime.datetime.now(datetime.timezone.utc)

    state = "/run/berth-bench"
    for sub in ("berth", "containerd"):
        os.makedirs(os.path.join(args.mnt, sub), exist_ok=True)
        os.makedirs(os.path.join(state, sub), exist_ok=True)
    berth = Berth(args.bin, os.path.join(args.mnt, "berth", "root"),
                  os.path.join(state, "berth", "state"), args.port)
    containerd = Containerd(os.path.join(args.mnt, "containerd", "root"),
                            os.path.join(state, "containerd", "state"))
    work = os.path.join(args.mnt, "work")
    os.makedirs(work, exist_ok=True)
    systems = [berth, containerd]
    res = Results()
    try:
        for system in systems:
            system.start()
            system.import_image(args.busybox, "busybox")
        rootfs = os.path.join(work, "busybox-rootfs")
        if not os.path.isdir(rootfs):
            os.makedirs(rootfs)
            layers, _ = layer_of(args.busybox, work)
            for _, path in layers:
                run(["tar", "-xzf", path, "-C", rootfs])
        runc = Runc(os.path.join(work, "bundles"), rootfs)

        if "idle" in only:
            bench_idle(res, berth, containerd, "after start")
        if "run" in only:
            bench_run(res, systems, runc, args.runs)
        if "many" in only:
            bench_many(res, systems, runc, args.many, args.rounds)
        if "import" in only:
            bench_import(res, systems, args.big, work, args.rounds)
        if "events" in only:
            bench_events(res, systems, args.runs)
        if "restart" in only:
            bench_restart(res, systems, args.rounds)
        if "idle" in only:
            bench_idle(res, berth, containerd, "after the run")
    finally:
        for system in systems:
            try:
                system.stop()
            except Exception as err:  # noqa: BLE001 — stop the other one too
                log(f"stopping {system.name}: {err}")
    write_report(res, args.out, args, started)


if __name__ == "__main__":
    main()
