//! Resolution of an image's `User` against its `/etc/passwd` and `/etc/group`.

use std::fs;
use std::io;
use std::path::Path;

use super::rootfs::{host_path, resolve_in_root};
use super::{io_err, SpecError};

/// A user resolved against the image's `/etc/passwd` and `/etc/group`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups listing the user by name, primary gid excluded.
    pub additional_gids: Vec<u32>,
    /// Home directory from passwd, when the user has an entry.
    pub home: Option<String>,
}

/// Resolves `user` (`uid`, `uid:gid`, `name`, `name:group`, or empty for
/// root) against `<rootfs>/etc/passwd` and `<rootfs>/etc/group`.
///
/// A numeric uid without a passwd entry gets gid 0; a name missing from the
/// files (or missing files) is [`SpecError::UserNotFound`] or
/// [`SpecError::GroupNotFound`].
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<ResolvedUser, SpecError> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    if group_part == Some("") || user_part.is_empty() && group_part.is_some() {
        return Err(SpecError::InvalidUser {
            user: user.to_string(),
        });
    }
    let user_part = if user_part.is_empty() { "0" } else { user_part };

    let passwd = read_etc(rootfs, "/etc/passwd")?;
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd_entries(&passwd).find(|e| e.uid == uid),
        Err(_) => Some(
            passwd_entries(&passwd)
                .find(|e| e.name == user_part)
                .ok_or_else(|| SpecError::UserNotFound {
                    user: user_part.to_string(),
                })?,
        ),
    };
    let uid = match &entry {
        Some(e) => e.uid,
        None => user_part.parse::<u32>().unwrap_or(0),
    };

    let groups = read_etc(rootfs, "/etc/group")?;
    let gid = match group_part {
        None => entry.as_ref().map(|e| e.gid).unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(&groups)
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| SpecError::GroupNotFound {
                    group: g.to_string(),
                })?,
        },
    };

    let mut additional_gids = Vec::new();
    if let Some(e) = &entry {
        for group in group_entries(&groups) {
            let member = group.members.split(',').any(|m| m == e.name);
            if member && group.gid != gid && !additional_gids.contains(&group.gid) {
                additional_gids.push(group.gid);
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home: entry.map(|e| e.home.to_string()),
    })
}

/// Reads a file of the rootfs, an absent file reading as empty.
fn read_etc(rootfs: &Path, path: &str) -> Result<String, SpecError> {
    let host = host_path(rootfs, &resolve_in_root(rootfs, Path::new(path))?);
    match fs::read(&host) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(io_err(host)(e)),
    }
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f.get(5).copied().unwrap_or(""),
        })
    })
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: &'a str,
}

fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 3 || line.starts_with('#') {
            return None;
        }
        Some(GroupEntry {
            name: f[0],
            gid: f[2].parse().ok()?,
            members: f.get(3).copied().unwrap_or(""),
        })
    })
}
