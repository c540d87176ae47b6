//! Opening a service's LMDB environment with the settings every service needs.

use std::path::Path;

use heed::EnvOpenOptions;

use crate::error::{Error, Result};

/// A service's LMDB environment. Read transactions are `Send` (no
/// thread-local storage), so they may be used from any tokio worker.
pub type Env = heed::Env<heed::WithoutTls>;

/// The map size: LMDB's default of 10 MiB would fill after some thousands of
/// records; 64 GiB of address space costs nothing until it is used.
pub const MAP_SIZE: usize = 64 << 30;

/// What a commit has survived when it returns. A crash of the service
/// itself (SIGKILL) loses no commit either way: its pages are in the
/// kernel's cache by then. The two differ only when the machine stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk: the data pages are synced, then the meta page that makes
    /// them current (two syncs a commit).
    Machine,
    /// The data pages are synced, the meta page is not until the next
    /// commit (one sync a commit): a crash of the machine may undo the last
    /// commit, never break the database. For state that a reboot makes void
    /// anyway: a node's tasks die with the machine, and their records are
    /// reconciled by boot id when it comes back.
    Process,
}

/// Opens (creating if needed) the environment in directory `dir`, with
/// every commit on disk when it returns.
pub fn open_env(dir: &Path, max_dbs: u32) -> Result<Env> {
    open_env_with(dir, max_dbs, Durability::Machine)
}

/// Opens (creating if needed) the environment in directory `dir`, with
/// commits as durable as `durability` says.
pub fn open_env_with(dir: &Path, max_dbs: u32, durability: Durability) -> Result<Env> {
    std::fs::create_dir_all(dir)
        .map_err(|err| Error::internal(format!("create {}: {err}", dir.display())))?;
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(MAP_SIZE).max_dbs(max_dbs + 4);
    if durability == Durability::Process {
        // SAFETY: NO_META_SYNC keeps the database consistent; what it gives
        // up is the last commit after a crash of the machine, as above.
        unsafe {
            options.flags(heed::EnvFlags::NO_META_SYNC);
        }
    }
    // SAFETY: each service opens its own directory once per process, and no
    // other process maps it (the heed requirement for `open`).
    unsafe { options.open(dir) }
        .map_err(|err| Error::internal(format!("open database {}: {err}", dir.display())))
}
