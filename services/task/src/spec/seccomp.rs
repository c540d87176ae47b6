//! The default seccomp profile: which system calls a container may make.
//!
//! The profile is data, `seccomp.json` beside this file, embedded at build
//! time. It is an allowlist: every call it does not name fails with EPERM,
//! and runc makes calls newer than its table fail with ENOSYS so programs
//! fall back to older ones. Its rules are the OCI `linux.seccomp` syscall
//! rules plus two optional keys, `ifCapability` and `unlessCapability`,
//! that make a rule depend on the container's capabilities: a container
//! given `CAP_SYS_ADMIN` may also mount and unshare, one without it may
//! clone only without new namespaces. [`default_profile`] turns it into the
//! spec's `linux.seccomp` for one capability set and this host's
//! architecture.
//!
//! # Limitations
//!
//! The profile lists x86_64 and aarch64, each with its native system-call
//! ABI only: a 32-bit program (i386, x32, arm) is stopped by the filter and
//! needs a profile of its own. runc builds the filter once per ABI listed,
//! and the compat ones made most of the cost of seccomp at create. On
//! another architecture no default filter is applied, and a warning says
//! so. The clone rule reads the flags in the first argument, which is where
//! both of those architectures pass them.

use std::collections::HashSet;
use std::sync::OnceLock;

use oci_spec::runtime::{
    Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompBuilder,
    LinuxSyscall, LinuxSyscallBuilder,
};
use serde::Deserialize;

use super::{parse_capability, SpecError};

/// The profile as it is stored in the repository.
const PROFILE: &str = include_str!("seccomp.json");

/// The profile file's shape.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Profile {
    /// What the file is, for people.
    #[allow(dead_code)]
    comment: Vec<String>,
    default_action: LinuxSeccompAction,
    default_errno_ret: Option<u32>,
    /// Seccomp architectures by Rust's name of the host architecture.
    architectures: std::collections::BTreeMap<String, Vec<Arch>>,
    rules: Vec<Rule>,
}

/// One rule: OCI syscall fields plus its capability condition.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Rule {
    /// What the rule is for, for people.
    #[allow(dead_code)]
    comment: String,
    names: Vec<String>,
    action: LinuxSeccompAction,
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Vec<LinuxSeccompArg>,
    if_capability: Option<String>,
    unless_capability: Option<String>,
}

impl Rule {
    /// Whether the rule applies to a container holding `caps`.
    fn applies(&self, caps: &HashSet<Capability>) -> Result<bool, SpecError> {
        let holds = |name: &Option<String>| -> Result<Option<bool>, SpecError> {
            name.as_deref()
                .map(|name| Ok(caps.contains(&parse_capability(name)?)))
                .transpose()
        };
        Ok(holds(&self.if_capability)?.unwrap_or(true)
            && !holds(&self.unless_capability)?.unwrap_or(false))
    }
}

fn profile() -> Result<&'static Profile, SpecError> {
    static PARSED: OnceLock<Result<Profile, String>> = OnceLock::new();
    PARSED
        .get_or_init(|| serde_json::from_str(PROFILE).map_err(|err| err.to_string()))
        .as_ref()
        .map_err(|reason| SpecError::Seccomp {
            reason: format!("the built-in profile does not parse: {reason}"),
        })
}

/// The default profile for a container holding `caps`, on this host's
/// architecture; `None` on an architecture the profile does not list.
pub fn default_profile(caps: &HashSet<Capability>) -> Result<Option<LinuxSeccomp>, SpecError> {
    profile_for(caps, std::env::consts::ARCH)
}

