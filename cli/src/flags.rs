//! Flag values as docker reads them: sizes (`16m`), CPU counts, `-e` and
//! `--env-file` entries, `-v` binds, labels and signal names.

use std::path::Path;

use anyhow::{bail, Context};

use berth_proto::metadata as mpb;

/// The smallest memory limit accepted; docker's floor too, since a
/// container under it does not get as far as running its command.
const MIN_MEMORY: i64 = 6 * 1024 * 1024;

/// A byte count such as `16m`, `1g`, `512k`, `1.5G` or `1048576` (binary
/// units, an optional trailing `b`).
pub fn parse_bytes(text: &str) -> anyhow::Result<i64> {
    let lower = text.trim().to_ascii_lowercase();
    let lower = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (number, unit) = match lower.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((at, _)) => lower.split_at(at),
        None => (lower, ""),
    };
    let scale: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => bail!("cannot read {text:?} as a size: use a number with k, m, g or t"),
    };
    let value: f64 = number
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
        .with_context(|| format!("cannot read {text:?} as a size"))?;
    Ok((value * scale as f64) as i64)
}

/// `--memory`: a size of at least 6 MiB.
pub fn parse_memory(text: &str) -> anyhow::Result<i64> {
    let bytes = parse_bytes(text)?;
    if bytes < MIN_MEMORY {
        bail!("--memory {text} is below the 6 MiB a container needs to start");
    }
    Ok(bytes)
}

/// `--cpus`: a positive number of CPUs, as thousandths.
pub fn parse_cpus(text: &str) -> anyhow::Result<i64> {
    let cpus: f64 = text
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite())
        .with_context(|| format!("cannot read --cpus {text:?} as a number"))?;
    let millis = (cpus * 1000.0).round() as i64;
    if millis < 1 {
        bail!("--cpus {text} must be at least 0.001");
    }
    Ok(millis)
}

/// `-e` entries: `KEY=value` as given, and a bare `KEY` takes its value
/// from berth's own environment (and is left out when unset), as docker does.
pub fn env_entries(entries: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in entries {
        let name = entry.split_once('=').map_or(entry.as_str(), |(k, _)| k);
        if name.is_empty() {
            bail!("environment variable {entry:?} has no name");
        }
        if entry.contains('=') {
            out.push(entry.clone());
        } else if let Ok(value) = std::env::var(name) {
            out.push(format!("{name}={value}"));
        }
    }
    Ok(out)
}

/// The entries of an `--env-file`: one `KEY=value` (or bare `KEY`) a line;
/// blank lines and lines starting with `#` are skipped.
pub fn env_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read env file {}", path.display()))?;
    let lines: Vec<String> = text
        .lines()
        .map(|line| line.trim_start().to_string())
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    env_entries(&lines).with_context(|| format!("in env file {}", path.display()))
}

/// `KEY=value` pairs (labels).
pub fn key_values(pairs: &[String], what: &str) -> anyhow::Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{what} {pair:?} is not KEY=value"))
        })
        .collect()
}

/// `-v SRC:DST[:ro|rw]`: a host path bind-mounted into the container.
///
/// # Limitations
/// Only bind mounts of absolute host paths: berth has no named volumes.
pub fn bind(spec: &str) -> anyhow::Result<mpb::BindMount> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (source, destination, options) = match parts[..] {
        [source, destination] => (source, destination, ""),
        [source, destination, options] => (source, destination, options),
        _ => bail!("volume {spec:?} is not SRC:DST or SRC:DST:ro"),
    };
    if !source.starts_with('/') {
        bail!("volume {spec:?}: berth has no named volumes; give an absolute host path");
    }
    if !destination.starts_with('/') {
        bail!("volume {spec:?}: the container path must be absolute");
    }
    let mut readonly = false;
    for option in options.split(',').filter(|o| !o.is_empty()) {
        match option {
            "ro" => readonly = true,
            "rw" => readonly = false,
            other => bail!("volume {spec:?}: unknown option {other:?} (use ro or rw)"),
        }
    }
    Ok(mpb::BindMount {
        source: source.to_string(),
        destination: destination.to_string(),
        readonly,
    })
}

/// `--tmpfs DST`: an absolute container path.
pub fn tmpfs(spec: &str) -> anyhow::Result<String> {
    if spec.contains(':') {
        bail!("--tmpfs {spec:?}: mount options are not supported; give only the path");
    }
    if !spec.starts_with('/') {
        bail!("--tmpfs {spec:?}: the container path must be absolute");
    }
    Ok(spec.to_string())
}

/// A capability as the runtime spec names it: `net_admin` and `NET_ADMIN`
/// become `CAP_NET_ADMIN`; `ALL` stays.
pub fn capability(name: &str) -> anyhow::Result<String> {
    let upper = name.trim().to_ascii_uppercase();
    if upper.is_empty() || !upper.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("capability {name:?} is not a name such as NET_ADMIN");
    }
    if upper == "ALL" || upper.starts_with("CAP_") {
        return Ok(upper);
    }
    Ok(format!("CAP_{upper}"))
}

