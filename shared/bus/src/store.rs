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

/// Opens (creating if needed) the environment in directory `dir`.
pub fn open_env(dir: &Path, max_dbs: u32) -> Result<Env> {
    std::fs::create_dir_all(dir)
        .map_err(|err| Error::internal(format!("create {}: {err}", dir.display())))?;
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(MAP_SIZE).max_dbs(max_dbs + 4);
    // SAFETY: each service opens its own directory once per process, and no
    // other process maps it (the heed requirement for `open`).
    unsafe { options.open(dir) }
        .map_err(|err| Error::internal(format!("open database {}: {err}", dir.display())))
}
