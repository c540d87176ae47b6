//! `images.*`: named images.

use std::sync::Arc;

use berth_bus::{Call, Error, Result};
use berth_proto::metadata::{self as pb, Image, ImageEvent};
use berth_proto::Timestamp;

use crate::MetadataService;

fn check(image: &Image) -> Result<()> {
    if image.name.is_empty()
        || image.name.len() > 512
        || image.name.chars().any(char::is_whitespace)
    {
        return Err(Error::invalid(format!(
            "invalid image name {:?}",
            image.name
        )));
    }
    let target = image
        .target
        .as_ref()
        .ok_or_else(|| Error::invalid(format!("image {} has no target", image.name)))?;
    if !target.digest.starts_with("sha256:") {
        return Err(Error::invalid(format!(
            "image {} target digest {:?} is malformed",
            image.name, target.digest
        )));
    }
    Ok(())
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
) -> Result<pb::ImageReply> {
    let mut image = req
        .image
        .ok_or_else(|| Error::invalid("no image in request"))?;
    check(&image)?;
    let store = &svc.store;
    store.mutate(&call, |txn| {
        if store
            .images
            .get(txn, call.namespace(), &image.name)?
            .is_some()
        {
            return Err(Error::already_exists(format!(
                "image {} already exists",
                image.name
            )));
        }
        let now = Timestamp::now();
        image.created_at = Some(now);
        image.updated_at = Some(now);
        image.generation = 1;
        store
            .images
            .put(txn, call.namespace(), &image.name, &image)?;
        store.outbox.push(
            txn,
            call.namespace(),
            "images.create",
            image.generation,
            &event(&image),
        )?;
        Ok(pb::ImageReply { image: Some(image) })
    })
}

/// `images.update`: replaces the masked fields of an existing image.
pub(crate) async fn update(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::UpdateImageRequest,
) -> Result<pb::ImageReply> {
    let new = req
        .image
        .ok_or_else(|| Error::invalid("no image in request"))?;
    check(&new)?;
    let store = &svc.store;
    store.mutate(&call, |txn| {
        let mut image = store.images.require(txn, call.namespace(), &new.name)?;
        let all = req.field_mask.is_empty();
        for field in ["target", "labels", "config_digest", "chain_id"] {
            if !all && !req.field_mask.iter().any(|f| f == field) {
                continue;
            }
            match field {
                "target" => image.target = new.target.clone(),
                "labels" => image.labels = new.labels.clone(),
                "config_digest" => image.config_digest = new.config_digest.clone(),
                _ => image.chain_id = new.chain_id.clone(),
            }
        }
        if let Some(field) = req
            .field_mask
            .iter()
            .find(|f| !["target", "labels", "config_digest", "chain_id"].contains(&f.as_str()))
        {
            return Err(Error::invalid(format!("unknown field {field:?} in mask")));
        }
        image.updated_at = Some(Timestamp::now());
        image.generation += 1;
        store
            .images
            .put(txn, call.namespace(), &image.name, &image)?;
        store.outbox.push(
            txn,
            call.namespace(),
            "images.update",
            image.generation,
            &event(&image),
        )?;
        Ok(pb::ImageReply { image: Some(image) })
    })
}

/// `images.get`.
pub(crate) async fn get(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::GetImageRequest,
) -> Result<pb::ImageReply> {
    let txn = svc.store.env.read_txn()?;
    let image = svc
        .store
        .images
        .require(&txn, call.namespace(), &req.name)?;
    Ok(pb::ImageReply { image: Some(image) })
}

/// `images.list`.
pub(crate) async fn list(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::ListImagesRequest,
) -> Result<pb::ListImagesReply> {
    let txn = svc.store.env.read_txn()?;
    let images = svc
        .store
        .images
        .list(&txn, call.namespace())?
        .into_iter()
        .filter(|image| crate::selects(&req.label_selector, &image.labels))
        .collect();
    Ok(pb::ListImagesReply { images })
}

/// `images.delete`: removes the name; the bytes go when gc runs.
pub(crate) async fn delete(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::DeleteImageRequest,
) -> Result<pb::DeleteReply> {
    let store = &svc.store;
    let reply = store.mutate(&call, |txn| {
        let image = store.images.require(txn, call.namespace(), &req.name)?;
        store.images.delete(txn, call.namespace(), &req.name)?;
        store.outbox.push(
            txn,
            call.namespace(),
            "images.delete",
            image.generation + 1,
            &event(&image),
        )?;
        Ok(pb::DeleteReply {})
    })?;
    Ok(reply)
}
