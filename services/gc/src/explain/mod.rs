//! `explain`: why one blob or snapshot stays, or that it goes at the next run.
//!
//! An explanation takes its own mark (a fresh epoch and the roots) after any
//! run in progress, fills the shared [`Graph`](crate::mark::Graph) with every
//! edge the namespace's roots reach, then asks the owners what is stored:
//! content for the blob, and each node's snapshot service for its snapshots
//! with their parents. [`path::find`] walks from there; nothing is changed.
//!
//! # Limitations
//!
//! The answer covers the namespace asked in only, so a tenant learns nothing
//! of another: a blob that goes from this namespace may keep its bytes on
//! disk because another namespace holds it too. Touched times are not on the
//! wire, so an unreferenced object that was reused a moment ago is reported
//! as going, though the next run keeps it if the reuse came after its mark.

pub mod path;

use std::collections::{BTreeSet, HashMap};

use berth_proto::gc as pb;
use berth_proto::metadata as mdpb;

use crate::convert;
use crate::error::GcError;
use crate::mark::{is_digest, Graph};
use crate::remote::Remote;
use crate::GcService;
use path::{Explanation, Object, Root, Step, StepKind, EXTRACT_PREFIX};

/// The longest object name explain accepts.
const MAX_OBJECT_LEN: usize = 1024;

/// A checked `explain` request.
struct Question {
    object: String,
    /// The node asked about; `None` for every node.
    node: Option<String>,
}

impl Question {
    fn parse(req: pb::ExplainRequest) -> Result<Question, GcError> {
        let invalid = |field, value: &str, reason: &str| GcError::Invalid {
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        };
        if req.object.is_empty() || req.object.len() > MAX_OBJECT_LEN {
            let reason = "name a blob digest or a snapshot key of at most 1024 bytes";
            return Err(invalid("object", &req.object, reason));
        }
        if req.object.chars().any(char::is_control) {
            return Err(invalid("object", &req.object, "control characters"));
        }
        let node = match req.node.as_str() {
            "" => None,
            node => {
                berth_bus::subject::check_token("node id", node)
                    .map_err(|err| invalid("node", node, &err.message))?;
                Some(node.to_string())
            }
        };
        Ok(Question {
            object: req.object,
            node,
        })
    }
}

impl GcService {
    /// Explains one blob or snapshot of `namespace`; see the module docs.
    /// Waits for a run in progress, and holds off the next one meanwhile.
    pub(crate) async fn explain(
        &self,
        namespace: &str,
        req: pb::ExplainRequest,
    ) -> Result<pb::ExplainReply, GcError> {
        let question = Question::parse(req)?;
        // Every node answers, not only those a run knows: discovery's
        // window passes before the run lock is taken.
        let nodes = match &question.node {
            Some(node) => BTreeSet::from([node.clone()]),
            None => self.nodes.discover(&self.remote).await,
        };
        let mut runs = self.runs.lock().await;
        let graph = &mut runs.graph;
        let (epoch, roots) = self.roots_of(namespace, graph).await?;

        let mut explanations = Vec::new();
        if is_digest(&question.object) {
            let blob = self.blob(namespace, graph, &roots, &question.object);
            explanations.extend(blob.await?);
        }
        let asked = Asked {
            remote: &self.remote,
            graph,
            roots: &roots,
            namespace,
            key: &question.object,
            explicit: question.node.is_some(),
        };
        let on_nodes = futures::future::join_all(nodes.iter().map(|node| asked.on(node)));
        for outcome in on_nodes.await {
            explanations.extend(outcome?);
        }
        Ok(reply(epoch, namespace, &question.object, &explanations))
    }

    /// A fresh mark's epoch and the named roots of `namespace`, with every
    /// edge they reach read into `graph` the way a run reads them.
    async fn roots_of(
        &self,
        namespace: &str,
        graph: &mut Graph,
    ) -> Result<(u64, Vec<Root>), GcError> {
        let mark = self.remote.mark(namespace).await.map_err(GcError::Mark)?;
        let ns_roots = mark
            .namespaces
            .into_iter()
            .find(|ns| ns.namespace == namespace)
            .unwrap_or_else(|| mdpb::NamespaceRoots {
                namespace: namespace.to_string(),
                ..Default::default()
            });
        graph
            .live_set(&self.remote, &convert::roots(&ns_roots))
            .await?;
        Ok((mark.epoch, convert::named_roots(&ns_roots)))
    }