fn profile_for(caps: &HashSet<Capability>, arch: &str) -> Result<Option<LinuxSeccomp>, SpecError> {
    let profile = profile()?;
    let Some(architectures) = profile.architectures.get(arch) else {
        return Ok(None);
    };

    // A call allowed outright by two rules (two capabilities open it) is
    // listed once.
    let mut unconditional: HashSet<&str> = HashSet::new();
    let mut syscalls: Vec<LinuxSyscall> = Vec::new();
    for rule in &profile.rules {
        if !rule.applies(caps)? {
            continue;
        }
        let names: Vec<String> = rule
            .names
            .iter()
            .filter(|name| !rule.args.is_empty() || unconditional.insert(name.as_str()))
            .cloned()
            .collect();
        if names.is_empty() {
            continue;
        }
        let mut syscall = LinuxSyscallBuilder::default()
            .names(names)
            .action(rule.action);
        if let Some(errno) = rule.errno_ret {
            syscall = syscall.errno_ret(errno);
        }
        if !rule.args.is_empty() {
            syscall = syscall.args(rule.args.clone());
        }
        syscalls.push(syscall.build()?);
    }

    let mut seccomp = LinuxSeccompBuilder::default()
        .default_action(profile.default_action)
        .architectures(architectures.clone())
        .syscalls(syscalls);
    if let Some(errno) = profile.default_errno_ret {
        seccomp = seccomp.default_errno_ret(errno);
    }
    Ok(Some(seccomp.build()?))
}

/// A caller's own profile: the JSON of an OCI `linux.seccomp` object.
pub fn custom_profile(json: &str) -> Result<LinuxSeccomp, SpecError> {
    serde_json::from_str(json).map_err(|err| SpecError::Seccomp {
        reason: format!("the profile given is not an OCI linux.seccomp object: {err}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(seccomp: &LinuxSeccomp) -> Vec<String> {
        seccomp
            .syscalls()
            .iter()
            .flatten()
            .filter(|s| s.action() == LinuxSeccompAction::ScmpActAllow && s.args().is_none())
            .flat_map(|s| s.names().clone())
            .collect()
    }

    #[test]
    fn the_profile_parses_and_names_known_capabilities() {
        let profile = profile().unwrap();
        for rule in &profile.rules {
            for cap in rule.if_capability.iter().chain(&rule.unless_capability) {
                parse_capability(cap).unwrap();
            }
            assert!(!rule.names.is_empty(), "{}", rule.comment);
        }
    }

    #[test]
    fn the_default_set_cannot_mount_or_unshare() {
        let caps: HashSet<Capability> = super::super::default_capabilities().into_iter().collect();
        let seccomp = profile_for(&caps, "x86_64").unwrap().unwrap();
        let allowed = names(&seccomp);
        for call in ["read", "execve", "chroot", "socket", "setuid"] {
            assert!(allowed.iter().any(|n| n == call), "{call} not allowed");
        }
        for call in [
            "mount",
            "unshare",
            "setns",
            "init_module",
            "finit_module",
            "keyctl",
            "bpf",
            "reboot",
            "clone",
        ] {
            assert!(!allowed.iter().any(|n| n == call), "{call} allowed");
        }
        // clone is allowed only with an argument filter, clone3 not at all.
        let clone = seccomp
            .syscalls()
            .iter()
            .flatten()
            .find(|s| s.names().iter().any(|n| n == "clone"))
            .unwrap();
        assert!(clone.args().is_some());
    }

    #[test]
    fn sys_admin_opens_its_calls_once() {
        let mut caps: HashSet<Capability> =
            super::super::default_capabilities().into_iter().collect();
        caps.insert(Capability::SysAdmin);
        caps.insert(Capability::Syslog);
        let seccomp = profile_for(&caps, "aarch64").unwrap().unwrap();
        let allowed = names(&seccomp);
        for call in ["mount", "unshare", "clone", "clone3"] {
            assert!(allowed.iter().any(|n| n == call), "{call} not allowed");
        }
        assert_eq!(allowed.iter().filter(|n| *n == "syslog").count(), 1);
        assert!(profile_for(&caps, "riscv64").unwrap().is_none());
    }

    #[test]
    fn custom_profiles_are_oci_objects() {
        let profile = custom_profile(r#"{"defaultAction":"SCMP_ACT_ALLOW"}"#).unwrap();
        assert_eq!(profile.default_action(), LinuxSeccompAction::ScmpActAllow);
        assert!(custom_profile("{}").is_err());
    }
}
