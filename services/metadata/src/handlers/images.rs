//! `images.*`: names pointing at a manifest or index in content.

use std::sync::Arc;

use berth_bus::Call;
use berth_proto::metadata::{self as pb, Image, ImageEvent};
use berth_proto::Timestamp;

use crate::error::{Kind, MetadataError, Result};
use crate::events::{IMAGES_CREATE, IMAGES_DELETE, IMAGES_UPDATE};
use crate::fields::{check_labels, Mask};
use crate::handlers::{check_digest, check_name};
use crate::schema::MAX_ID_BYTES;
use crate::selector::Selector;
use crate::store::ensure_namespace;
use crate::MetadataService;

/// The fields an update may change, besides labels.
const MUTABLE: &[&str] = &["target", "config_digest", "chain_id"];

/// Checks what an image record must hold: a name, a target with a digest,
/// well-formed optional digests, and valid labels.
fn check(image: &Image) -> Result<()> {
    check_name("image name", &image.name, MAX_ID_BYTES)?;
    let target = image.target.as_ref().ok_or_else(|| {
        MetadataError::invalid("image", &image.name, "it has no target descriptor")
    })?;
    check_digest("image target digest", &target.digest)?;
    if !image.config_digest.is_empty() {
        check_digest("image config digest", &image.config_digest)?;
    }
    if !image.chain_id.is_empty() {
        check_digest("image chain id", &image.chain_id)?;
    }
    check_labels(&image.labels)
}

fn event(image: &Image) -> ImageEvent {
    ImageEvent {
        name: image.name.clone(),
        digest: image
            .target
            .as_ref()
            .map(|t| t.digest.clone())
            .unwrap_or_default(),
    }
}

/// `images.create`: `AlreadyExists` when the name is taken.
pub(crate) async fn create(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::CreateImageRequest,
) -> berth_bus::Result<pb::ImageReply> {
    let mut image = req
        .image
        .ok_or_else(|| MetadataError::invalid("request", "", "it has no image"))?;
    check(&image)?;
    if let Some(target) = &image.target {
        call.record("digest", &target.digest);
    }

    let namespace = call.namespace().to_string();
    let reply = svc
        .store
        .mutate(&call, move |schema, txn| {
            if schema.images.get(txn, &namespace, &image.name)?.is_some() {
                return Err(MetadataError::exists(Kind::Image, &image.name));
            }
            ensure_namespace(schema, txn, &namespace)?;
            let now = Timestamp::now();
            image.created_at = Some(now);
            image.updated_at = Some(now);
            image.generation = 1;
            schema.images.put(txn, &namespace, &image.name, &image)?;
            schema
                .outbox
                .push(txn, &namespace, IMAGES_CREATE, 1, &event(&image))?;
            Ok(pb::ImageReply { image: Some(image) })
        })
        .await?;
    Ok(reply)
}

/// `images.update`: the masked fields of the image named `image.name`; an
/// empty mask replaces target, digests and labels.
pub(crate) async fn update(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::UpdateImageRequest,
) -> berth_bus::Result<pb::ImageReply> {
    let new = req
        .image
        .ok_or_else(|| MetadataError::invalid("request", "", "it has no image"))?;
    let mask = Mask::parse(Kind::Image, &new.name, &req.field_mask, MUTABLE, &["name"])?;
    check_name("image name", &new.name, MAX_ID_BYTES)?;
    check_labels(&new.labels)?;

    let namespace = call.namespace().to_string();
    let reply = svc
        .store
        .mutate(&call, move |schema, txn| {
            let mut image = schema.images.require(txn, &namespace, &new.name)?;
            if mask.has("target") {
                image.target = new.target.clone();
            }
            if mask.has("config_digest") {
                image.config_digest = new.config_digest.clone();
            }
            if mask.has("chain_id") {
                image.chain_id = new.chain_id.clone();
            }
            mask.apply_labels(&mut image.labels, &new.labels);
            check(&image)?;
            image.updated_at = Some(Timestamp::now());
            image.generation += 1;
            schema.images.put(txn, &namespace, &image.name, &image)?;
            schema.outbox.push(
                txn,
                &namespace,
                IMAGES_UPDATE,
                image.generation,
                &event(&image),
            )?;
            Ok(pb::ImageReply { image: Some(image) })
        })
        .await?;
    Ok(reply)
}

/// `images.get`: `NotFound` when the name is not recorded.
pub(crate) async fn get(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::GetImageRequest,
) -> berth_bus::Result<pb::ImageReply> {
    let image = svc
        .store
        .read(|schema, txn| schema.images.require(txn, call.namespace(), &req.name))?;
    Ok(pb::ImageReply { image: Some(image) })
}

/// `images.list`: the namespace's images that match, by name.
pub(crate) async fn list(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::ListImagesRequest,
) -> berth_bus::Result<pb::ListImagesReply> {
    let selector = Selector::parse(&req.label_selector, &req.selector)?;
    let images = svc.store.read(|schema, txn| {
        Ok(schema
            .images
            .list(txn, call.namespace())?
            .into_iter()
            .filter(|image| selector.matches(&image.labels))
            .collect())
    })?;
    Ok(pb::ListImagesReply { images })
}

/// `images.delete`: removes the name; the bytes go when gc runs.
pub(crate) async fn delete(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::DeleteImageRequest,
) -> berth_bus::Result<pb::DeleteReply> {
    let namespace = call.namespace().to_string();
    let reply = svc
        .store
        .mutate(&call, move |schema, txn| {
            let image = schema.images.require(txn, &namespace, &req.name)?;
            schema.images.delete(txn, &namespace, &req.name)?;
            schema.outbox.push(
                txn,
                &namespace,
                IMAGES_DELETE,
                image.generation + 1,
                &event(&image),
            )?;
            Ok(pb::DeleteReply {})
        })
        .await?;
    Ok(reply)
}
