//! Chain IDs: the names of committed layer snapshots.
//!
//! A layer snapshot holds a layer applied on all the layers below it, so it
//! is named by the whole stack, not by its own diff ID: the chain ID of the
//! first layer is its diff ID, and each next one is the sha256 of the text
//! `"<chain id below> <diff id>"`, written `sha256:<hex>`.

use sha2::{Digest as _, Sha256};

/// The chain ID of every prefix of `diff_ids` (base first), in order: the
/// last one names the image's top layer snapshot.
pub fn chain_ids<S: AsRef<str>>(diff_ids: &[S]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let diff_id = diff_id.as_ref();
        let next = match out.last() {
            None => diff_id.to_string(),
            Some(below) => {
                let hash = Sha256::digest(format!("{below} {diff_id}").as_bytes());
                format!("sha256:{}", hex::encode(hash))
            }
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUSYBOX_DIFF_ID: &str =
        "sha256:a45beec7b1e8c0baaffc2eceb3f87cb71769238c272ad035171475573e1296b2";
    const LAYERS_SECOND_DIFF_ID: &str =
        "sha256:5c5affa5d693892ca86fcb2a2bc885d04b5474ee141879d359f51ed41b0d406b";

    /// A single layer's chain ID is its diff ID.
    #[test]
    fn one_layer_is_its_own_chain_id() {
        assert_eq!(
            chain_ids(&[BUSYBOX_DIFF_ID]),
            vec![BUSYBOX_DIFF_ID.to_string()]
        );
    }

    /// The second chain ID hashes the first and the diff ID, space-separated.
    #[test]
    fn two_layers_hash_the_stack() {
        let mut hasher = Sha256::new();
        hasher.update(BUSYBOX_DIFF_ID.as_bytes());
        hasher.update(b" ");
        hasher.update(LAYERS_SECOND_DIFF_ID.as_bytes());
        let expected = format!("sha256:{}", hex::encode(hasher.finalize()));

        let ids = chain_ids(&[BUSYBOX_DIFF_ID, LAYERS_SECOND_DIFF_ID]);
        assert_eq!(ids, vec![BUSYBOX_DIFF_ID.to_string(), expected]);
    }

    /// No layers, no snapshots.
    #[test]
    fn no_layers_no_chain_ids() {
        assert!(chain_ids::<&str>(&[]).is_empty());
    }
}
