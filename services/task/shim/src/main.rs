//! `berth-shim`: the per-container shim the task service starts for each
//! task. All logic lives in the library; see there for the protocol.

fn main() {
    std::process::exit(berth_shim::main());
}
