//! One module per subject group of `berth.v1.<namespace>.metadata.*`.

pub mod containers;
pub mod gc;
pub mod images;
pub mod leases;
pub mod tasks;