    /// The explanation of blob `digest`, if the namespace holds it or a
    /// root reaches it.
    async fn blob(
        &self,
        namespace: &str,
        graph: &Graph,
        roots: &[Root],
        digest: &str,
    ) -> Result<Option<Explanation>, GcError> {
        let stored = self.remote.holds_blob(namespace, digest).await;
        let stored = stored.map_err(|source| GcError::Read {
            namespace: namespace.to_string(),
            digest: digest.to_string(),
            source,
        })?;
        let path = path::find(roots, graph, &HashMap::new(), Object::Blob(digest));
        let reported = stored || path.is_some();
        Ok(reported.then(|| Explanation::new(None, stored, path)))
    }
}

/// The reply: the explanations found, or a single unknown one.
fn reply(
    epoch: u64,
    namespace: &str,
    object: &str,
    explanations: &[Explanation],
) -> pb::ExplainReply {
    let mut explanations: Vec<pb::Explanation> =
        explanations.iter().map(convert::explanation).collect();
    if explanations.is_empty() {
        let mut unknown = convert::explanation(&Explanation::new(None, false, None));
        unknown.reason = format!("unknown: no blob or snapshot {object} in namespace {namespace}");
        explanations.push(unknown);
    }
    pb::ExplainReply {
        epoch,
        explanations,
    }
}

/// What a snapshot explanation works from.
struct Asked<'a> {
    remote: &'a Remote,
    graph: &'a Graph,
    roots: &'a [Root],
    namespace: &'a str,
    key: &'a str,
    /// True when the caller named the node: then a failure to list is an
    /// error, and a snapshot the node lacks is reported when a root reaches it.
    explicit: bool,
}

impl Asked<'_> {
    /// The explanation for the key on `node`, if the node has it (or the
    /// caller named the node and a root reaches it there).
    async fn on(&self, node: &str) -> Result<Option<Explanation>, GcError> {
        let infos = match self.remote.list_snapshots(self.namespace, node).await {
            Ok(infos) => infos,
            Err(source) if self.explicit => {
                return Err(GcError::Node {
                    namespace: self.namespace.to_string(),
                    node: node.to_string(),
                    source,
                })
            }
            Err(err) => {
                tracing::warn!(node, error = %err, "snapshots not listed; node left out");
                return Ok(None);
            }
        };
        let parents: HashMap<String, String> = infos
            .into_iter()
            .map(|info| (info.key, info.parent))
            .collect();
        let stored = parents.contains_key(self.key);

        // A layer being unpacked stays whatever refers to it.
        let path = if stored && self.key.starts_with(EXTRACT_PREFIX) {
            Some(vec![Step {
                kind: StepKind::Unpack,
                name: self.key.to_string(),
            }])
        } else {
            let object = Object::Snapshot {
                node,
                key: self.key,
            };
            path::find(self.roots, self.graph, &parents, object)
        };
        let reported = stored || (self.explicit && path.is_some());
        if !reported {
            return Ok(None);
        }
        Ok(Some(Explanation::new(Some(node), stored, path)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What explain refuses, and what it accepts.
    #[test]
    fn questions() {
        let cases = [
            ("", "", Some("object")),
            ("k\n", "", Some("object")),
            (&"k".repeat(MAX_OBJECT_LEN + 1), "", Some("object")),
            ("c1", "a.b", Some("node")),
            ("c1", "node-1", None),
            ("sha256:abc", "", None),
        ];
        for (object, node, refused) in cases {
            let req = pb::ExplainRequest {
                object: object.to_string(),
                node: node.to_string(),
            };
            match (Question::parse(req), refused) {
                (Ok(_), None) => {}
                (Err(GcError::Invalid { field, .. }), Some(expected)) => {
                    assert_eq!(field, expected, "{object:?} {node:?}")
                }
                (outcome, _) => panic!("{object:?} {node:?}: {:?}", outcome.err()),
            }
        }
    }

    /// Nothing found is one unknown answer naming the object and namespace.
    #[test]
    fn nothing_found_is_unknown() {
        let reply = reply(7, "default", "k1", &[]);
        assert_eq!(reply.epoch, 7);
        assert_eq!(reply.explanations.len(), 1);
        let unknown = &reply.explanations[0];
        assert_eq!(unknown.verdict(), pb::Verdict::Unknown);
        assert_eq!(
            unknown.reason,
            "unknown: no blob or snapshot k1 in namespace default"
        );

        let kept = Explanation::new(None, true, Some(vec![]));
        assert_eq!(
            reply_of(&[kept]).explanations[0].verdict(),
            pb::Verdict::Kept
        );
    }

    fn reply_of(explanations: &[Explanation]) -> pb::ExplainReply {
        reply(1, "default", "k1", explanations)
    }
}