/// Signals by name, as `kill -l` lists them on Linux.
const SIGNALS: [(&str, i32); 31] = [
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

/// The number of a signal given by name (`TERM`, `SIGTERM`, `sigterm`)
/// or number (1 to 64).
pub fn signal_number(signal: &str) -> anyhow::Result<u32> {
    if let Ok(number) = signal.parse::<u32>() {
        if !(1..=64).contains(&number) {
            bail!("signal {number} is not between 1 and 64");
        }
        return Ok(number);
    }
    let upper = signal.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, number)| *number as u32)
        .with_context(|| format!("unknown signal {signal:?}"))
}

/// What `--security-opt` flags loosen.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SecurityOpts {
    /// `seccomp=unconfined`.
    pub seccomp_unconfined: bool,
    /// `seccomp=FILE`: the file's JSON.
    pub seccomp_profile: String,
    /// `no-new-privileges=false`.
    pub allow_new_privileges: bool,
}

/// Reads `--security-opt` values as docker takes them (`KEY=VALUE` or
/// `KEY:VALUE`): `seccomp=unconfined`, `seccomp=FILE`,
/// `no-new-privileges[=true|false]`.
pub fn security_opts(opts: &[String]) -> anyhow::Result<SecurityOpts> {
    let mut out = SecurityOpts::default();
    for opt in opts {
        let (key, value) = match opt.split_once(['=', ':']) {
            Some((key, value)) => (key, Some(value)),
            None => (opt.as_str(), None),
        };
        match (key, value) {
            ("seccomp", Some("unconfined")) => out.seccomp_unconfined = true,
            ("seccomp", Some(path)) if !path.is_empty() => {
                out.seccomp_profile = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the seccomp profile {path}"))?;
            }
            ("no-new-privileges", None | Some("true")) => out.allow_new_privileges = false,
            ("no-new-privileges", Some("false")) => out.allow_new_privileges = true,
            _ => bail!(
                "unknown --security-opt {opt:?}: berth takes seccomp=unconfined, seccomp=FILE and no-new-privileges=true|false"
            ),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_docker_reads_them() {
        let cases = [
            ("16m", 16 << 20),
            ("1g", 1 << 30),
            ("1G", 1 << 30),
            ("512k", 512 << 10),
            ("1.5g", 3 << 29),
            ("64MiB", 64 << 20),
            ("100mb", 100 << 20),
            ("1048576", 1 << 20),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_bytes(text).unwrap(), bytes, "{text}");
        }
        for bad in ["", "m", "16x", "-1m", "1..5g"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert!(parse_memory("1m").is_err());
    }

    #[test]
    fn cpus_become_thousandths() {
        assert_eq!(parse_cpus("1.5").unwrap(), 1500);
        assert_eq!(parse_cpus("0.25").unwrap(), 250);
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("two").is_err());
    }

    #[test]
    fn binds_are_absolute_with_ro_or_rw() {
        let bind_ro = bind("/srv/data:/data:ro").unwrap();
        assert_eq!(
            (
                bind_ro.source.as_str(),
                bind_ro.destination.as_str(),
                bind_ro.readonly
            ),
            ("/srv/data", "/data", true)
        );
        assert!(!bind("/a:/b").unwrap().readonly);
        for bad in ["data:/data", "/a:b", "/a", "/a:/b:zz", "/a:/b:ro:x"] {
            assert!(bind(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bare_env_names_take_berths_environment() {
        std::env::set_var("BERTH_FLAGS_TEST", "from-env");
        let out = env_entries(&[
            "A=1".to_string(),
            "BERTH_FLAGS_TEST".to_string(),
            "BERTH_FLAGS_UNSET_XYZ".to_string(),
        ])
        .unwrap();
        assert_eq!(out, ["A=1", "BERTH_FLAGS_TEST=from-env"]);
        assert!(env_entries(&["=x".to_string()]).is_err());
    }

    #[test]
    fn capabilities_take_the_cap_prefix() {
        assert_eq!(capability("net_admin").unwrap(), "CAP_NET_ADMIN");
        assert_eq!(capability("CAP_SYS_TIME").unwrap(), "CAP_SYS_TIME");
        assert_eq!(capability("all").unwrap(), "ALL");
        assert!(capability("net admin").is_err());
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(signal_number("TERM").unwrap(), 15);
        assert_eq!(signal_number("SIGKILL").unwrap(), 9);
        assert_eq!(signal_number("sighup").unwrap(), 1);
        assert_eq!(signal_number("10").unwrap(), 10);
        assert!(signal_number("FOO").is_err());
        assert!(signal_number("0").is_err());
    }
}
